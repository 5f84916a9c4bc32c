"""The built-in trainer at test size, the single-process reference run, and what only tests
need around it.

    argv = tiny_gpt(workdir, "run-a", tp=2, steps=10) + ["--optimizer", "spectra-adamw", ...]
    record = Record(finish=fingerprint)           # losses, skips, and what `finish` returns
    train(argv, init_model=NamedWeights(), on_step=record)   # in each of 4 spawned processes
    reference(argv, {"base": "adamw", ...})       # one process: the same model, data, steps

The model is the trainer's LLaMA-style GPT at tiny widths. Its weights do not come from
megatron's initialisation, whose random draws depend on which layers a pipeline stage
builds, but from `NamedWeights`: one full tensor per global parameter name, drawn from a
generator seeded by that name, of which each rank keeps its TP block the way megatron cuts
one (fc1 with stride 2: [gate_t; up_t]). So every layout trains one and the same model.
The data is the trainer's own: the built-in corpus through megatron-core's GPTDataset.
"""

from __future__ import annotations

import contextlib
import os
import zlib

import torch

# The trainer's GPT, tiny. The vocabulary (257 byte-level tokens) is padded to a multiple of
# 129 x TP: 258 at TP 1 and 2 alike; layouts compare equal only with equal models.
TINY_GPT = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --group-query-attention --num-query-groups 2 "
    "--ffn-hidden-size 64 --seq-length 16 --swiglu --normalization RMSNorm --norm-epsilon 1e-5 "
    "--position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear "
    "--hidden-dropout 0 --attention-dropout 0 --make-vocab-size-divisible-by 129 "
    "--lr-decay-style constant --eval-iters 0 --log-interval 1000 --trainer-cpu"
).split()
SEED = 1234


def tiny_gpt(workdir: str, name: str, *, tp: int = 1, pp: int = 1, steps: int = 10, global_batch: int = 8,
             micro_batch: int = 2) -> list[str]:
    """The trainer's flags for a tiny run named `name`. Every run under one `workdir` shares
    the built-in corpus and GPTDataset's index cache (built by the first)."""
    return TINY_GPT + [
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--train-iters", str(steps), "--global-batch-size", str(global_batch), "--micro-batch-size", str(micro_batch),
        "--trainer-out", workdir, "--trainer-name", name, "--data-cache-path", os.path.join(workdir, "cache"),
    ]


def train(argv: list[str], **hooks) -> dict:
    """The trainer's entry point, in a spawned test process (megatron's warnings silenced)."""
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_spectra.train.main import train as train_main

    return train_main(argv, **hooks)


# ----------------------------------------------------------------------------- hooks


class NamedWeights:
    """The Trainer's `init_model`: layout-independent weights, seeded by parameter name."""

    def __init__(self, seed: int = SEED):
        self.seed = seed

    @torch.no_grad()
    def __call__(self, module) -> None:
        from megatron.core import parallel_state as ps

        tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
        layer_offset = pp_rank * (module.config.num_layers // pp)
        for name, p in module.named_parameters():
            shape = list(p.shape)
            split = getattr(p, "tensor_model_parallel", False) and getattr(p, "partition_dim", -1) >= 0
            if split:
                shape[p.partition_dim] *= tp
            full = full_weight(global_name(name, layer_offset), tuple(shape), self.seed)
            if split:  # megatron's cut: tp x stride chunks, rank r keeps chunks r, r + tp, ...
                chunks = torch.chunk(full, tp * getattr(p, "partition_stride", 1), dim=p.partition_dim)
                full = torch.cat(chunks[tp_rank::tp], dim=p.partition_dim)
            p.copy_(full)


def global_name(name: str, layer_offset: int) -> str:
    """A stage's layer i is layer i + offset of the whole model."""
    if ".layers." not in name:
        return name
    head, rest = name.split(".layers.", 1)
    index, tail = rest.split(".", 1)
    return f"{head}.layers.{int(index) + layer_offset}.{tail}"


def full_weight(name: str, shape: tuple, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) ^ seed)
    if len(shape) == 1:  # norm gains around 1
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return 0.05 * torch.randn(shape, generator=g)


class Record:
    """The Trainer's `on_step`: every iteration's global loss and whether the step was taken,
    plus, after the last one, `finish(trainer)` (fingerprints of the end state). Returned
    from a spawned process, so it keeps plain data only."""

    def __init__(self, finish=None, also=None):
        self.finish, self.also = finish, also
        self.losses, self.successes, self.final = [], [], None

    def __call__(self, trainer, record) -> None:
        if record is not None:
            self.losses.append(record["lm_loss"])
            self.successes.append(not record["skipped"])
        if self.also is not None:
            self.also(trainer, record)
        if self.finish is not None and trainer.iteration == trainer.args.train_iters:
            self.final = self.finish(trainer)

    def result(self) -> dict:
        return {"losses": self.losses, "successes": self.successes, "final": self.final}


class NaNGradient:
    """Rank `rank`'s first weight matrix gets a NaN in its gradient during iteration `at`'s
    backward; every rank fingerprints its weights before iterations at, at + 1 and at + 2."""

    def __init__(self, at: int = 3, rank: int = 1):
        self.at, self.rank, self.weights = at, rank, []

    def __call__(self, trainer, record) -> None:
        module = trainer.model.module
        if trainer.iteration in (self.at, self.at + 1, self.at + 2):
            self.weights.append([p.detach().double().sum().item() for p in module.parameters()])
        if trainer.iteration == self.at and torch.distributed.get_rank() == self.rank:
            weight = next(p for p in module.parameters() if p.ndim == 2)
            handle = None

            def poison(grad):
                handle.remove()
                grad = grad.clone()
                grad.view(-1)[0] = float("nan")
                return grad

            handle = weight.register_hook(poison)


# ----------------------------------------------------------------------------- the reference


def reference(argv: list[str], spectra_kwargs: dict) -> list[float]:
    """The run `argv` describes, in this one process with the reference `Spectra` on the whole
    global batch: the same model (NamedWeights), the same GPTDataset batches in the same
    order, the same weight-decay split (none on 1-D params, embeddings and output layer unless
    --spectra-decay-embeddings), global grad-norm clipping and
    constant lr. Returns the loss of every iteration."""
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_spectra.optim import Spectra
    from megatron_spectra.train.args import padded_vocab_size, parse_args
    from megatron_spectra.train.data import build_datasets, build_tokenizer, ensure_builtin_corpus, micro_batches
    from megatron_spectra.train.model import build_model, forward_step

    args = parse_args(argv, world_size=1)
    with megatron_world():
        tokenizer = build_tokenizer(args)
        train_ds, _, _ = build_datasets(args, tokenizer, [ensure_builtin_corpus(args.trainer_out, tokenizer)])
        model = build_model(args, padded_vocab_size(tokenizer.vocab_size, args))
        NamedWeights()(model)
        named = list(model.named_parameters())
        # the paper's placement (spectra_decay_embeddings off): Linear weights only
        decayed = lambda n, p: p.ndim >= 2 and (args.spectra_decay_embeddings or not getattr(p, "is_embedding_or_output_parameter", False))  # noqa: E731
        groups = [
            {"params": [p for n, p in named if decayed(n, p)], "param_names": [n for n, p in named if decayed(n, p)],
             "weight_decay": args.weight_decay},
            {"params": [p for n, p in named if not decayed(n, p)], "param_names": [n for n, p in named if not decayed(n, p)],
             "weight_decay": 0.0},
        ]
        opt = Spectra(groups, lr=args.lr, **spectra_kwargs)
        losses = []
        for iteration in range(args.train_iters):
            parts = micro_batches(train_ds, iteration, args, 0)
            batch = {key: torch.cat([b[key] for b in parts]) for key in parts[0]}
            opt.zero_grad()
            output, loss_func = forward_step(iter([batch]), model)
            total, tokens, _ = loss_func(output)
            loss = total / tokens
            loss.backward()
            if opt.pre_clip_schedule is not None:
                opt.pre_clip_gradients()  # the official order: before global-norm clipping
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            opt.step()
            losses.append(loss.item())
    return losses


@contextlib.contextmanager
def megatron_world(tp: int = 1, pp: int = 1, seed: int = SEED, **parallel):
    """megatron on CPU with parallel_state for tp x pp (and `parallel`: initialize_model_parallel's
    expert_model_parallel_size, virtual_pipeline_model_parallel_size, ...) over the existing
    (gloo) default group, seeded; torn down afterwards."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    from megatron_spectra.megatron.cpu import megatron_on_cpu

    _router_without_te()
    with megatron_on_cpu():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, **parallel)
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        try:
            yield
        finally:
            get_cuda_rng_tracker().reset()
            parallel_state.destroy_model_parallel()


def _router_without_te() -> None:
    """megatron-core 0.16.1's MoE router asks `te_general_gemm is not None` in a module that
    only defines the name when Transformer Engine imports (NameError without TE); its own
    torch.mm fallback is what None selects."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
