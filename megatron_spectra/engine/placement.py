"""Where a process's local piece of a weight sits in the full (global) tensor.

One description covers every layout the adapters produce:

- tensor parallelism: the full matrix is cut into `tp_size` equal blocks along `tp_dim`
  (0: column-parallel, QKV, fc1, vocab-parallel embedding and output; 1: row-parallel, proj,
  fc2), and this process holds block `tp_block`;
- ZeRO-1 (Megatron's DistributedOptimizer) and FSDP2 `Shard(0)`: of that block, only the
  contiguous range `flat` of its row-major flattening (a row range is the special case
  [r0·n, r1·n)); ranges start and end mid-row, and may be empty;
- replication: several processes hold the same range (plain DDP, TP-replicated norms);
- vectors (1-D params): a (1, n) matrix; a TP split of one (tp_dim 0 or 1) cuts its columns.

`row_parts` describes fused sub-matrices, clipped separately: the rows of the full matrix
repeat with period sum(row_parts), and part j is rows [offset_j, offset_j + row_parts[j]) of
every period. Megatron's interleaved QKV is row_parts = (q, k, v) per query group (q = heads
per group x head dim); SwiGLU fc1 under TP=t is (f/t, f/t), since each TP block is
[gate_t; up_t]. Default: the whole matrix, as in the official code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

STRATEGIES = ("auto", "owner", "gram")


@dataclass(frozen=True)
class Placement:
    shape: tuple[int, ...]
    tp_dim: int | None = None
    tp_size: int = 1
    tp_block: int = 0
    flat: tuple[int, int] | None = None
    row_parts: tuple[int, ...] | None = None
    strategy: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.flat is not None:
            object.__setattr__(self, "flat", (int(self.flat[0]), int(self.flat[1])))
        if self.row_parts is not None:
            object.__setattr__(self, "row_parts", tuple(int(p) for p in self.row_parts))
        if len(self.shape) == 1 and self.tp_dim == 0:  # a vector's only dim is its columns
            object.__setattr__(self, "tp_dim", 1)
        self.validate()

    # ------------------------------------------------------------------ geometry

    @property
    def is_vector(self) -> bool:
        return len(self.shape) == 1

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(rows, cols) of the full tensor seen as a matrix; a vector is one row."""
        return (1, self.shape[0]) if self.is_vector else (self.shape[0], self.shape[1])

    @property
    def block_shape(self) -> tuple[int, int]:
        rows, cols = self.matrix_shape
        if self.tp_dim == 0:
            return rows // self.tp_size, cols
        if self.tp_dim == 1:
            return rows, cols // self.tp_size
        return rows, cols

    @property
    def block_numel(self) -> int:
        return self.block_shape[0] * self.block_shape[1]

    @property
    def range(self) -> tuple[int, int]:
        """The held range of the block's row-major flattening."""
        return self.flat if self.flat is not None else (0, self.block_numel)

    @property
    def local_numel(self) -> int:
        start, end = self.range
        return end - start

    @property
    def num_blocks(self) -> int:
        return self.tp_size if self.tp_dim is not None else 1

    def piece_of(self, full: torch.Tensor) -> torch.Tensor:
        """This process's piece of the full tensor (a new tensor): its flat range of its TP block."""
        start, end = self.range
        return self._block(full.reshape(self.matrix_shape)).reshape(-1)[start:end].clone()

    def embed(self, piece: torch.Tensor) -> torch.Tensor:
        """The full tensor (`shape`) with `piece` where this process's piece sits and zeros
        elsewhere; the embedded pieces of processes that hold disjoint ranges sum to it."""
        full = piece.new_zeros(self.matrix_shape)
        block = piece.new_zeros(self.block_numel)
        start, end = self.range
        block[start:end] = piece.reshape(-1)
        self._block(full).copy_(block.view(self.block_shape))
        return full.view(self.shape)

    def _block(self, matrix: torch.Tensor) -> torch.Tensor:
        """This process's TP block of the full matrix (a view)."""
        rows, cols = self.block_shape
        b = self.tp_block
        if self.tp_dim == 0:
            return matrix[b * rows : (b + 1) * rows]
        if self.tp_dim == 1:
            return matrix[:, b * cols : (b + 1) * cols]
        return matrix

    def validate(self) -> None:
        if len(self.shape) not in (1, 2) or min(self.shape) < 0:
            raise ValueError(f"a placement's shape must be 1-D or 2-D, got {self.shape}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; expected one of {STRATEGIES}")
        if self.tp_dim is not None:
            if self.tp_dim not in (0, 1) or (self.is_vector and self.tp_dim != 1):
                raise ValueError(f"tp_dim must be 0 or 1 for a matrix (1 for a vector), got {self.tp_dim}")
            if self.tp_size < 1 or self.matrix_shape[self.tp_dim] % self.tp_size:
                raise ValueError(f"dim {self.tp_dim} of {self.shape} does not split into {self.tp_size} equal blocks")
            if not 0 <= self.tp_block < self.tp_size:
                raise ValueError(f"tp_block {self.tp_block} outside [0, {self.tp_size})")
        elif self.tp_size != 1 or self.tp_block != 0:
            raise ValueError("tp_size/tp_block given without tp_dim")
        start, end = self.range
        if not 0 <= start <= end <= self.block_numel:
            raise ValueError(f"flat range {self.flat} outside the block of {self.block_numel} elements")
        if self.row_parts is not None:
            period = sum(self.row_parts)
            if self.is_vector or min(self.row_parts) <= 0:
                raise ValueError(f"row_parts {self.row_parts} need a matrix and positive sizes")
            if self.block_shape[0] % period or (self.tp_dim == 1 and self.matrix_shape[0] % period):
                raise ValueError(
                    f"row_parts {self.row_parts} (period {period}) do not tile the {self.block_shape[0]} rows of each block"
                )

    def global_fields(self) -> tuple:
        """What every process must agree on (everything but which piece it holds)."""
        return (self.shape, self.tp_dim, self.tp_size, self.row_parts, self.strategy)


def tensor_parallel(shape: Sequence[int], dim: int | None, size: int, block: int, **kw) -> Placement:
    """The whole TP-local block `block` of a tensor split into `size` blocks along `dim`."""
    if dim is None or size == 1:
        return Placement(tuple(shape), **kw)
    return Placement(tuple(shape), tp_dim=dim, tp_size=size, tp_block=block, **kw)


def with_flat_range(p: Placement, start: int, end: int) -> Placement:
    """Narrow a placement to a flat range of its block (ZeRO-1, FSDP2 rows)."""
    base = p.range[0]
    return Placement(p.shape, p.tp_dim, p.tp_size, p.tp_block, (base + start, base + end), p.row_parts, p.strategy)
