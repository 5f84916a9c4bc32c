"""The clip plan: which process computes which part of which matrix, and what moves where.

Built once per layout from every process's placements (the same on every process), it
assigns every element of every tensor to exactly one *unit* of compute:

- owner strategy: a tensor's whole set of TP blocks is one compute rank's unit;
- Gram strategy: a tensor is cut into runs of whole *lines* (rows of a TP-row-split or
  unsplit matrix, whole TP column bands of a column-split one, elements of a vector), and
  each run is computed by one process. A line cut by a ZeRO range boundary moves to one of
  its holders; lines held whole stay where they are. The k x k Gram is summed over the
  group, its inverse square root is computed by one process, the tensor's *root* rank, and
  shared with one more k x k all-reduce; every holder applies it to its own lines.

Work is balanced by FLOPs: a k x n matrix (k the short side) costs 4·k²·n in its line
products (Gram and apply) and 2·P·k³ in its root, P the mode's k x k products. Owners and
roots are placed longest first on the least loaded process, after the Gram line work.

The strategy "auto": vectors take Gram (the vector rule needs one scalar all-reduce). In
paper mode every matrix goes to an owner: the owner's clip is the official one bit for bit,
while a Gram summed over processes rounds in another order, which the unconverged bf16
iteration carries to ~1e-2. In accurate mode (converged: any summation order gives the same
clip to ~1e-5) Gram is chosen for a matrix whose owner's clip alone would be more than a
process's share of all the clip work (it would set the step time), whose line work is at
least its root's (n >= P·k/2) and whose lines more than one process holds: the embedding
and output layer (V x d) in large groups. Their lines then stay where they are, and the
root alone is placed. Otherwise owners: each Gram matrix adds two all-reduces and, in
accurate mode's multi-stage case, a Gram and a factor exchange per stage, synchronisation
that costs more than it balances where no single matrix dominates (measured in `spectra
bench megatron`: +7% step time at 4 processes). Gram also needs lines along the long (or
equal) side. `strategy="gram"` forces it where bytes matter more: it moves only two k x k
all-reduces.

Elements are addressed in *block space*: a tensor's TP blocks one after another, each in
row-major order, so every held piece is one contiguous range and every unit too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .placement import Placement


@dataclass(frozen=True)
class Unit:
    """Elements [start, end) of block `block` of tensor `tensor`, computed on `rank`."""

    tensor: int
    block: int
    start: int
    end: int
    rank: int


@dataclass(frozen=True)
class Move:
    """`length` elements from offset `src_off` of src's buffer to `dst_off` of dst's buffer."""

    src: int
    src_off: int
    dst: int
    dst_off: int
    length: int


@dataclass
class TensorPlan:
    index: int
    placement: Placement  # the global fields; which block a rank holds is not in here
    strategy: str  # "owner" | "gram"
    cost: float  # clip FLOPs of the whole tensor
    units: list[Unit] = field(default_factory=list)
    root: int | None = None  # gram matrices: the rank computing the k x k inverse square root


@dataclass
class Plan:
    world: int
    tensors: list[TensorPlan]
    forward: list[Move]  # local pieces -> workspaces
    backward: list[Move]  # workspaces -> every holder's local piece
    workspace_offsets: list[dict[int, tuple[int, int]]]  # rank -> {tensor: (offset, numel)}
    workspace_sizes: list[int]
    local_offsets: list[list[int]]  # rank -> offset of each tensor's piece in its local buffer
    local_sizes: list[int]
    loads: list[float]  # estimated clip FLOPs per rank


PAPER_PRODUCTS = 27  # k x k products of the paper's 10 Newton-Schulz steps (3 each, 3 of them exact and skipped)
ACCURATE_PRODUCTS = 11  # accurate mode at s_max/c = 10, typical of Adam-like updates (tight bound): 4 minimax steps with G² (8 at 3, 15 at 30)


def clip_cost(rows: int, cols: int, products: float = PAPER_PRODUCTS) -> float:
    """Matmul FLOPs of one SSC: Gram and product 2·k²·n each, `products` k x k products."""
    k, n = min(rows, cols), max(rows, cols)
    return 4.0 * k * k * n + root_cost(k, products)


def root_cost(k: int, products: float = PAPER_PRODUCTS) -> float:
    """FLOPs of the k x k inverse square root: `products` k x k products."""
    return 2.0 * products * k**3


def matrix_parts(p: Placement) -> list[tuple[int, int]]:
    """Shapes of the matrices SSC is applied to: the fused parts, or the whole tensor."""
    rows, cols = p.matrix_shape
    if p.row_parts is None:
        return [(rows, cols)]
    periods = rows // sum(p.row_parts)
    return [(periods * size, cols) for size in p.row_parts]


def build_plan(placements: Sequence[Sequence[Placement]], paper: bool = False, products: float = PAPER_PRODUCTS) -> Plan:
    """placements[rank][tensor], already checked to agree on everything global.

    Owners and roots are balanced by FLOPs, with `products` k x k products per root.

    paper: paper-mode numerics, under which "auto" keeps every matrix with an owner (the
    official clip bit for bit; its unconverged iteration is not even side-symmetric).
    """
    world, count = len(placements), len(placements[0])
    holders = [_holders(placements, t) for t in range(count)]
    costs = [sum(clip_cost(*s, products) for s in matrix_parts(p)) if not p.is_vector else 0.0 for p in placements[0]]
    share = sum(costs) / world  # a process's share of all the clip work
    tensors = []
    for t in range(count):
        p = placements[0][t]
        tensors.append(TensorPlan(t, p, _choose_strategy(p, holders[t], paper, products, costs[t] > share), costs[t]))
    loads = [0.0] * world
    for tp in tensors:
        if tp.strategy == "gram":
            tp.units = _gram_units(tp, holders[tp.index])
            _add_line_loads(tp, loads)
    _assign_work([tp for tp in tensors if not tp.placement.is_vector], holders, loads, products)

    local_offsets, local_sizes = _local_layout(placements)
    workspace_offsets, workspace_sizes = _workspace_layout(tensors, world)
    forward, backward = [], []
    for tp in tensors:
        for unit in tp.units:
            ws_base = workspace_offsets[unit.rank][tp.index][0] + _unit_offset_in_tensor(tp, unit)
            for rank, lo, hi in _pieces_overlapping(holders[tp.index][unit.block], unit.start, unit.end):
                src_off = local_offsets[rank][tp.index] + lo - placements[rank][tp.index].range[0]
                backward.append(Move(unit.rank, ws_base + lo - unit.start, rank, src_off, hi - lo))
            for rank, lo, hi in _sources(holders[tp.index][unit.block], unit.start, unit.end, prefer=unit.rank):
                src_off = local_offsets[rank][tp.index] + lo - placements[rank][tp.index].range[0]
                forward.append(Move(rank, src_off, unit.rank, ws_base + lo - unit.start, hi - lo))
    return Plan(world, tensors, forward, backward, workspace_offsets, workspace_sizes, local_offsets, local_sizes, loads)


# ----------------------------------------------------------------------------- holders


def _holders(placements, t: int) -> list[list[tuple[int, int, int]]]:
    """For each TP block of tensor t: the (rank, start, end) pieces held, non-empty only."""
    p0 = placements[0][t]
    blocks: list[list[tuple[int, int, int]]] = [[] for _ in range(p0.num_blocks)]
    for rank, row in enumerate(placements):
        start, end = row[t].range
        if end > start:
            blocks[row[t].tp_block].append((rank, start, end))
    for b, pieces in enumerate(blocks):
        covered = 0
        for _, start, end in sorted(pieces, key=lambda x: x[1]):
            if start > covered:
                break
            covered = max(covered, end)
        if covered < p0.block_numel:
            raise ValueError(
                f"tensor {t}: elements from {covered} of TP block {b} (of {p0.block_numel}) are held by no process"
            )
    return blocks


def _intervals(pieces, start: int, end: int):
    """Split [start, end) at piece boundaries: (lo, hi, sorted ranks holding all of it)."""
    cuts = sorted({start, end, *(s for _, s, _ in pieces if start < s < end), *(e for _, _, e in pieces if start < e < end)})
    for lo, hi in zip(cuts, cuts[1:]):
        yield lo, hi, sorted(r for r, s, e in pieces if s <= lo and hi <= e)


def _pieces_overlapping(pieces, start: int, end: int):
    for rank, s, e in pieces:
        lo, hi = max(s, start), min(e, end)
        if lo < hi:
            yield rank, lo, hi


def _sources(pieces, start: int, end: int, prefer: int):
    """One holder per element of [start, end): `prefer` where it holds it, else the lowest rank."""
    for lo, hi, ranks in _intervals(pieces, start, end):
        yield (prefer if prefer in ranks else ranks[0]), lo, hi


# ----------------------------------------------------------------------------- strategy


def _line_axis(p: Placement) -> str:
    """What a Gram line is: "elements" of a vector, TP "bands" of a column split, else "rows"."""
    if p.is_vector:
        return "elements"
    return "bands" if p.tp_dim == 1 else "rows"


def _gram_on_short_side(p: Placement) -> bool:
    rows, cols = p.matrix_shape
    axis = _line_axis(p)
    # rows as lines: Gram is cols x cols; bands (columns) as lines: Gram is rows x rows.
    if axis == "rows":
        return cols <= rows
    return rows <= cols if axis == "bands" else True


def _choose_strategy(p: Placement, blocks, paper: bool, products: float, oversized: bool) -> str:
    """oversized: an owner's clip of p alone would be more than a process's share of the work."""
    if p.is_vector:
        return "gram"  # the vector rule needs only the global norm: one scalar all-reduce
    if p.strategy != "auto":
        return p.strategy
    if paper or not oversized or not _gram_on_short_side(p) or p.row_parts is not None and _line_axis(p) == "bands":
        return "owner"
    spread = len({rank for pieces in blocks for rank, *_ in pieces}) > 1
    shapes = matrix_parts(p)
    lines = sum(4.0 * min(s) ** 2 * max(s) for s in shapes)
    return "gram" if spread and lines >= sum(root_cost(min(s), products) for s in shapes) else "owner"


# ----------------------------------------------------------------------------- units


def _gram_units(tp: TensorPlan, blocks) -> list[Unit]:
    p = tp.placement
    axis, units = _line_axis(p), []
    for b, pieces in enumerate(blocks):
        if axis == "bands":  # a whole band goes to the process holding most of it
            held = {}
            for rank, s, e in pieces:
                held[rank] = held.get(rank, 0) + e - s
            best = max(held.items(), key=lambda kv: (kv[1], -kv[0]))[0]
            units.append(Unit(tp.index, b, 0, p.block_numel, best))
            continue
        line = 1 if axis == "elements" else p.block_shape[1]
        units.extend(_line_runs(tp.index, b, pieces, p.block_numel, line))
    return _merge(units)


def _line_runs(t: int, b: int, pieces, numel: int, line: int) -> list[Unit]:
    """Runs of whole lines of length `line`: runs held whole stay with their holders (split
    evenly when replicated); a line cut by a piece boundary goes to a holder of its start."""
    units = []
    for lo, hi, ranks in _intervals(pieces, 0, numel):
        first, last = -(-lo // line), hi // line  # whole lines inside [lo, hi)
        if first < last:
            n, k = last - first, len(ranks)
            for i, rank in enumerate(ranks):  # replicated runs: share the work
                a, z = first + n * i // k, first + n * (i + 1) // k
                if a < z:
                    units.append(Unit(t, b, a * line, z * line, rank))
    # A line is cut where a piece starts or ends inside it.
    cut_lines = {x // line for _, s, e in pieces for x in (s, e) if x % line}
    for line_index in sorted(cut_lines):
        start = line_index * line
        (_, _, ranks), = _intervals(pieces, start, start + 1)
        units.append(Unit(t, b, start, start + line, ranks[0]))
    return sorted(units, key=lambda u: u.start)


def _merge(units: list[Unit]) -> list[Unit]:
    merged: list[Unit] = []
    for u in sorted(units, key=lambda u: (u.block, u.start)):
        last = merged[-1] if merged else None
        if last and last.block == u.block and last.end == u.start and last.rank == u.rank:
            merged[-1] = Unit(u.tensor, u.block, last.start, u.end, u.rank)
        else:
            merged.append(u)
    return merged


def gram_k(p: Placement) -> int:
    """The Gram's side under the Gram strategy: columns when lines are rows, else rows."""
    rows, cols = p.matrix_shape
    return cols if _line_axis(p) == "rows" else rows


def _add_line_loads(tp: TensorPlan, loads: list[float]) -> None:
    """A Gram matrix's line products (Gram and apply, 4·k per line element) stay with its lines."""
    if tp.placement.is_vector:
        return
    k = gram_k(tp.placement)
    for u in tp.units:
        loads[u.rank] += 4.0 * k * (u.end - u.start)


def _assign_work(tensors: list[TensorPlan], holders, loads: list[float], products: float) -> None:
    """Owners' whole clips and Gram matrices' roots, longest first. An owner prefers the
    process that already holds most of its tensor (no traffic) unless that would push it
    above the balanced target; a root goes where the load is least."""
    world = len(loads)
    if not tensors:
        return
    jobs = [(tp, tp.cost if tp.strategy == "owner" else _root_cost(tp, products)) for tp in tensors]
    total = sum(loads) + sum(cost for _, cost in jobs)
    target = max(total / world, max(cost for _, cost in jobs)) * 1.05
    for tp, cost in sorted(jobs, key=lambda job: (-job[1], job[0].index)):
        held = [0] * world
        if tp.strategy == "owner":
            for pieces in holders[tp.index]:
                for rank, s, e in pieces:
                    held[rank] += e - s
        fits = [r for r in range(world) if loads[r] + cost <= target]
        rank = max(fits, key=lambda r: (held[r], -loads[r], -r)) if fits else min(range(world), key=lambda r: (loads[r], r))
        loads[rank] += cost
        if tp.strategy == "owner":
            tp.units = [Unit(tp.index, b, 0, tp.placement.block_numel, rank) for b in range(tp.placement.num_blocks)]
        else:
            tp.root = rank


def _root_cost(tp: TensorPlan, products: float) -> float:
    """Every fused part of a Gram matrix has its own k x k root (all on the tensor's root rank)."""
    parts = len(tp.placement.row_parts) if tp.placement.row_parts is not None else 1
    return parts * root_cost(gram_k(tp.placement), products)


# ----------------------------------------------------------------------------- buffers


def _local_layout(placements):
    offsets, sizes = [], []
    for row in placements:
        off, mine = 0, []
        for p in row:
            mine.append(off)
            off += p.local_numel
        offsets.append(mine)
        sizes.append(off)
    return offsets, sizes


def _workspace_layout(tensors: list[TensorPlan], world: int):
    """Each rank's workspace: for every tensor it computes, its units in (block, start) order."""
    offsets: list[dict[int, tuple[int, int]]] = [{} for _ in range(world)]
    sizes = [0] * world
    for tp in tensors:
        for rank in range(world):
            numel = sum(u.end - u.start for u in tp.units if u.rank == rank)
            if numel or tp.strategy == "gram":
                offsets[rank][tp.index] = (sizes[rank], numel)
                sizes[rank] += numel
    return offsets, sizes


def _unit_offset_in_tensor(tp: TensorPlan, unit: Unit) -> int:
    """Where `unit` starts inside its rank's workspace region of the tensor."""
    before = [u for u in tp.units if u.rank == unit.rank and (u.block, u.start) < (unit.block, unit.start)]
    return sum(u.end - u.start for u in before)

