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
  different number of ranks); the step and skipped-step counters also ride in every param
  group, where DCP's and torchtitan's FQN-keyed optimizer state dicts keep them;
- the finiteness of gradients and updates is agreed with one all-reduce (MIN) over the
  optimizer's process group, so every rank raises or skips together.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..engine import NonFiniteInput, ShardedClipper
from ..optim.spectra import Spectra, clip_kind
from .placements import UnsupportedPlacement, connected_components, engine_placement, group_ranks, sharded_rank_sets, subgroup

COUNTERS = ("spectra_step", "spectra_skipped_steps")


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: writes go to the DTensor), a plain tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t


class FSDPSpectra(Spectra):
    """`Spectra` (same arguments) for FSDP2 / HSDP / tensor-parallel DTensor parameters.

    Extra args:
        group: the process group every rank of which steps this optimizer together (default:
            the whole world). It decides the finiteness agreement, and plain (non-DTensor)
            tensors count as replicated over it. With pipeline parallelism pass the stage's
            group, since other stages hold other parameters.
        strategy: how matrices are clipped. "auto" (default): the engine's cost model, an owner
            per matrix (one all-to-all each way, no repeated work) and the Gram all-reduce only
            for very elongated ones; "gram": the Gram all-reduce wherever the shards split the
            long side (fewest bytes: a k x k all-reduce, but every rank repeats the k x k
            inverse root), an owner elsewhere; "owner": an owner for every matrix.

    Works in a single process too (plain tensors, or DTensors on a one-rank mesh).
    `track_update_norms` all-gathers each sharded matrix (`full_tensor()`) for its SVD:
    logging only, and costly.
    """

    def __init__(self, params: Iterable, base: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0, *, group=None, strategy: str = "auto", **kwargs):
        self.group, self.strategy = group, strategy
        self._placements: dict[tuple[int, str], object] = {}  # (id(param), kind) -> engine Placement
        super().__init__(params, base, lr, weight_decay, **kwargs)
        self._clip_group = self._build_clip_group()
        self._clipper = ShardedClipper(self._clip_group, self.numerics)
        self._pre_clipper = ShardedClipper(self._clip_group, self.numerics)

    # ------------------------------------------------------------------ construction

    def add_param_group(self, param_group: dict) -> None:
        """Every parameter gets its (sharded) state now, and its engine placement."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in COUNTERS:
            group.setdefault(key, 0)
        for p in group["params"]:
            if not self.state[p]:
                self.state[p].update(self.base.init_state(p))
        if hasattr(self, "_clipper"):  # a group added after construction may need a new clip group
            self._clip_group = self._build_clip_group()
            self._clipper = ShardedClipper(self._clip_group, self.numerics)
            self._pre_clipper = ShardedClipper(self._clip_group, self.numerics)

    def _build_clip_group(self):
        """Translate every placement; then, with one all-gather, agree on errors and the group."""
        error, rank_sets = None, set()
        try:
            for g, p, name in self._named_params():
                rank_sets |= sharded_rank_sets(p)
                kinds = {clip_kind(p, self.apply_to, g["clip"])}
                if self.pre_clip_schedule is not None and p.ndim >= 2:
                    kinds.add("matrix")
                for kind in kinds - {"none"}:
                    self._placements[(id(p), kind)] = engine_placement(p, name, kind, self.strategy)
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

    def _placement(self, p: torch.Tensor, kind: str):
        return self._placements[(id(p), kind)]

    # ------------------------------------------------------------------ the seams

    def clip_directions(self, items) -> list[torch.Tensor]:
        """All matrix and vector directions in one engine call; results keep u's placements."""
        return self._clip(self._clipper, items)

    def _clip(self, clipper: ShardedClipper, items) -> list[torch.Tensor]:
        chosen = [i for i, (*_, kind) in enumerate(items) if kind != "none"]
        pieces = [local(items[i][2]) for i in chosen]
        placements = [self._placement(items[i][0], items[i][4]) for i in chosen]
        try:
            outs = clipper.clip(pieces, placements, [items[i][3] for i in chosen], [items[i][1] for i in chosen])
        except NonFiniteInput:  # every rank gets it: hand the non-finite directions on to the update check
            return [u for _, _, u, _, _ in items]
        results = [u for _, _, u, _, _ in items]
        for i, piece, out in zip(chosen, pieces, outs):
            results[i] = shard_like(items[i][2], out.view_as(piece))
        return results

    def agree_on_finite(self, finite: torch.Tensor) -> torch.Tensor:
        if not dist.is_available() or not dist.is_initialized():
            return finite
        flags = finite.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.group)
        return flags.bool()

    def _finite_or_skip(self, tensors, names, what: str) -> bool:
        # isfinite().all() on a sharded DTensor would be a collective per tensor: look at shards.
        return super()._finite_or_skip([local(t) for t in tensors], names, what)

    def spectral_norm(self, param: torch.Tensor, tensor: torch.Tensor) -> float:
        """||tensor||_2 via `full_tensor()` (an all-gather on every rank, in step order)."""
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        return super().spectral_norm(param, full)

    # ------------------------------------------------------------------ pre-clipping

    @torch.no_grad()
    def pre_clip_gradients(self) -> None:
        """SSC of every matrix gradient at the pre-clip threshold, through the engine."""
        if self.pre_clip_schedule is None:
            raise RuntimeError("pre-clipping is off; construct FSDPSpectra(..., pre_clip=True)")
        items = []
        for group, p, name in self._named_params():
            if p.grad is not None and p.ndim >= 2 and group["lr"] > 0:
                c = self.pre_clip_schedule(self._step, group["lr"], group["peak_lr"])
                items.append((p, name, p.grad, c, "matrix"))
        for (p, *_), out in zip(items, self._clip(self._pre_clipper, items)):
            local(p.grad).copy_(local(out))
        self._pre_clipped = True

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self):
        for group in self.param_groups:  # DCP and torchtitan keep param-group keys, not extra top-level ones
            group["spectra_step"], group["spectra_skipped_steps"] = self._step, self.skipped_steps
        return super().state_dict()

    def load_state_dict(self, state_dict):
        groups = state_dict.get("param_groups") or []
        counters = next((g for g in groups if "spectra_step" in g), None)
        super().load_state_dict(state_dict)
        if "spectra" not in state_dict and counters is not None:
            self._step, self.skipped_steps = int(counters["spectra_step"]), int(counters["spectra_skipped_steps"])


def shard_like(u: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` (u's local shard, clipped) as a tensor laid out like u."""
    if not isinstance(u, DTensor):
        return out
    return DTensor.from_local(out, u.device_mesh, u.placements, run_check=False, shape=u.shape, stride=u.stride())
