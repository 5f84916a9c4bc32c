"""Every key a launch config may hold: its section, type, default and the flag it becomes.

A config is plain YAML data in sections (`model`, `training`, `optimizer`, `parallel`,
`data`, `output`, `slurm`, `megatron`, `trainer`) plus a few top-level keys. This table is
the only place keys are declared (the `optimizer.spectra` keys are made from
megatron_spectra.settings): validation, value checks, defaults and the command line all read it.

`flag` is Megatron-LM's own flag (checked against core_r0.16 - 0.19 `arguments.py`; the
builtin trainer takes the same spelling). `builtin` says how the builtin trainer
(`python -m megatron_spectra.train`) treats a key it has no flag for: ANY means the key does
not change the maths there (e.g. the vocab file), so it is simply not passed; any other value
is what the trainer does implicitly, and a config that asks for something else is refused
rather than silently run differently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from .. import settings
from ..settings import at_least, beta, fraction, non_negative, positive, unit_interval

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
    check: Callable[[Any], str | None] | None = None  # what is wrong with a (non-null) value, or None


INT, FLOAT, BOOL, STR = (int,), (float, int), (bool,), (str,)
OPT_INT, OPT_FLOAT, OPT_STR = (int, type(None)), (float, int, type(None)), (str, type(None))
STR_LIST, STR_DICT = (list,), (dict,)
POSITIVE = at_least(1)

def port(v) -> str | None:
    return None if 1024 <= v <= 65535 - 999 else "must lie in [1024, 64536] (a job adds SLURM_JOB_ID % 1000)"


ENTRIES = ("megatron-lm", "builtin")
LAUNCHERS = ("local", "slurm")
OPTIMIZERS = ("adam", "sgd", "spectra-adamw", "spectra-signum", "spectra-ademamix")

_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=+-]*")


def run_name(v) -> str | None:
    """A folder name inside output.root: one safe path component, or <sweep>/<run> (a sweep's
    runs); never `..`, an absolute path or a name the shell or a flag parser would misread."""
    parts = v.split("/")
    if len(parts) <= 2 and all(_COMPONENT.fullmatch(part) for part in parts):
        return None
    return "must be a plain folder name (letters, digits and . _ = + -, not starting with . or -): the run folder is output.root/name"


TOP = {
    "name": Key(STR, doc="run name; the run folder is output.root/name", check=run_name),
    "description": Key(OPT_STR, None),
    "entry": Key(STR, "megatron-lm", choices=ENTRIES),
    "launcher": Key(STR, "local", choices=LAUNCHERS),
}

MODEL = {
    "num_layers": Key(INT, flag="--num-layers", check=POSITIVE),
    "hidden_size": Key(INT, flag="--hidden-size", check=POSITIVE),
    "ffn_hidden_size": Key(INT, flag="--ffn-hidden-size", check=POSITIVE),
    "num_attention_heads": Key(INT, flag="--num-attention-heads", check=POSITIVE),
    "num_query_groups": Key(OPT_INT, None, flag="--num-query-groups", doc="null: multi-head attention", check=POSITIVE),
    "seq_length": Key(INT, flag="--seq-length", doc="also --max-position-embeddings", check=POSITIVE),
    "tie_embeddings": Key(BOOL, False, doc="false: --untie-embeddings-and-output-weights"),
    "norm_epsilon": Key(FLOAT, 1e-5, flag="--norm-epsilon", check=positive),
    "dropout": Key(FLOAT, 0.0, doc="--attention-dropout and --hidden-dropout (Megatron's default is 0.1)", check=beta),
}

TRAINING = {
    "global_batch_size": Key(INT, flag="--global-batch-size", check=POSITIVE),
    "micro_batch_size": Key(INT, flag="--micro-batch-size", check=POSITIVE),
    "train_iters": Key(INT, flag="--train-iters", check=POSITIVE),
    "lr": Key(FLOAT, flag="--lr", check=positive),
    "min_lr": Key(FLOAT, 0.0, flag="--min-lr", doc="at most lr", check=non_negative),
    "lr_decay_style": Key(STR, "WSD", flag="--lr-decay-style", choices=("constant", "linear", "cosine", "WSD")),
    "lr_warmup_iters": Key(INT, 0, flag="--lr-warmup-iters", check=at_least(0)),
    "warmup_start_factor": Key(FLOAT, 0.0, doc="--lr-warmup-init = lr * this (official code: 0.01)", check=unit_interval),
    "lr_wsd_decay_style": Key(STR, "minus_sqrt", flag="--lr-wsd-decay-style", choices=("exponential", "linear", "cosine", "minus_sqrt")),
    "wsd_decay_fraction": Key(FLOAT, 0.2, doc="--lr-wsd-decay-iters = round(this * train_iters)", check=fraction),
    "weight_decay": Key(FLOAT, 0.1, flag="--weight-decay", check=non_negative),
    "clip_grad": Key(FLOAT, 1.0, flag="--clip-grad", doc="0: no global-norm clipping", check=non_negative),
    "adam_beta1": Key(FLOAT, 0.9, flag="--adam-beta1", check=beta),
    "adam_beta2": Key(FLOAT, 0.999, flag="--adam-beta2", check=beta),
    "adam_eps": Key(FLOAT, 1e-8, flag="--adam-eps", check=non_negative),
    "seed": Key(INT, 1234, flag="--seed", check=at_least(0)),
    "bf16": Key(BOOL, True, flag="--bf16"),
    "log_interval": Key(INT, 10, flag="--log-interval", check=POSITIVE),
    "eval_interval": Key(INT, 1000, flag="--eval-interval", check=POSITIVE),
    "eval_iters": Key(INT, 100, flag="--eval-iters", check=at_least(0)),
    "save_interval": Key(INT, 1000, flag="--save-interval", check=POSITIVE),
}

# Rules between keys: (the key to change, what must hold, what it says).
RELATIONS = (
    ("training.min_lr", lambda d: d["training"]["min_lr"] <= d["training"]["lr"], "must be <= training.lr"),
)

# SPECTRA's knobs, one per --spectra-* flag, generated from megatron_spectra.settings (named
# as the flag's dest without `spectra_`). Emitted only for spectra-* optimizers.
_TYPES = {float: FLOAT, int: INT, bool: BOOL, str: STR}


def _spectra_key(s: settings.Setting) -> Key:
    types = _TYPES[s.type] + ((type(None),) if s.optional else ())
    return Key(types, s.default, flag=s.flag, choices=s.choices, doc=s.doc, check=s.check)


SPECTRA = {s.launch_key: _spectra_key(s) for s in settings.flag_settings()}

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
    "vocab_size": Key(OPT_INT, None, flag="--vocab-size", doc="only for tokenizers without a vocab file", check=POSITIVE),
    "vocab_multiple": Key(INT, 128, doc="padded vocab is a multiple of this: --make-vocab-size-divisible-by = this / TP", check=POSITIVE),
}

OUTPUT = {
    "root": Key(STR, "${SPECTRA_RUNS:-runs}", doc="run folder = root/name"),
    "checkpoint_root": Key(OPT_STR, None, doc="checkpoints in checkpoint_root/name; null: run folder/checkpoints"),
    "tensorboard": Key(BOOL, True, doc="--tensorboard-dir run folder/tensorboard"),
    "checkpoints": Key(BOOL, True, doc="--save / --load the checkpoint folder; false: none, and a restart starts afresh"),
}

SLURM = {
    "partition": Key(OPT_STR, None),
    "account": Key(OPT_STR, None),
    "qos": Key(OPT_STR, None),
    "time": Key(STR, "24:00:00"),
    "cpus_per_task": Key(OPT_INT, None, doc="CPUs of the one task per node (it runs torchrun and all its ranks)", check=POSITIVE),
    "mem": Key(OPT_STR, None, doc="e.g. 0 for all of the node's memory"),
    "exclusive": Key(BOOL, True),
    "constraint": Key(OPT_STR, None),
    "directives": Key(STR_LIST, [], doc="extra '#SBATCH' lines, without the prefix"),
    "env": Key(STR_DICT, {}, doc="exported before srun: cluster-specific NCCL / network variables"),
    "setup": Key(STR_LIST, [], doc="shell lines run first (module load, source venv/bin/activate)"),
    "master_port": Key(INT, 29500, doc="rendezvous port; a job adds SLURM_JOB_ID % 1000 to it", check=port),
    "array_parallelism": Key(OPT_INT, None, doc="sweeps: at most this many array tasks at once", check=POSITIVE),
}

MEGATRON = {
    "path": Key(OPT_STR, "${MEGATRON_LM:-}", doc="Megatron-LM checkout holding pretrain_gpt.py"),
    "transformer_impl": Key(STR, "transformer_engine", choices=("local", "transformer_engine")),
    "log_throughput": Key(BOOL, True),
    "extra_args": Key(STR_LIST, [], doc="appended verbatim to the Megatron-LM command line"),
}

TRAINER = {
    "cpu": Key(BOOL, False, doc="--trainer-cpu: gloo on CPU"),
    "progress": Key(BOOL, False, doc="--trainer-progress: a progress bar on stderr"),
    "update_norms": Key(BOOL, False, doc="--trainer-update-norms: largest update spectral norm, before and after clipping"),
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
