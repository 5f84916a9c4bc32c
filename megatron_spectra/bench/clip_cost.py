"""What a clip costs each rank under an engine plan: matmul FLOPs, launches and bytes moved.

    line, square = products("paper")              # counted from soft_spectral_clip itself
    work = rank_work(plan, (line, square))        # one RankWork per rank

Per matrix k x n (k the short side), `line` products of 2·k²·n (the Gram and the final
product) and `square` products of 2·k³ (Newton-Schulz). An owner batches its same-shape
matrices into one bmm per product; a Gram matrix's line products run on every holder, its
root's products on its root rank. Bytes are the plan's all-to-all moves (fp32) each way,
split into NVLink (same node) and InfiniBand (other nodes). `spectra bench cluster`
(cluster.py) turns these into seconds.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass

GPUS_PER_NODE = 8
FP32 = 4


@functools.lru_cache(maxsize=None)
def products(mode: str, ratio: float = 30.0) -> tuple[int, int]:
    """(line products 2·k²·n, square products 2·k³) of one SSC of a wide k x n matrix, counted
    from the code (`soft_spectral_clip`) on a 16 x 64 matrix with singular values log-spaced
    over five decades up to s_max = ratio·c. Paper mode (bf16) does not depend on the ratio:
    the official 2 + 3 x 10, less the products our iteration leaves out as exact."""
    import torch

    from ..ops import soft_spectral_clip

    k, n = 16, 64
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(k, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    x = (u * torch.logspace(0, -5, k) * ratio) @ v.T
    x = x.bfloat16() if mode == "paper" else x.float()
    shapes = matmul_shapes(lambda: soft_spectral_clip(x, 1.0, mode=mode))
    line = sum(1 for s in shapes if n in s)
    return line, len(shapes) - line


def matmul_shapes(fn) -> list[tuple[int, int, int]]:
    """(m, k, n) of every mm/bmm that `fn` runs, as it reaches the dispatcher."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    mm = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default}
    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in mm:
                a, b = args[-2], args[-1]
                seen.append((a.shape[-2], a.shape[-1], b.shape[-1]))
            return func(*args, **(kwargs or {}))

    with Spy():
        fn()
    return seen


def clip_flops(k: int, n: int, mode_products: tuple[int, int]) -> float:
    line, square = mode_products
    return 2.0 * line * k * k * n + 2.0 * square * k**3


@dataclass
class RankWork:
    flops: float = 0.0
    matmuls: int = 0
    nvlink_bytes: tuple[int, int] = (0, 0)  # (sent, received), both all-to-alls
    ib_bytes: tuple[int, int] = (0, 0)


def rank_work(plan, mode_products: tuple[int, int]) -> list[RankWork]:
    """Each rank's clip FLOPs, matmul launches and all-to-all bytes under `plan`."""
    from ..engine.plan import gram_k, matrix_parts

    work = [RankWork() for _ in range(plan.world)]
    owned = [defaultdict(int) for _ in range(plan.world)]  # rank -> wide shape -> matrices
    per_matrix = sum(mode_products)
    for tp in plan.tensors:
        p = tp.placement
        if p.is_vector:
            continue
        if tp.strategy == "owner":
            rank = tp.units[0].rank
            for rows, cols in matrix_parts(p):
                k, n = min(rows, cols), max(rows, cols)
                work[rank].flops += clip_flops(k, n, mode_products)
                owned[rank][(k, n)] += 1
        else:  # Gram: lines split over their holders, each k x k root on its root rank
            k, parts = gram_k(p), len(matrix_parts(p))
            line, square = mode_products
            for r in range(plan.world):
                mine = sum(u.end - u.start for u in tp.units if u.rank == r)
                work[r].flops += 2.0 * line * k * mine
                work[r].matmuls += line * parts
            work[tp.root].flops += parts * 2.0 * square * k**3
            work[tp.root].matmuls += parts * square
    for r, shapes in enumerate(owned):
        work[r].matmuls += per_matrix * len(shapes)  # one batched product per shape group
    sent = [[0, 0] for _ in range(plan.world)]  # [nvlink, ib]
    received = [[0, 0] for _ in range(plan.world)]
    for m in plan.forward + plan.backward:
        if m.src != m.dst:
            link = int(m.src // GPUS_PER_NODE != m.dst // GPUS_PER_NODE)
            sent[m.src][link] += FP32 * m.length
            received[m.dst][link] += FP32 * m.length
    for r, w in enumerate(work):
        w.nvlink_bytes = (sent[r][0], received[r][0])
        w.ib_bytes = (sent[r][1], received[r][1])
    return work


def gram_allreduce_bytes(plan) -> int:
    """fp32 bytes each rank moves in the ring all-reduces of the Gram-strategy k x k Grams
    and of their factors (computed on each matrix's root rank, shared as a sum)."""
    from ..engine.plan import gram_k, matrix_parts

    total = 0
    for tp in plan.tensors:
        if tp.strategy == "gram" and not tp.placement.is_vector:
            total += 2 * FP32 * gram_k(tp.placement) ** 2 * len(matrix_parts(tp.placement))
    return int(2 * (plan.world - 1) / plan.world * total)
