"""A tiny LLaMA-style megatron-core GPT, the same model at any TP/PP/DP layout.

Used by the tests (against the single-process reference `Spectra`) and by the main job's
embedded default. The weights do not come from megatron's initialisation, whose random
draws depend on which layers a pipeline stage builds, but from `full_weights`: one full
tensor per global parameter name, drawn from a generator seeded by that name. Each rank
then loads its TP block the way megatron cuts one (fc1 with stride 2: [gate_t; up_t]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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

    def transformer_config(self, tp: int = 1, pp: int = 1, bf16: bool = False):
        from megatron.core.transformer import TransformerConfig

        return TransformerConfig(
            num_layers=self.layers, hidden_size=self.hidden, num_attention_heads=self.heads,
            num_query_groups=self.query_groups, ffn_hidden_size=self.ffn,
            gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", layernorm_epsilon=1e-5,
            add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            use_cpu_initialization=True, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
            pipeline_dtype=torch.bfloat16 if bf16 else torch.float32, sequence_parallel=False,
        )


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 1234) -> None:
    """megatron parallel_state on the already initialised (gloo) default group."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def build_model(spec: TinyGPT, tp: int = 1, pp: int = 1, bf16: bool = False):
    """This rank's pipeline stage of the GPT (same weights at every layout for one seed)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(spec.seed)
    config = spec.transformer_config(tp, pp, bf16)
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
    return model.to(torch.bfloat16) if bf16 else model


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
