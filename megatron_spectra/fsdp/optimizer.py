"""SPECTRA for PyTorch FSDP2 / DTensor parameters (and plain tensors), in any number of processes.

    model = ...; fully_shard(...)          # and/or parallelize_module(...) for TP
    opt = FSDPSpectra(model.named_parameters(), base="adamw", lr=1e-3, weight_decay=0.1)

What changes against the reference `Spectra` (whose step, schedules and options it keeps):
- the base moments run element-wise on the DTensors, so the optimizer state is sharded
  exactly like the parameters (same mesh, same placements);
- all matrix and vector directions of a step go through ONE `ShardedClipper.clip` call over
  the clip group (see `placements.py`), which clips each full matrix once; alpha comes from
  the DTensor's global shape;
- the state is created for every parameter at construction, so `state_dict()` has the same
  keys on every rank (what `torch.distributed.checkpoint` needs, also when loading into a
  different number of ranks); the step and skipped-step counters ride in every param group
  (as for every Spectra), where DCP's and torchtitan's FQN-keyed optimizer state dicts keep them;
- the finiteness of gradients and updates is agreed with one all-reduce (MIN) over the
  optimizer's process group, so every rank raises or skips together.
Both distributed parts are its clipper, a `DTensorClipper`: the step is the reference's.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..engine import NonFiniteInput, ShardedClipper
from ..optim.spectra import Spectra
from ..optim.clipper import STAGES, Clip, Thresholds, stage_numerics, threshold_of
from .placements import UnsupportedPlacement, connected_components, engine_placement, group_ranks, sharded_rank_sets, subgroup


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: writes go to the DTensor), a plain tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t


class DTensorClipper:
    """FSDPSpectra's clipper: every tensor's local shard through the engine over the clip
    group, results laid out like the inputs; finiteness agreed over the optimizer's group."""

    def __init__(self, group, clip_group, placements: dict, numerics):
        self.group, self.clip_group, self.placements, self.numerics = group, clip_group, placements, numerics
        self.engines = {stage: ShardedClipper(clip_group, stage_numerics(numerics, stage)) for stage in STAGES}

    @property
    def stats(self):
        """What the last update clip cost this process (bytes, seconds)."""
        return self.engines["update"].stats

    def placement(self, p: torch.Tensor, kind: str):
        """The engine placement of a param's shard, clipped as `kind`."""
        return self.placements[(id(p), kind)]

    verified_finite = False

    def clip(self, items: Sequence[Clip], c: Thresholds, stage: str = "update", also_check=()) -> list[torch.Tensor]:
        self.verified_finite = False
        pieces = [local(item.tensor) for item in items]
        placements = [self.placement(item.param, item.kind) for item in items]
        thresholds = [threshold_of(c, item.group) for item in items]  # every rank holds every param: alike
        engine = self.engines[stage]
        try:
            outs = engine.clip(pieces, placements, thresholds, [item.spec.name for item in items], [local(t) for t in also_check])
        except NonFiniteInput:  # every rank gets it: hand the tensors on to the step's finiteness check
            return [item.tensor for item in items]
        self.verified_finite = engine.results_finite
        return [shard_like(item.tensor, out.view_as(piece)) for item, piece, out in zip(items, pieces, outs)]

    def find_nonfinite(self, tensors: Sequence[torch.Tensor]) -> list[int] | None:
        """Per-tensor flags of the local shards (isfinite of a sharded DTensor would be a
        collective per tensor), combined with one all-reduce (MIN) over the optimizer's group."""
        if not tensors:
            return None
        flags = torch.stack([torch.isfinite(local(t)).all() for t in tensors]).to(torch.int32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.group)
        return None if bool(flags.all()) else (flags == 0).nonzero().flatten().tolist()


class FSDPSpectra(Spectra):
    """`Spectra` (same arguments) for FSDP2 / HSDP / tensor-parallel DTensor parameters.

    Extra args:
        group: the process group every rank of which steps this optimizer together (default:
            the whole world). It decides the finiteness agreement, and plain (non-DTensor)
            tensors count as replicated over it. With pipeline parallelism pass the stage's
            group, since other stages hold other parameters.
        strategy: how matrices are clipped. "auto" (default): the engine's cost model, an owner
            per matrix (one all-to-all each way) and, in accurate mode, the Gram all-reduce for
            an elongated one too large for one rank's share (embedding, output layer in large
            groups); "gram": the Gram all-reduce
            wherever the shards split the long side (fewest bytes: two k x k all-reduces, the
            k x k root computed by one rank), an owner elsewhere; "owner": an owner for every
            matrix.

    Works in a single process too (plain tensors, or DTensors on a one-rank mesh).
    `track_update_norms` all-gathers each sharded matrix (`full_tensor()`) for its SVD:
    logging only, and costly. `clipper` (a DTensorClipper) holds the clip's `stats`.
    """

    def __init__(self, params: Iterable, base: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0, *, group=None, strategy: str = "auto", **kwargs):
        self.group, self.strategy = group, strategy
        self._placements: dict[tuple[int, str], object] = {}  # (id(param), kind) -> engine Placement
        super().__init__(params, base, lr, weight_decay, **kwargs)
        self._use_engine()

    # ------------------------------------------------------------------ construction

    def add_param_group(self, param_group: dict) -> None:
        """A group added after construction gets its engine placements (its state: Spectra)."""
        super().add_param_group(param_group)
        if isinstance(getattr(self, "clipper", None), DTensorClipper):  # a group added later may need a new clip group
            self._use_engine()

    def _use_engine(self) -> None:
        self._clip_group = self._build_clip_group()
        self.clipper = DTensorClipper(self.group, self._clip_group, self._placements, self.numerics)

    def _build_clip_group(self):
        """Translate every placement; then, with one all-gather, agree on errors and the group."""
        error, rank_sets = None, set()
        try:
            for g, p, spec in self._specs():
                rank_sets |= sharded_rank_sets(p)
                kinds = {spec.kind}
                if self.pre_clip_schedule is not None and spec.matrix:
                    kinds.add("matrix")
                for kind in kinds - {"none"}:
                    self._placements[(id(p), kind)] = engine_placement(p, spec.name, kind, self.strategy)
        except UnsupportedPlacement as e:
            error = str(e)
        if not dist.is_available() or not dist.is_initialized():
            if error:
                raise UnsupportedPlacement(error)
            return None
        ranks = group_ranks(self.group)
        views = [None] * len(ranks)
        dist.all_gather_object(views, (error, sorted(rank_sets)), group=self.group)
        errors = [(r, e) for r, (e, _) in zip(ranks, views) if e]
        if errors:
            raise UnsupportedPlacement(f"rank {errors[0][0]}: {errors[0][1]}")
        every_set = [s for _, sets in views for s in sets]
        if not every_set:  # no sharded parameter anywhere: plain tensors, replicated over the group
            return self.group
        mine = next(c for c in connected_components(every_set, ranks) if dist.get_rank() in c)
        return self.group if list(mine) == sorted(ranks) else subgroup(mine)

    def spectral_norm(self, param: torch.Tensor, tensor: torch.Tensor) -> float:
        """||tensor||_2 via `full_tensor()` (an all-gather on every rank, in step order)."""
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        return super().spectral_norm(param, full)


def shard_like(u: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` (u's local shard, clipped) as a tensor laid out like u."""
    if not isinstance(u, DTensor):
        return out
    return DTensor.from_local(out, u.device_mesh, u.placements, run_check=False, shape=u.shape, stride=u.stride())
