"""Every key a launch config may hold: its section, type, default and the flag it becomes.

A config is plain YAML data in sections (`model`, `training`, `optimizer`, `parallel`,
`data`, `output`, `slurm`, `megatron`, `trainer`) plus a few top-level keys. This table is
the only place keys are declared: validation, defaults and the command line all read it.

`flag` is Megatron-LM's own flag (checked against core_r0.16 - 0.19 `arguments.py`; the
builtin trainer takes the same spelling). `builtin` says how the builtin trainer
(`python -m megatron_spectra.train`) treats a key it has no flag for: ANY means the key does
not change the maths there (e.g. the vocab file), so it is simply not passed; any other value
is what the trainer does implicitly, and a config that asks for something else is refused
rather than silently run differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REQUIRED = object()
ANY = object()
SUPPORTED = object()  # the builtin trainer takes this key's flag


@dataclass(frozen=True)
class Key:
    type: tuple  # accepted Python types after YAML parsing; None in it means "may be null"
    default: Any = REQUIRED
    flag: str | None = None
    choices: tuple = ()
    builtin: Any = SUPPORTED
    doc: str = ""


INT, FLOAT, BOOL, STR = (int,), (float, int), (bool,), (str,)
OPT_INT, OPT_FLOAT, OPT_STR = (int, type(None)), (float, int, type(None)), (str, type(None))
STR_LIST, STR_DICT = (list,), (dict,)

ENTRIES = ("megatron-lm", "builtin")
LAUNCHERS = ("local", "slurm")
OPTIMIZERS = ("adam", "sgd", "spectra-adamw", "spectra-signum", "spectra-ademamix")

TOP = {
    "name": Key(STR, doc="run name; the run folder is output.root/name"),
    "description": Key(OPT_STR, None),
    "entry": Key(STR, "megatron-lm", choices=ENTRIES),
    "launcher": Key(STR, "local", choices=LAUNCHERS),
}

MODEL = {
    "num_layers": Key(INT, flag="--num-layers"),
    "hidden_size": Key(INT, flag="--hidden-size"),
    "ffn_hidden_size": Key(INT, flag="--ffn-hidden-size"),
    "num_attention_heads": Key(INT, flag="--num-attention-heads"),
    "num_query_groups": Key(OPT_INT, None, flag="--num-query-groups", doc="null: multi-head attention"),
    "seq_length": Key(INT, flag="--seq-length", doc="also --max-position-embeddings"),
    "tie_embeddings": Key(BOOL, False, doc="false: --untie-embeddings-and-output-weights"),
    "norm_epsilon": Key(FLOAT, 1e-5, flag="--norm-epsilon"),
    "dropout": Key(FLOAT, 0.0, doc="--attention-dropout and --hidden-dropout (Megatron's default is 0.1)"),
}

TRAINING = {
    "global_batch_size": Key(INT, flag="--global-batch-size"),
    "micro_batch_size": Key(INT, flag="--micro-batch-size"),
    "train_iters": Key(INT, flag="--train-iters"),
    "lr": Key(FLOAT, flag="--lr"),
    "min_lr": Key(FLOAT, 0.0, flag="--min-lr"),
    "lr_decay_style": Key(STR, "WSD", flag="--lr-decay-style", choices=("constant", "linear", "cosine", "WSD")),
    "lr_warmup_iters": Key(INT, 0, flag="--lr-warmup-iters"),
    "warmup_start_factor": Key(FLOAT, 0.0, doc="--lr-warmup-init = lr * this (official code: 0.01)"),
    "lr_wsd_decay_style": Key(STR, "minus_sqrt", flag="--lr-wsd-decay-style", choices=("exponential", "linear", "cosine", "minus_sqrt")),
    "wsd_decay_fraction": Key(FLOAT, 0.2, doc="--lr-wsd-decay-iters = round(this * train_iters)"),
    "weight_decay": Key(FLOAT, 0.1, flag="--weight-decay"),
    "clip_grad": Key(FLOAT, 1.0, flag="--clip-grad"),
    "adam_beta1": Key(FLOAT, 0.9, flag="--adam-beta1"),
    "adam_beta2": Key(FLOAT, 0.999, flag="--adam-beta2"),
    "adam_eps": Key(FLOAT, 1e-8, flag="--adam-eps"),
    "seed": Key(INT, 1234, flag="--seed"),
    "bf16": Key(BOOL, True, flag="--bf16"),
    "log_interval": Key(INT, 10, flag="--log-interval"),
    "eval_interval": Key(INT, 1000, flag="--eval-interval"),
    "eval_iters": Key(INT, 100, flag="--eval-iters"),
    "save_interval": Key(INT, 1000, flag="--save-interval"),
}

# SPECTRA's knobs: the --spectra-* flags of megatron_spectra.megatron.lm.add_spectra_arguments
# (a test keeps this table equal to that parser). Emitted only for spectra-* optimizers.
SPECTRA = {
    "clip_threshold": Key(FLOAT, 10.0, flag="--spectra-clip-threshold"),
    "clip_schedule": Key(STR, "standard", flag="--spectra-clip-schedule", choices=("constant", "standard", "wsd-sqrt")),
    "decay_fraction": Key(FLOAT, 0.2, flag="--spectra-decay-fraction"),
    "mode": Key(STR, "paper", flag="--spectra-mode", choices=("paper", "accurate")),
    "ns_steps": Key(INT, 10, flag="--spectra-ns-steps"),
    "ns_fp32": Key(BOOL, False, flag="--spectra-ns-fp32"),
    "apply_to": Key(STR, "all", flag="--spectra-apply-to", choices=("all", "2d", "hidden", "none")),
    "split_qkv": Key(BOOL, False, flag="--spectra-split-qkv"),
    "split_fc1": Key(BOOL, False, flag="--spectra-split-fc1"),
    "strategy": Key(STR, "auto", flag="--spectra-strategy", choices=("auto", "owner", "gram")),
    "pre_clip": Key(BOOL, False, flag="--spectra-pre-clip"),
    "pre_clip_threshold": Key(FLOAT, 0.1, flag="--spectra-pre-clip-threshold"),
    "nonfinite": Key(STR, "skip", flag="--spectra-nonfinite", choices=("skip", "raise")),
    "log_update_norms": Key(BOOL, False, flag="--spectra-log-update-norms"),
    "signum_momentum": Key(FLOAT, 0.95, flag="--spectra-signum-momentum"),
    "signum_nesterov": Key(BOOL, True, flag="--spectra-signum-no-nesterov", doc="false: --spectra-signum-no-nesterov"),
    "ademamix_beta3": Key(FLOAT, 0.999, flag="--spectra-ademamix-beta3"),
    "ademamix_alpha": Key(FLOAT, 8.0, flag="--spectra-ademamix-alpha"),
    "ademamix_warmup": Key(OPT_INT, None, flag="--spectra-ademamix-warmup"),
    "cpu": Key(BOOL, False, flag="--spectra-cpu", doc="Megatron-LM on CPU (gloo), for tests"),
}

OPTIMIZER = {
    "name": Key(STR, flag="--optimizer", choices=OPTIMIZERS),
    "spectra": Key(STR_DICT, {}, doc="the --spectra-* knobs, see SPECTRA"),
}

PARALLEL = {
    "nodes": Key(INT, 1),
    "gpus_per_node": Key(INT, 8, doc="processes per node (torchrun --nproc-per-node)"),
    "tensor_parallel": Key(INT, 1, flag="--tensor-model-parallel-size"),
    "pipeline_parallel": Key(INT, 1, flag="--pipeline-model-parallel-size"),
    "use_distributed_optimizer": Key(BOOL, True, flag="--use-distributed-optimizer"),
    "sequence_parallel": Key(BOOL, False, flag="--sequence-parallel", builtin=False),
}

DATA = {
    "path": Key(OPT_STR, None, flag="--data-path", doc="Megatron .bin/.idx prefix; null: mock data (builtin: its own small corpus)"),
    "split": Key(STR, "990,10,0", flag="--split"),
    "tokenizer_type": Key(STR, "GPT2BPETokenizer", flag="--tokenizer-type"),
    "vocab_file": Key(OPT_STR, None, flag="--vocab-file", builtin=ANY),
    "merge_file": Key(OPT_STR, None, flag="--merge-file", builtin=ANY),
    "vocab_size": Key(OPT_INT, None, flag="--vocab-size", doc="only for tokenizers without a vocab file"),
    "vocab_multiple": Key(INT, 128, doc="padded vocab is a multiple of this: --make-vocab-size-divisible-by = this / TP"),
}

OUTPUT = {
    "root": Key(STR, "${SPECTRA_RUNS:-runs}", doc="run folder = root/name"),
    "checkpoint_root": Key(OPT_STR, None, doc="checkpoints in checkpoint_root/name; null: run folder/checkpoints"),
    "tensorboard": Key(BOOL, True, doc="--tensorboard-dir run folder/tensorboard"),
}

SLURM = {
    "partition": Key(OPT_STR, None),
    "account": Key(OPT_STR, None),
    "qos": Key(OPT_STR, None),
    "time": Key(STR, "24:00:00"),
    "cpus_per_task": Key(OPT_INT, None, doc="CPUs of the one task per node (it runs torchrun and all its ranks)"),
    "mem": Key(OPT_STR, None, doc="e.g. 0 for all of the node's memory"),
    "exclusive": Key(BOOL, True),
    "constraint": Key(OPT_STR, None),
    "directives": Key(STR_LIST, [], doc="extra '#SBATCH' lines, without the prefix"),
    "env": Key(STR_DICT, {}, doc="exported before srun: cluster-specific NCCL / network variables"),
    "setup": Key(STR_LIST, [], doc="shell lines run first (module load, source venv/bin/activate)"),
    "master_port": Key(INT, 29500),
    "array_parallelism": Key(OPT_INT, None, doc="sweeps: at most this many array tasks at once"),
}

MEGATRON = {
    "path": Key(OPT_STR, "${MEGATRON_LM:-}", doc="Megatron-LM checkout holding pretrain_gpt.py"),
    "transformer_impl": Key(STR, "transformer_engine", choices=("local", "transformer_engine")),
    "log_throughput": Key(BOOL, True),
    "extra_args": Key(STR_LIST, [], doc="appended verbatim to the Megatron-LM command line"),
}

TRAINER = {
    "cpu": Key(BOOL, False, doc="--trainer-cpu: gloo on CPU"),
    "extra_args": Key(STR_LIST, [], doc="appended verbatim to the builtin trainer's command line"),
}

SECTIONS = {
    "model": MODEL,
    "training": TRAINING,
    "optimizer": OPTIMIZER,
    "parallel": PARALLEL,
    "data": DATA,
    "output": OUTPUT,
    "slurm": SLURM,
    "megatron": MEGATRON,
    "trainer": TRAINER,
}
