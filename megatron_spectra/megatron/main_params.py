"""The torch optimizer Megatron steps: SPECTRA on its fp32 main params, and their clip.

Megatron hands its inner optimizer the fp32 main params: whole TP-local tensors (Float16 /
FP32 optimizers) or 1-D ZeRO shards of them (DistributedOptimizer). The step is the shared
one (`optim.step.SpectraStep`); what a shard cannot tell comes from the adapter's entries
(layouts.Entry: clip kind, alpha, placement), and `EntryClipper` sends every piece through
the distributed engine in one call, so that each full matrix is clipped once.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from ..engine import NonFiniteInput, ShardedClipper, comm_device
from ..ops.finite import finite_flags
from ..ops.soft_clip import ClipNumerics
from ..optim.directions import Base
from ..optim.schedules import ThresholdSchedule
from ..optim.clipper import STAGES, Clip, Thresholds, stage_numerics, threshold_of
from ..optim.step import SpectraStep
from .layouts import Entry


class EntryClipper:
    """The clip of Megatron main params: every entry's piece through the engine over `group`
    (the processes holding pieces of the same tensors), in entry order on every process.

    Every process calls the engine with all its entries of the stage's kind, also those
    whose piece is elsewhere (an empty piece) or whose group does not move this step
    (zeros, result unused): the engine needs the same tensors on every process.
    """

    def __init__(self, entries: list[Entry], group, numerics: ClipNumerics, groups: list[int] | None = None):
        self.entries, self.group = entries, group
        self.groups = groups if groups is not None else [0] * len(entries)  # each entry's param-group index
        self.engines = {stage: ShardedClipper(group, stage_numerics(numerics, stage)) for stage in STAGES}

    @property
    def stats(self):
        """What the last update clip cost this process (bytes, seconds)."""
        return self.engines["update"].stats

    verified_finite = False

    def clip(self, items: Sequence[Clip], c: Thresholds, stage: str = "update", also_check=()) -> list[torch.Tensor]:
        self.verified_finite = False
        chosen = [(e, g) for e, g in zip(self.entries, self.groups) if (e.kind != "none" if stage == "update" else e.matrix)]
        thresholds = [threshold_of(c, g) if g >= 0 else 1.0 for _, g in chosen]
        chosen = [e for e, _ in chosen]
        if not chosen:  # apply_to="none" (a global setting: every process skips alike)
            return []
        given = {item.param: item for item in items}
        device = next((e.main.device for e in self.entries if e.main is not None), torch.device("cpu"))
        pieces = [self._piece(e, given.get(e.main), device) for e in chosen]
        engine = self.engines[stage]
        try:
            outs = engine.clip(pieces, [e.placement for e in chosen], thresholds, [e.name for e in chosen], also_check)
        except NonFiniteInput:  # on every process: hand the tensors on to the step's finiteness check
            return [item.tensor for item in items]
        self.verified_finite = engine.results_finite
        parts = {}  # main -> its entries' outputs, in order (several: a grouped experts tensor)
        for e, out in zip(chosen, outs):
            if e.main is not None:
                parts.setdefault(e.main, []).append(out.reshape(-1))
        clipped = {main: torch.cat(outs) if len(outs) > 1 else outs[0] for main, outs in parts.items()}
        return [clipped[item.param].view_as(item.tensor) for item in items]

    @staticmethod
    def _piece(entry: Entry, item: Clip | None, device) -> torch.Tensor:
        if item is not None:
            return entry.piece_of_main(item.tensor)
        return torch.zeros(entry.placement.local_numel, device=device)

    def find_nonfinite(self, tensors: Sequence[torch.Tensor]) -> list[int] | None:
        """One all-reduce (MIN) of a flag over the group; the indices of this process's."""
        finite = finite_flags(tensors)
        flag = finite.all().float().reshape(1)
        if dist.is_initialized():
            flag = flag.to(comm_device(self.group))
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return None if flag.item() == 1.0 else (~finite).nonzero().flatten().tolist()


class MainParamSpectra(SpectraStep, torch.optim.AdamW):
    """SPECTRA over Megatron main params (whole tensors or ZeRO shards).

    It subclasses AdamW only because megatron-core 0.16's DistributedOptimizer asserts that
    its inner optimizer is an Adam/AdamW (for its checkpoint code); AdamW's own step is never
    used. The step count lives in the param groups (`spectra_step`, mirrored in `step` for
    Megatron's FusedAdam convention) and in each param's `state["step"]` (torch's), and every
    group says which base wrote it (`spectra_base`): see checkpoint.py.
    """

    def __init__(
        self,
        param_groups,
        base: Base,
        hyper: dict,
        *,
        schedule: ThresholdSchedule,
        pre_clip_schedule: ThresholdSchedule | None,
        numerics: ClipNumerics,
        nonfinite: str,
        specs: dict[torch.Tensor, Entry],
        clipper: EntryClipper,
        base_lr: float | None = None,
        threshold_base_lr: str = "global",
    ):
        defaults = dict(lr=1e-3, weight_decay=0.0, **hyper)
        # Megatron's fp32 main shards are views of the params, which add_param_group refuses;
        # like DistributedOptimizer does with its Adam, we take the groups as they are.
        torch.optim.Optimizer.__init__(self, [torch.zeros(0, requires_grad=True)], defaults)
        self.param_groups = list(param_groups)
        for group in self.param_groups:
            for key, value in defaults.items():
                group.setdefault(key, value)
            group.update(hyper, spectra_base=base.name)  # the Megatron groups carry Adam's keys: ours win
        self.base, self.hyper, self.specs = base, dict(hyper), specs
        self.schedule, self.pre_clip_schedule, self.numerics = schedule, pre_clip_schedule, numerics
        self.nonfinite, self.track_update_norms = nonfinite, False
        self.base_lr, self.threshold_base_lr = base_lr, threshold_base_lr  # the official base_lr: --lr
        self.init_step(clipper)

    # The Megatron optimizer's prepare_grads (or its loss scaler) has checked the gradients over
    # all its processes, and skipped or raised, before this step runs: not a second all-reduce.
    gradients_checked_before = True

    def spec_of(self, group: dict, param: torch.Tensor, name: str) -> Entry:
        return self.specs[param]

    def peak_lr(self, group: dict) -> float:
        return group.get("max_lr", group["lr"])  # Megatron's schedulers scale every group from its max_lr

    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            group["step"] = group["spectra_step"]
        return loss

    def restore_step(self) -> None:
        """After torch's load_state_dict (Megatron calls it, not ours): the counters from the
        checkpoint, our base's keys back in every group, and one `step` tensor per param.
        Megatron's loaders hand all params one shared step tensor (torch convention) or none
        (FusedAdam convention); the in-place `state["step"] += 1` needs one each."""
        self.restore_counters()
        for group in self.param_groups:
            step = group["spectra_step"]
            group.update(self.hyper, spectra_base=self.base.name, step=step)
            for p in group["params"]:
                self.state[p]["step"] = torch.tensor(float(step))
