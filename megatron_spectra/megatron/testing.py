"""Test scaffolding for megatron-core on CPU processes: a tiny LLaMA-style GPT that is the
same model at any TP/PP/DP layout, parallel_state set-up and teardown, and a runner that
starts a world of N gloo processes with megatron switched to CPU.

    def work(rank, world, steps):            # module level: it is pickled into the children
        model = build_model(TinyGPT(), tp=2)  # parallel_state is already initialised
        ...
    results = run_megatron(work, tp=2, dp=2, args=(5,))  # 4 processes, results in rank order

The weights do not come from megatron's initialisation, whose random draws depend on which
layers a pipeline stage builds, but from `full_weights`: one full tensor per global
parameter name, drawn from a generator seeded by that name. Each rank then loads its TP
block the way megatron cuts one (fc1 with stride 2: [gate_t; up_t]). So every rank builds
its part of one and the same model, whatever the layout (DDP does not broadcast parameters).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..launch.spawn import DistributedFailure, free_port, run_distributed

__all__ = [
    "DistributedFailure", "TinyGPT", "batches", "build_model", "free_port", "init_parallel", "lm_forward_step",
    "megatron_world", "run_distributed", "run_megatron", "setup_megatron", "teardown_parallel",
]


@dataclass(frozen=True)
class TinyGPT:
    layers: int = 2
    hidden: int = 32
    heads: int = 4
    query_groups: int = 2
    ffn: int = 64
    vocab: int = 64
    seq: int = 16
    seed: int = 1234

    def transformer_config(self, tp: int = 1, pp: int = 1, bf16: bool = False, fp16: bool = False):
        from megatron.core.transformer import TransformerConfig

        dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
        return TransformerConfig(
            num_layers=self.layers, hidden_size=self.hidden, num_attention_heads=self.heads,
            num_query_groups=self.query_groups, ffn_hidden_size=self.ffn,
            gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", layernorm_epsilon=1e-5,
            add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            use_cpu_initialization=True, bf16=bf16, fp16=fp16, params_dtype=dtype,
            pipeline_dtype=dtype, sequence_parallel=False,
        )


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, dp: int | None = None) -> None:
    """megatron parallel_state on the already initialised (gloo) default group; DP is what is
    left of the world (checked against `dp` if given). Seeds torch and megatron's TP RNG
    tracker with `seed` on every rank, so megatron's own initialisation agrees across DP."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    world = torch.distributed.get_world_size()
    if world % (tp * pp) or (dp is not None and tp * pp * dp != world):
        raise ValueError(f"tp={tp} x pp={pp} x dp={dp} does not make a world of {world} processes")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def teardown_parallel() -> None:
    """Forget megatron's parallel state (its groups, memory buffer and RNG tracker states)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    get_cuda_rng_tracker().reset()
    parallel_state.destroy_model_parallel()


@contextlib.contextmanager
def megatron_world(tp: int = 1, pp: int = 1, dp: int | None = None, seed: int = 1234):
    """`init_parallel` ... `teardown_parallel`, with megatron switched to CPU meanwhile.
    Needs the default process group (gloo) to exist already, as in `run_megatron`'s children."""
    from .cpu import megatron_on_cpu

    with megatron_on_cpu():
        init_parallel(tp, pp, seed, dp)
        try:
            yield
        finally:
            teardown_parallel()


def setup_megatron(tp: int = 1, pp: int = 1, dp: int | None = None, seed: int | None = None,
                   spec: TinyGPT | None = None, bf16: bool = False, fp16: bool = False):
    """parallel_state for tp x pp x dp, seeded, and this rank's part of the tiny GPT (the same
    model on every rank and at every layout for one seed). `seed` overrides `spec.seed`.
    Megatron must already be on CPU (`enable_megatron_cpu` or `megatron_world`)."""
    from dataclasses import replace

    spec = spec or TinyGPT()
    if seed is not None:
        spec = replace(spec, seed=seed)
    init_parallel(tp, pp, spec.seed, dp)
    return build_model(spec, tp, pp, bf16, fp16)


def _megatron_child(rank: int, world: int, fn, tp: int, pp: int, seed: int, args: tuple):
    import warnings

    warnings.filterwarnings("ignore")  # megatron warns about apex/TE and deprecations on every rank
    with megatron_world(tp, pp, world // (tp * pp), seed):
        return fn(rank, world, *args)


def run_megatron(fn, tp: int = 1, pp: int = 1, dp: int = 1, args: tuple = (), seed: int = 1234,
                 timeout: float = 300.0) -> list:
    """Run `fn(rank, world, *args)` in tp*pp*dp spawned gloo processes, each with megatron on
    CPU and parallel_state initialised (seeded with `seed`) and torn down around the call.
    `fn` must be importable (module level). Returns the results in rank order; a child's
    exception is re-raised as DistributedFailure with its traceback; never waits past `timeout`."""
    return run_distributed(_megatron_child, tp * pp * dp, args=(fn, tp, pp, seed, args), timeout=timeout)


def build_model(spec: TinyGPT, tp: int = 1, pp: int = 1, bf16: bool = False, fp16: bool = False):
    """This rank's pipeline stage of the GPT (same weights at every layout for one seed)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(spec.seed)
    config = spec.transformer_config(tp, pp, bf16, fp16)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=spec.vocab,
        max_sequence_length=spec.seq,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    load_full_weights(model, spec, tp, pp)
    return model.to(config.params_dtype)


def lm_forward_step(data_iterator, model):
    """A `forward_step_func` for megatron's pipeline schedules: next-token loss on a batch of
    (micro_batch, seq + 1) tokens, as in `batches`."""
    tokens = next(data_iterator)
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
    output = model(inputs, positions, None, labels=labels)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach()}

    return output, loss_func


def global_name(name: str, spec: TinyGPT, pp: int) -> str:
    """A stage's layer i is layer i + offset of the whole model."""
    from megatron.core import parallel_state

    if ".layers." not in name:
        return name
    head, rest = name.split(".layers.", 1)
    index, tail = rest.split(".", 1)
    offset = parallel_state.get_pipeline_model_parallel_rank() * (spec.layers // pp)
    return f"{head}.layers.{int(index) + offset}.{tail}"


def full_weights(name: str, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash_name(name) ^ seed)
    if len(shape) == 1:  # norm gains around 1
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return 0.05 * torch.randn(shape, generator=g)


def hash_name(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


@torch.no_grad()
def load_full_weights(model, spec: TinyGPT, tp: int, pp: int) -> None:
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    for name, p in model.named_parameters():
        shape = list(p.shape)
        split = getattr(p, "tensor_model_parallel", False) and getattr(p, "partition_dim", -1) >= 0
        if split:
            shape[p.partition_dim] *= tp
        full = full_weights(global_name(name, spec, pp), tuple(shape), spec.seed)
        if split:
            stride = getattr(p, "partition_stride", 1)
            chunks = torch.chunk(full, tp * stride, dim=p.partition_dim)
            full = torch.cat(chunks[rank::tp], dim=p.partition_dim)
        p.copy_(full)


def batches(spec: TinyGPT, steps: int, global_batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Token batches (global_batch, seq + 1) from a fixed generator: the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, spec.vocab, (global_batch, spec.seq + 1), generator=g) for _ in range(steps)]
