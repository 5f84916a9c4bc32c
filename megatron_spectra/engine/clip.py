"""Soft spectral clipping of tensors that live in pieces across processes.

    clipper = ShardedClipper(group, ClipNumerics("accurate"))
    outputs = clipper.clip(local_pieces, placements, thresholds, names)

Every process passes its local piece of every tensor (the same tensors, in the same order,
with their `Placement`), and gets back its piece of H_c(full tensor): each full matrix is
clipped once (by its owner, or by the holders of its lines with a Gram all-reduce), never
on every process. Per call: an 8-int all-gather to check that the processes agree and none
has bad input; one all-to-all to the compute layout, which also carries every process's
share of each vector's |u|²; the clips (same-shape owner matrices batched), with one
all-reduce for all Gram matrices and one for their k x k factors, each computed by the
matrix's root rank (one pair per stage in accurate mode's rare multi-stage case; none
without Gram matrices); and one all-to-all back, which also carries whether every result is
finite. Owners and roots are balanced by FLOPs, with the k x k products of the mode's
Newton-Schulz (accurate mode: its typical step count).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ..ops.finite import finite_flags
from ..ops.reducer import Reducer
from ..ops.soft_clip import ClipNumerics, clip_vector, clip_wide
from .agreement import (
    FINE, LayoutMismatch, check_problems, encode, fingerprint, gather_fingerprints, gather_layouts, local_problem,
    remote_placements,
)
from .exchange import Exchange
from .placement import Placement
from .plan import ACCURATE_PRODUCTS, PAPER_PRODUCTS, Plan, TensorPlan, build_plan


class NonFiniteInput(ValueError):
    """Raised on every process when any process passes inf/NaN to the engine."""


@dataclass
class ClipStats:
    """What one call cost this process: elements are fp32 (4 bytes)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    allreduce_bytes: int = 0  # payload of the Gram and norm all-reduces
    clip_flops: float = 0.0  # matmul FLOPs of the clips computed here (with count_flops)
    seconds: float = 0.0
    strategies: dict[str, int] = field(default_factory=dict)


class GroupReducer(Reducer):
    """Sums (maxes) many tensors with one all-reduce over a flat buffer."""

    local = False

    def __init__(self, group, stats: ClipStats, meanwhile: Callable[[], None] | None = None):
        super().__init__(meanwhile)
        self.group, self.stats = group, stats

    def sum_(self, tensors):
        self._reduce(tensors, dist.ReduceOp.SUM)

    def max_(self, tensors):
        self._reduce(tensors, dist.ReduceOp.MAX)

    def _reduce(self, tensors, op):
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        self.stats.allreduce_bytes += 4 * flat.numel()
        dist.all_reduce(flat, op=op, group=self.group)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


class ShardedClipper:
    """Clips sharded tensors; caches the plan for as long as the layout stays the same."""

    def __init__(self, group=None, numerics: ClipNumerics = ClipNumerics(), count_flops: bool = False):
        self.group, self.numerics, self.count_flops = group, numerics, count_flops
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self._key, self._plan, self._exchanges, self._vector_runs = None, None, None, []
        self.stats = ClipStats()
        self.results_finite = False  # the last call's results, on every process: see `clip`

    def clip(
        self,
        tensors: Sequence[torch.Tensor],
        placements: Sequence[Placement],
        thresholds: float | Sequence[float],
        names: Sequence[str] | None = None,
        also_check: Sequence[torch.Tensor] = (),
    ) -> list[torch.Tensor]:
        """Every process's piece of H_c of every tensor. Inf/NaN in any process's `tensors` or
        `also_check` (tensors the caller does not clip but checks with these) raises
        NonFiniteInput on every process; afterwards `results_finite` says, alike everywhere,
        whether every result is finite (paper mode's arithmetic can overflow)."""
        start = time.perf_counter()
        names = list(names) if names is not None else [f"tensor{i}" for i in range(len(tensors))]
        thresholds = [float(thresholds)] * len(tensors) if isinstance(thresholds, (int, float)) else list(thresholds)
        # Checked here but raised in the agreement step, on every process at once: raising
        # alone would leave the others blocked in its first collective.
        problem = local_problem(tensors, placements, names, thresholds)
        self.stats, self.results_finite = ClipStats(), False
        device = tensors[0].device if tensors else torch.device("cpu")
        local = torch.cat([t.reshape(-1).float() for t in tensors]) if tensors else torch.zeros(0, device=device)
        finite = bool(finite_flags([local, *also_check]).all())
        plan = self._plan_for(placements, names, thresholds, finite, device, problem)
        forward, backward = self._exchanges
        # The vector rule needs only |u|²: each process's share of every vector's sum of
        # squares goes out with the data (as float64 bits), so no collective waits mid-clip.
        shares = self._vector_shares(local)
        workspace, everyone = forward.run_with(local, shares.view(torch.float32), self.group)
        vector_sumsq = everyone.reshape(-1).view(torch.float64).view(self.world, -1).sum(dim=0)  # alike everywhere
        self._compute(workspace, plan, thresholds, [t.dtype for t in tensors], vector_sumsq)
        # Whether this process's results are finite goes back with them: one element more to
        # each peer in the same all-to-all, where a check of its own would be one more collective.
        mine = finite_flags([workspace]).all().to(workspace.dtype).reshape(1)
        result, everyone = backward.run_with(workspace, mine, self.group)
        self.results_finite = bool(everyone.all())
        self.stats.bytes_sent = 4 * (forward.elements_sent + backward.elements_sent)
        self.stats.bytes_received = 4 * (forward.elements_received + backward.elements_received)
        self.stats.seconds = time.perf_counter() - start
        outs, offset = [], 0
        for t in tensors:
            outs.append(result[offset : offset + t.numel()].view_as(t).to(t.dtype))
            offset += t.numel()
        return outs

    # ------------------------------------------------------------------ planning

    def _plan_for(self, placements, names, thresholds, finite: bool, device, problem=FINE) -> Plan:
        encoded = encode(placements, names) if problem == FINE else encode([], [])
        fp = fingerprint(encoded, thresholds if problem == FINE else [], finite, problem)
        if self.world == 1:
            fingerprints = [tuple(fp.tolist())]
        else:
            fingerprints = gather_fingerprints(fp, self.group, self.world, device)
        check_problems(fingerprints, names)
        if not all(fp[3] for fp in fingerprints):
            bad = [r for r, fp in enumerate(fingerprints) if not fp[3]]
            raise NonFiniteInput(f"the clip engine got inf/NaN input on rank(s) {bad}; nothing was changed")
        if len({fp[2] for fp in fingerprints}) > 1 and len({fp[1] for fp in fingerprints}) == 1:
            raise LayoutMismatch("processes pass different clipping thresholds to the clip engine")
        key = tuple((fp[0], fp[1]) for fp in fingerprints)
        if key != self._key:
            if self.world == 1:
                layouts = [encoded]
            else:
                layouts = gather_layouts(encoded, fingerprints, names, self.group, self.world, device)
            everyone = [remote_placements(placements, layout) for layout in layouts]
            paper = self.numerics.mode == "paper"
            self._plan = build_plan(everyone, paper=paper, products=PAPER_PRODUCTS if paper else ACCURATE_PRODUCTS)
            ws_size = self._plan.workspace_sizes[self.rank]
            self._exchanges = (
                Exchange.build(self._plan.forward, self.rank, self.world, ws_size),
                Exchange.build(self._plan.backward, self.rank, self.world, self._plan.local_sizes[self.rank]),
            )
            self._vector_runs = self._my_vector_runs(self._plan, placements)
            self._key = key
        return self._plan

    def _my_vector_runs(self, plan: Plan, placements) -> list[list[tuple[int, int]]]:
        """Per vector (in plan order): where this process's units of it lie in its local
        buffer. A vector's lines (elements) stay with their holders, so its units are local."""
        runs = []
        for tp in plan.tensors:
            if tp.placement.is_vector:
                base = plan.local_offsets[self.rank][tp.index] - placements[tp.index].range[0]
                runs.append([(base + u.start, u.end - u.start) for u in tp.units if u.rank == self.rank])
        return runs

    def _vector_shares(self, local: torch.Tensor) -> torch.Tensor:
        """This process's part of every vector's sum of squares, in float64, summed over its
        units in workspace order (as the clip would sum its workspace view)."""
        sums = [torch.cat([local[o : o + n] for o, n in runs]).double().square().sum() if runs
                else local.new_zeros((), dtype=torch.float64) for runs in self._vector_runs]
        return torch.stack(sums) if sums else local.new_zeros(0, dtype=torch.float64)

    # ------------------------------------------------------------------ compute

    def _compute(self, workspace: torch.Tensor, plan: Plan, thresholds: list[float], dtypes: list[torch.dtype],
                 vector_sumsq: torch.Tensor) -> None:
        counter = _flop_counter() if self.count_flops else None
        with counter if counter is not None else contextlib.nullcontext():
            owner, gram, vectors = [], [], []
            for tp in plan.tensors:
                region = plan.workspace_offsets[self.rank].get(tp.index)
                if region is None:
                    continue
                view = workspace[region[0] : region[0] + region[1]]
                if tp.placement.is_vector:
                    vectors.append((view, thresholds[tp.index], dtypes[tp.index]))
                elif tp.strategy == "owner":
                    owner.extend(_owner_matrices(view, tp, thresholds[tp.index]))
                else:
                    parts = _gram_matrices(view, tp, plan, self.rank, thresholds[tp.index])
                    gram.extend(replace(m, root=tp.root == self.rank) for m in parts)
                self.stats.strategies[tp.strategy] = self.stats.strategies.get(tp.strategy, 0) + 1
            # The owners' clips run inside the Gram matrices' clip, between their Gram and their
            # factor all-reduce (with the roots of the Gram matrices this process computes):
            # after the factor exchange every process would wait for the busiest root rank.
            owned = lambda: self._clip_owned(owner)  # noqa: E731
            reducer = GroupReducer(self.group, self.stats, owned) if self.world > 1 else Reducer(owned)
            _clip_and_write(gram, self.numerics, reducer, batch=False)
            reducer.catch_up()
            self._clip_vectors(vectors, vector_sumsq)
        if counter is not None:
            self.stats.clip_flops = float(counter.get_total_flops())

    def _clip_owned(self, matrices) -> None:
        """Same-shape matrices of this owner go through one batched clip."""
        by_shape = defaultdict(list)
        for m in matrices:
            by_shape[tuple(m.wide_shape)].append(m)
        for group in by_shape.values():
            _clip_and_write(group, self.numerics, Reducer(), batch=True)

    def _clip_vectors(self, vectors, sumsq: torch.Tensor) -> None:
        """The vector rule on this process's units, with every vector's global |u|²."""
        for (v, c, dtype), s in zip(vectors, sumsq.sqrt()):
            # In the caller's dtype, as the official rule computes (the workspace is fp32).
            v.copy_(clip_vector(v.to(dtype), c, self.numerics, s) if c > 0 else torch.zeros_like(v))


# ----------------------------------------------------------------------------- matrices


@dataclass
class _Matrix:
    """A matrix to clip, in wide orientation, and how to write its result back."""

    wide: torch.Tensor  # (k, n) view or copy
    threshold: float
    write: Callable[[torch.Tensor], None]  # puts the (wide) result where it belongs
    root: bool = True  # a Gram matrix: this process computes its k x k factor

    @property
    def wide_shape(self):
        return self.wide.shape


def _clip_and_write(matrices: list[_Matrix], numerics: ClipNumerics, reducer: Reducer, batch: bool) -> None:
    live = [m for m in matrices if m.threshold > 0]
    for m in matrices:
        if m.threshold <= 0:  # the end of a wsd-sqrt schedule: H_c -> 0 as c -> 0
            m.write(torch.zeros_like(m.wide))
    if not live:
        return
    if batch and len(live) > 1:
        (out,) = clip_wide([torch.stack([m.wide for m in live])], [[m.threshold for m in live]], numerics)
        results = list(out)
    else:
        results = clip_wide([m.wide for m in live], [m.threshold for m in live], numerics, reducer, roots=[m.root for m in live])
    for m, r in zip(live, results):
        m.write(r)


def _owner_matrices(region: torch.Tensor, tp: TensorPlan, c: float) -> list[_Matrix]:
    """The full tensor (assembled from its TP blocks) or each of its fused parts."""
    p = tp.placement
    rows, cols = p.matrix_shape
    bands = region.view(p.num_blocks, *p.block_shape)
    full = torch.cat(list(bands), dim=1) if p.tp_dim == 1 else region.view(rows, cols)

    def store():
        if p.tp_dim == 1:
            bands.copy_(full.view(rows, p.num_blocks, p.block_shape[1]).transpose(0, 1))

    return _parts(full, p.row_parts, c, store)


def _parts(full: torch.Tensor, row_parts, c: float, store) -> list[_Matrix]:
    """Split `full` (rows x cols) into its fused row parts (or keep it whole) as wide matrices."""
    if row_parts is None:
        pieces = [(full, None)]
    else:
        period = sum(row_parts)
        shaped = full.view(-1, period, full.shape[1])
        bounds = [sum(row_parts[:j]) for j in range(len(row_parts) + 1)]
        pieces = [(shaped[:, a:b].reshape(-1, full.shape[1]), (a, b)) for a, b in zip(bounds, bounds[1:])]
    matrices = []
    for piece, rows in pieces:
        tall = piece.shape[0] > piece.shape[1]

        def write(result, piece=piece, rows=rows, tall=tall):
            result = result.mT if tall else result
            if rows is None:
                full.copy_(result)
            else:
                full.view(-1, sum(row_parts), full.shape[1])[:, rows[0] : rows[1]] = result.view(-1, rows[1] - rows[0], full.shape[1])
            store()

        matrices.append(_Matrix(piece.mT if tall else piece, c, write))
    return matrices


def _gram_matrices(region: torch.Tensor, tp: TensorPlan, plan: Plan, rank: int, c: float) -> list[_Matrix]:
    """This process's lines of the tensor (or of each fused part) as a wide column block.

    Rows as lines: the block is rowsᵀ (Gram cols x cols); TP bands as lines: the bands side by
    side (Gram rows x rows). Every process returns one entry per matrix, empty or not, so the
    Gram all-reduce lines up everywhere.
    """
    p = tp.placement
    rows, cols = p.matrix_shape
    mine = [u for u in tp.units if u.rank == rank]
    if p.tp_dim == 1:  # whole bands
        bands = region.view(-1, rows, p.block_shape[1])
        local = torch.cat(list(bands), dim=1) if len(bands) else region.new_zeros(rows, 0)
        row_ids = torch.arange(rows)

        def store():
            if len(bands):
                bands.copy_(local.view(rows, len(bands), p.block_shape[1]).transpose(0, 1))

        return _select_rows(local, row_ids, p.row_parts, c, store, lines_are_rows=False)
    lines = region.view(-1, cols)
    block_rows = p.block_shape[0]
    global_rows = [torch.arange(u.start // cols, u.end // cols) + u.block * block_rows for u in mine]
    row_ids = torch.cat(global_rows) if global_rows else torch.zeros(0, dtype=torch.long)
    return _select_rows(lines, row_ids, p.row_parts, c, lambda: None, lines_are_rows=True)


def _select_rows(matrix, row_ids, row_parts, c, store, lines_are_rows: bool) -> list[_Matrix]:
    """One wide matrix per fused part: the rows of `matrix` whose global row is in the part.

    lines_are_rows: `matrix` holds lines as rows (its transpose is the wide block, and parts
    select lines); otherwise `matrix` is already wide and parts select its rows.
    """
    if row_parts is None:
        selections = [None]
    else:
        period, bounds = sum(row_parts), [sum(row_parts[:j]) for j in range(len(row_parts) + 1)]
        phase = row_ids % period
        selections = [torch.nonzero((phase >= a) & (phase < b)).flatten() for a, b in zip(bounds, bounds[1:])]
    matrices = []
    for sel in selections:
        block = matrix if sel is None else matrix[sel]

        def write(result, sel=sel):
            result = result.mT if lines_are_rows else result
            if sel is None:
                matrix.copy_(result)
            else:
                matrix.index_copy_(0, sel, result)
            store()

        matrices.append(_Matrix(block.mT if lines_are_rows else block, c, write))
    return matrices


def clip_sharded(
    tensors: Sequence[torch.Tensor],
    placements: Sequence[Placement],
    thresholds: float | Sequence[float],
    group=None,
    numerics: ClipNumerics = ClipNumerics(),
    names: Sequence[str] | None = None,
) -> list[torch.Tensor]:
    """One-off form of `ShardedClipper(group, numerics).clip(...)` (plans every call)."""
    return ShardedClipper(group, numerics).clip(tensors, placements, thresholds, names)


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)

