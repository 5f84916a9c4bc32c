"""The command line a config produces: a pure function of the validated config.

    trainer_args(config)            # Megatron-LM flags (the builtin trainer takes the same)
    to_command(config, "local")     # python -m torch.distributed.run --standalone ... -m megatron_spectra.megatron_lm .../pretrain_gpt.py FLAGS
    to_command(config, "slurm")     # the same (torchrun) with the c10d rendezvous on $MASTER_ADDR (inside srun)

The model is always LLaMA-style, as in the paper: SwiGLU, RMSNorm, RoPE, no biases.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from .config import Config
from .layout import layout
from .schema import SPECTRA, TRAINING

LLAMA = ["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--disable-bias-linear"]


class Raw(str):
    """A command-line word the shell must expand ($SLURM_NNODES): not quoted by shell_join."""


def shell_join(words) -> str:
    return " ".join(w if isinstance(w, Raw) else shlex.quote(str(w)) for w in words)


def fmt(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def trainer_args(config: Config) -> list[str]:
    d = config.data
    builtin = d["entry"] == "builtin"
    return [
        *_model_args(d["model"]),
        *_training_args(d["training"]),
        *_optimizer_args(d["optimizer"]),
        *_parallel_args(d["parallel"]),
        *_data_args(d["data"], d["parallel"]["tensor_parallel"], builtin),
        *_output_args(config),
        *(_trainer_extras(config) if builtin else _megatron_extras(d["megatron"])),
    ]


def _model_args(m: dict) -> list[str]:
    args = ["--num-layers", fmt(m["num_layers"]), "--hidden-size", fmt(m["hidden_size"]),
            "--ffn-hidden-size", fmt(m["ffn_hidden_size"]), "--num-attention-heads", fmt(m["num_attention_heads"])]
    if m["num_query_groups"] is not None:
        # Megatron-LM reads --num-query-groups only with --group-query-attention.
        args += ["--group-query-attention", "--num-query-groups", fmt(m["num_query_groups"])]
    args += ["--seq-length", fmt(m["seq_length"]), "--max-position-embeddings", fmt(m["seq_length"])]
    args += LLAMA + ["--norm-epsilon", fmt(m["norm_epsilon"])]
    if not m["tie_embeddings"]:
        args.append("--untie-embeddings-and-output-weights")
    # Megatron's default dropout is 0.1; the paper trains without.
    return args + ["--attention-dropout", fmt(m["dropout"]), "--hidden-dropout", fmt(m["dropout"])]


def _training_args(t: dict) -> list[str]:
    plain = ("micro_batch_size", "global_batch_size", "train_iters", "lr", "min_lr", "lr_decay_style", "lr_warmup_iters",
             "weight_decay", "clip_grad", "adam_beta1", "adam_beta2", "adam_eps", "seed",
             "log_interval", "eval_interval", "eval_iters", "save_interval")
    args = []
    for key in plain:
        if t[key] is not None:
            args += [TRAINING[key].flag, fmt(t[key])]
    if t["warmup_start_factor"]:
        args += ["--lr-warmup-init", fmt(t["lr"] * t["warmup_start_factor"])]
    if t["lr_decay_style"] == "WSD":
        args += ["--lr-wsd-decay-style", t["lr_wsd_decay_style"], "--lr-wsd-decay-iters", fmt(wsd_decay_iters(t))]
    if t["bf16"]:
        args.append("--bf16")
    return args


def wsd_decay_iters(t: dict) -> int:
    return round(t["wsd_decay_fraction"] * t["train_iters"])


def _optimizer_args(o: dict) -> list[str]:
    args = ["--optimizer", o["name"]]
    if not o["name"].startswith("spectra-"):
        return args
    for key, spec in SPECTRA.items():
        value = o["spectra"][key]
        if isinstance(value, bool):  # a switch: given to leave its default (--spectra-signum-no-nesterov: off)
            args += [spec.flag] if value != spec.default else []
        elif value is not None:
            args += [spec.flag, fmt(value)]
    return args


def _parallel_args(p: dict) -> list[str]:
    args = ["--tensor-model-parallel-size", fmt(p["tensor_parallel"]), "--pipeline-model-parallel-size", fmt(p["pipeline_parallel"])]
    if p["use_distributed_optimizer"]:
        args.append("--use-distributed-optimizer")
    if p["sequence_parallel"]:
        args.append("--sequence-parallel")
    return args


def _data_args(d: dict, tp: int, builtin: bool) -> list[str]:
    args = []
    if d["path"]:
        args += ["--data-path", d["path"], "--split", d["split"], "--tokenizer-type", d["tokenizer_type"]]
    elif not builtin:
        args += ["--mock-data", "--tokenizer-type", d["tokenizer_type"]]
    else:  # the builtin trainer's own corpus, split as the config says
        args += ["--split", d["split"]]
    if not builtin:  # the builtin trainer's tokenizers have no vocabulary files
        for key in ("vocab_file", "merge_file"):
            if d[key]:
                args += ["--" + key.replace("_", "-"), d[key]]
    args += ["--make-vocab-size-divisible-by", fmt(d["vocab_multiple"] // tp)]
    if d["vocab_size"] is not None:
        args += ["--vocab-size", fmt(d["vocab_size"])]
    return args


def _output_args(config: Config) -> list[str]:
    ckpt = str(config.checkpoint_dir)
    # --load: a resubmitted run resumes from its latest checkpoint
    args = ["--save", ckpt, "--load", ckpt] if config.data["output"]["checkpoints"] else []
    if config.data["output"]["tensorboard"]:
        args += ["--tensorboard-dir", str(config.run_dir / "tensorboard")]
    return args


def _megatron_extras(m: dict) -> list[str]:
    args = ["--transformer-impl", m["transformer_impl"]]
    if m["log_throughput"]:
        args.append("--log-throughput")
    return args + list(m["extra_args"])


def _trainer_extras(config: Config) -> list[str]:
    t = config.data["trainer"]
    # --trainer-out: its metrics.jsonl and built-in corpus go in the run folder.
    args = ["--trainer-out", str(config.run_dir), "--trainer-name", config.name]
    switches = {"cpu": "--trainer-cpu", "progress": "--trainer-progress", "update_norms": "--trainer-update-norms"}
    return args + [flag for key, flag in switches.items() if t[key]] + list(t["extra_args"])


def program(config: Config) -> list[str]:
    """What torchrun starts: the module, and for Megatron-LM its pretrain_gpt.py."""
    if config.data["entry"] == "builtin":
        return ["-m", "megatron_spectra.train"]
    return ["-m", "megatron_spectra.megatron_lm", str(Path(config.data["megatron"]["path"] or "$MEGATRON_LM") / "pretrain_gpt.py")]


# torchrun is `python -m torch.distributed.run`; spelled so, it needs no console script on PATH.
# Locally: this very interpreter (a venv need not be activated). In a SLURM job: the job's
# python3, whose environment is the config's slurm.setup lines (`source venv/bin/activate`,
# `module load`): the login node's interpreter path may not exist on the compute nodes.
TORCHRUN = ["-m", "torch.distributed.run"]


def torchrun_args(config: Config, where: str) -> list[str]:
    nproc = fmt(config.data["parallel"]["gpus_per_node"])
    if where == "local":
        return [sys.executable, *TORCHRUN, "--standalone", "--nnodes", "1", "--nproc-per-node", nproc]
    if where == "slurm":  # one torchrun per node (srun --ntasks-per-node 1); c10d rendezvous on the first node
        return ["python3", *TORCHRUN, "--nnodes", Raw('"$SLURM_NNODES"'), "--nproc-per-node", nproc,
                "--rdzv-id", Raw('"$SLURM_JOB_ID"'), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", Raw('"$MASTER_ADDR:$MASTER_PORT"')]
    raise ValueError(f"where must be local or slurm, got {where!r}")


def to_command(config: Config, where: str = "local") -> list[str]:
    return torchrun_args(config, where) + program(config) + trainer_args(config)


def describe(config: Config) -> str:
    return f"{config.name}: {config.data['entry']} entry, {layout(config).describe()}"
