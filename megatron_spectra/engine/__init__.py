"""The distributed clip engine: layouts and collectives, nothing of Megatron or FSDP.

Public entry points: `Placement` (where a local piece sits in its full tensor),
`ShardedClipper` / `clip_sharded` (clip many sharded tensors, each full matrix once).
"""

from .agreement import LayoutMismatch
from .exchange import comm_device
from .clip import ClipStats, NonFiniteInput, ShardedClipper, clip_sharded
from .placement import STRATEGIES, Placement, tensor_parallel, with_flat_range
from .plan import build_plan, clip_cost

__all__ = [
    "ClipStats",
    "LayoutMismatch",
    "NonFiniteInput",
    "Placement",
    "STRATEGIES",
    "ShardedClipper",
    "build_plan",
    "clip_cost",
    "clip_sharded",
    "comm_device",
    "tensor_parallel",
    "with_flat_range",
]
