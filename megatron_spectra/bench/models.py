"""The FSDP benchmark's model: a small LLaMA-style model and the FSDP2 / HSDP / TP layouts
it is trained in (`spectra bench fsdp`; the torchtitan CPU example and the FSDP tests reuse it).

    model = TinyLlama(LlamaConfig())            # same weights on every rank (seeded)
    dp_rank, dp_size = parallelize(model, "fsdp_tp", world)
    x, y = batch(step, LlamaConfig(), global_batch=8)

Layouts: "fsdp" (FSDP2 over all ranks), "hsdp" (replicate 2 x shard world/2), "fsdp_tp"
(FSDP over dp = world/2 x ColwiseParallel/RowwiseParallel over tp = 2, torchtitan's plan:
attention and MLP, vocab-parallel embedding and output, norms replicated over TP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYOUTS = ("fsdp", "hsdp", "fsdp_tp")


@dataclass(frozen=True)
class LlamaConfig:
    dim: int = 32
    n_layers: int = 2
    n_heads: int = 4
    ffn_dim: int = 64
    vocab: int = 64
    seq: int = 16
    eps: float = 1e-5


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, cos, sin):
    """Rotary embedding on (batch, seq, heads, head_dim), halves rotated (GPT-NeoX style)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(cfg.dim, cfg.dim, bias=False) for _ in range(4))

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        # -1 heads: under TP each rank holds only its heads
        q, k, v = (w(x).view(b, s, -1, self.head_dim) for w in (self.wq, self.wk, self.wv))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm, self.ffn_norm = RMSNorm(cfg.dim, cfg.eps), RMSNorm(cfg.dim, cfg.eps)
        self.attention, self.feed_forward = Attention(cfg), FeedForward(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class TinyLlama(nn.Module):
    """Untied embedding and output layer, RMSNorm, SwiGLU, RoPE; weights seeded by `seed`."""

    def __init__(self, cfg: LlamaConfig = LlamaConfig(), seed: int = 0):
        super().__init__()
        gen = torch.random.fork_rng()
        with gen:
            torch.manual_seed(seed)
            self.tok_embeddings = nn.Embedding(cfg.vocab, cfg.dim)
            self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.dim, cfg.eps)
            self.output = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        half = cfg.dim // cfg.n_heads // 2
        angles = torch.outer(torch.arange(cfg.seq, dtype=torch.float32), 10000.0 ** (-torch.arange(half) / half))
        self.register_buffer("cos", angles.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", angles.sin()[None, :, None, :], persistent=False)

    def forward(self, tokens):
        s = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.cos[:, :s], self.sin[:, :s])
        return self.output(self.norm(h))


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def batch(step: int, cfg: LlamaConfig, global_batch: int):
    """(inputs, labels) of the whole step, the same on every rank."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, cfg.vocab, (global_batch, cfg.seq + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def param_groups(model: nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """The paper's split: weight decay on Linear weights in the blocks, none on embedding,
    output layer and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if name.startswith("layers.") and "norm" not in name else no_decay).append((name, p))
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def parallelize(model: TinyLlama, layout: str, world: int, device: str = "cpu") -> tuple[int, int]:
    """Shard `model` in place; returns (data-parallel rank, data-parallel size) for the batch."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    if layout == "fsdp":
        mesh = init_device_mesh(device, (world,), mesh_dim_names=("dp_shard",))
        _fully_shard(model, mesh, fully_shard)
        return rank, world
    if layout == "hsdp":
        mesh = init_device_mesh(device, (2, world // 2), mesh_dim_names=("dp_replicate", "dp_shard"))
        _fully_shard(model, mesh, fully_shard)
        return rank, world
    if layout == "fsdp_tp":
        mesh = init_device_mesh(device, (world // 2, 2), mesh_dim_names=("dp", "tp"))
        tensor_parallel(model, mesh["tp"])
        _fully_shard(model, mesh["dp"], fully_shard)
        return mesh["dp"].get_local_rank(), world // 2
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def _fully_shard(model, mesh, fully_shard) -> None:
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def tensor_parallel(model: TinyLlama, tp_mesh) -> None:
    """torchtitan's LLaMA plan without sequence parallelism."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
            "output": ColwiseParallel(output_layouts=Replicate()),
        },
    )
    for layer in model.layers:
        plan = {f"attention.{w}": ColwiseParallel() for w in ("wq", "wk", "wv")}
        plan.update({"attention.wo": RowwiseParallel(), "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel()})
        plan["feed_forward.w2"] = RowwiseParallel()
        parallelize_module(layer, tp_mesh, plan)
