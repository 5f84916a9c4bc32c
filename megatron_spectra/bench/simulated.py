"""The models and layouts `spectra bench engine` runs on: the paper's GPT shapes (scaled),
and Megatron's TP x ZeRO-1 placement of their parameters, simulated per rank, with the byte
and FLOP baselines (Moonlight's all-gather, ZeRO-1's param all-gather, redundant clipping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ALIGN = 64  # Megatron's DistributedOptimizer starts every param at a multiple of 64 elements
FP32 = 4
RATIO_RANGE = (10.0, 100.0)  # s_max/c of the synthetic updates, log-uniform


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int

    def scaled(self, scale: int) -> "Model":
        dims = {"hidden": self.hidden, "ffn": self.ffn, "vocab": self.vocab}
        bad = [f"{k}={v}" for k, v in dims.items() if v % scale]
        if scale < 1 or bad:
            raise ValueError(f"--scale {scale} does not divide {self.name}'s {', '.join(bad) or 'dims'}")
        return Model(self.name, self.layers, self.hidden // scale, self.heads, self.ffn // scale, self.vocab // scale)


def _ffn_820m(hidden: int = 2048) -> int:
    return int(round(8 * hidden / 3 / 64)) * 64  # 8/3 x hidden to the nearest multiple of 64: 5440


MODELS = {
    "160m": Model("160m", 12, 768, 12, 2048, 50304),
    "820m": Model("820m", 12, 2048, 16, _ffn_820m(), 50304),
}


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    tp_dim: int | None  # Megatron partition_dim; None: replicated across TP

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_matrix(self) -> bool:
        return len(self.shape) == 2


def model_params(m: Model) -> list[Param]:
    """Megatron GPTModel's parameters in model.parameters() order (RMSNorm, SwiGLU, no biases,
    untied embedding and output layer)."""
    d, f, v = m.hidden, m.ffn, m.vocab
    params = [Param("embedding.word_embeddings.weight", (v, d), 0)]
    for i in range(m.layers):
        pre = f"decoder.layers.{i}."
        params += [
            Param(pre + "input_layernorm.weight", (d,), None),
            Param(pre + "self_attention.linear_qkv.weight", (3 * d, d), 0),
            Param(pre + "self_attention.linear_proj.weight", (d, d), 1),
            Param(pre + "pre_mlp_layernorm.weight", (d,), None),
            Param(pre + "mlp.linear_fc1.weight", (2 * f, d), 0),
            Param(pre + "mlp.linear_fc2.weight", (d, f), 1),
        ]
    params += [Param("decoder.final_layernorm.weight", (d,), None), Param("output_layer.weight", (v, d), 0)]
    return params


def update_like(params: list[Param], seed: int, c: float) -> list[torch.Tensor]:
    """Gaussian 'updates', each scaled so that s_max/c (|u|/c for a vector) is log-uniform in
    RATIO_RANGE (s_max of an m x n Gaussian ~ sigma (sqrt m + sqrt n)); the same on every rank."""
    out = []
    lo, hi = (math.log10(r) for r in RATIO_RANGE)
    for i, p in enumerate(params):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        ratio = 10 ** (lo + (hi - lo) * torch.rand((), generator=g).item())
        x = torch.randn(p.shape, generator=g)
        spread = math.sqrt(p.shape[0]) + math.sqrt(p.shape[1]) if p.is_matrix else math.sqrt(p.numel)
        out.append(x * (ratio * c / spread))
    return out


# ----------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    tp: int
    dp: int

    @property
    def world(self) -> int:
        return self.tp * self.dp


def default_layouts(worlds: list[int]) -> list[Layout]:
    """TP in 1, 2, 4, ... with DP >= 2: W=4 -> 1x4, 2x2; W=8 -> 1x8, 2x4, 4x2."""
    out = []
    for w in worlds:
        tp = 1
        while tp * 2 <= w:
            if w % tp == 0:
                out.append(Layout(tp, w // tp))
            tp *= 2
    return out


def tp_local_numel(p: Param, tp: int) -> int:
    return p.numel // tp if p.tp_dim is not None else p.numel


def buffer_layout(params: list[Param], layout: Layout) -> tuple[list[int], int]:
    """Start of every TP-local param in the flat buffer (reverse order, 64-aligned) and the
    buffer size (padded to a multiple of DP). The same on every TP rank."""
    starts, offset = [0] * len(params), 0
    for i in reversed(range(len(params))):
        starts[i] = -(-offset // ALIGN) * ALIGN
        offset = starts[i] + tp_local_numel(params[i], layout.tp)
    return starts, -(-offset // layout.dp) * layout.dp


def rank_placements(params, layout: Layout, rank: int, strategy: str):
    """This rank's Placement of every param: its TP block, narrowed to its DP range."""
    from ..engine import Placement

    tp_rank, dp_rank = rank % layout.tp, rank // layout.tp
    starts, total = buffer_layout(params, layout)
    shard = total // layout.dp
    r0, r1 = dp_rank * shard, (dp_rank + 1) * shard
    out = []
    for p, start in zip(params, starts):
        n = tp_local_numel(p, layout.tp)
        lo, hi = max(start, r0) - start, min(start + n, r1) - start
        flat = (lo, hi) if lo < hi else (0, 0)
        split = p.tp_dim is not None and layout.tp > 1
        out.append(
            Placement(
                p.shape,
                tp_dim=p.tp_dim if split else None,
                tp_size=layout.tp if split else 1,
                tp_block=tp_rank if split else 0,
                flat=flat,
                strategy=strategy if p.is_matrix else "auto",
            )
        )
    return out


# ----------------------------------------------------------------------------- baselines


def moonlight_bytes(params, layout: Layout) -> int:
    """Bytes one rank receives in Moonlight's PoC: the DP all-gather of its whole TP-local
    buffer and the TP all-gather of every TP-split matrix (fp32)."""
    _, total = buffer_layout(params, layout)
    dp_part = (layout.dp - 1) * total // layout.dp
    tp_part = sum((layout.tp - 1) * p.numel // layout.tp for p in params if p.tp_dim is not None)
    return FP32 * (dp_part + tp_part)


def zero1_bytes(params, layout: Layout) -> int:
    """Bytes one rank receives in ZeRO-1's own parameter all-gather (fp32)."""
    _, total = buffer_layout(params, layout)
    return FP32 * (layout.dp - 1) * total // layout.dp


def redundant_flops(params, updates, c: float, mode: str) -> float:
    """Matmul FLOPs of clipping every full tensor once, one by one, in this process."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..ops import soft_spectral_clip

    with FlopCounterMode(display=False) as counter:
        for u in updates:
            soft_spectral_clip(u, c, mode=mode)
    return float(counter.get_total_flops())
