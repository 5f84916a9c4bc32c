"""SPECTRA versions of Megatron's optimizers: distributed (ZeRO-1), Float16 and FP32.

Megatron keeps doing everything it does for Adam: main params, grad copies, the loss
scaler, global-norm clipping, ZeRO sharding and the param all-gather, checkpoints. We change
three things:
- the inner torch optimizer is `MainParamSpectra`: the shared SPECTRA step (eq. 2 of arXiv
  2603.14315) over the main params, each param's clip kind and alpha from its `Entry`;
- its clipper (`EntryClipper`) sends every direction through the engine over the group of
  processes that hold pieces of the same matrices (TP x DP for ZeRO-1, TP otherwise; for the
  expert-parallel part Megatron chains on, every rank of the pipeline stage: see layouts.py),
  so each full matrix (each expert's own) is clipped once;
- `prepare_grads` also skips (or refuses) a step with non-finite gradients when no loss
  scaler does it, and applies the optional pre-clipping of gradients.
Checkpoints go through Megatron's own code, with the hooks of checkpoint.py for the base's
state keys, the step count and checkpoints of other optimizers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import FP32Optimizer, Float16OptimizerWithFloat16Params

from . import checkpoint
from ..engine import comm_device
from ..ops.finite import finite_flags
from ..ops.soft_clip import ClipNumerics
from ..optim.directions import get_base
from ..optim.schedules import ThresholdSchedule, pre_clip_schedule
from ..settings import config_fields
from ..optim.clipper import Clipped
from ..optim.guards import NonFiniteError
from .config import SpectraOptimizerConfig
from .layouts import Entry, expert_entries, expert_params, make_entry, param_names, row_parts
from .main_params import EntryClipper, MainParamSpectra
from .update_norms import update_norms


class _SpectraMethods:
    """What the three Spectra optimizers share; `_entries` says where the pieces are.

    Not a base class: Python refuses to turn a built Megatron optimizer into a class with an
    extra base (`__class__` assignment needs the same layout chain), so `_shares` copies
    these methods into single-inheritance subclasses of Megatron's classes instead.

    Public after setup: `spectra_entries` (this rank's entries), `spectra_clipper` (the
    engine's group and its `stats`), `optimizer` (the MainParamSpectra, whose
    `register_update_observer` sees every step's U and H_c(U)) and `update_norms(updates)`.
    """

    def setup_spectra(self, config: SpectraOptimizerConfig, model_chunks) -> None:
        """Turn this (already built) Megatron optimizer into its Spectra version."""
        self.spectra_config = config
        self._names = param_names(model_chunks)
        self._model_config = model_chunks[0].config
        self._tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self._tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self._experts = expert_params(model_chunks)
        # Megatron's param groups say which part this is: the dense one, or the expert-parallel
        # one it chains on (over the expert data-parallel group) when EP > 1.
        self._expert_part = any(g.get("is_expert_parallel", False) for g in getattr(self.optimizer, "param_groups", []))
        self.init_state_fn = _init_state
        self.spectra_entries: list[Entry] = []
        self.spectra_update_norms: dict = {}
        if self.is_stub_optimizer:
            return
        self.spectra_entries = self._entries()  # reads the main params of Megatron's own inner optimizer
        named = {s.name: getattr(config, s.megatron) for s in config_fields()}  # the settings by their Spectra names
        numerics = ClipNumerics(config.spectra_mode, config.spectra_ns_steps, config.spectra_ns_fp32, config.spectra_post_process)
        group = self._engine_group()
        self.spectra_clipper = EntryClipper(self.spectra_entries, group, numerics, self._entry_groups(group))
        self.optimizer = MainParamSpectra(
            self.optimizer.param_groups, get_base(config.base), config.base_hyperparameters(),
            schedule=ThresholdSchedule(
                config.spectra_clip_threshold, config.spectra_clip_schedule, config.spectra_warmup_steps,
                config.spectra_total_steps, config.spectra_decay_fraction, config.spectra_clip_final_scale,
            ),
            pre_clip_schedule=pre_clip_schedule(named) if config.spectra_pre_clip else None,
            base_lr=config.lr, threshold_base_lr=config.spectra_threshold_base_lr,
            numerics=numerics,
            nonfinite=config.spectra_nonfinite,
            specs={e.main: e for e in self.spectra_entries if e.main is not None},
            clipper=self.spectra_clipper,
        )
        if config.spectra_log_update_norms:
            self.optimizer.register_update_observer(self._keep_update_norms)

    # ------------------------------------------------------------------ per wrapper

    def _entries(self) -> list[Entry]:
        raise NotImplementedError

    def _engine_group(self):
        raise NotImplementedError

    def _entry_groups(self, group) -> list[int]:
        """The param-group index of every entry, on every process of the engine group, also
        for entries without a piece here (a ZeRO shard elsewhere): per-group thresholds must
        reach the engine alike everywhere. Megatron keeps every group, in one order, on every
        rank; a MAX all-reduce fills in what this rank does not hold (-1: nobody does)."""
        index = {p: i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        mine = [index.get(e.main, -1) if e.main is not None else -1 for e in self.spectra_entries]
        device = next((e.main.device for e in self.spectra_entries if e.main is not None), torch.device("cpu"))
        groups = torch.tensor(mine, dtype=torch.int64, device=device)
        if dist.is_initialized() and groups.numel():
            dist.all_reduce(groups, op=dist.ReduceOp.MAX, group=group)
        return groups.tolist()

    def _entry(self, model_param, main, flat=None) -> list[Entry]:
        """The entries of one model param: itself, or every global expert of its slot."""
        c = self.spectra_config
        name = self._names.get(model_param, f"param{tuple(model_param.shape)}")
        where = self._experts.get(model_param)
        if where is not None:
            layout, index = where
            if not self._expert_part and layout.tp_size not in (1, self._tp_size):  # its TP group is not ours
                raise NotImplementedError(
                    f"{name}: with expert_model_parallel_size=1 the experts are in the dense optimizer, where "
                    f"expert_tensor_parallel_size={layout.tp_size} must be 1 or tensor_model_parallel_size ({self._tp_size})"
                )
            gated = getattr(self._model_config, "gated_linear_unit", False)
            dp_replica = self._expert_part and not self._zero and parallel_state.get_expert_data_parallel_rank() != 0
            return expert_entries(name, model_param, main, flat, layout, index, apply_to=c.spectra_apply_to,
                                  strategy=c.spectra_strategy, split_fc1=c.spectra_split_fc1 and gated, dp_replica=dp_replica,
                                  replica_rank=layout.tp_rank if self._expert_part else self._tp_rank)
        if not getattr(model_param, "allreduce", True):
            raise NotImplementedError(
                f"{name}: an expert-parallel parameter outside megatron-core's experts modules "
                "(SequentialMLP, TEGroupedMLP, GroupedMLP) has no known layout"
            )
        parts = row_parts(name, self._model_config, self._tp_size, c.spectra_split_qkv, c.spectra_split_fc1)
        return [make_entry(name, model_param, main, flat, self._tp_size, self._tp_rank, c.spectra_apply_to, parts, c.spectra_strategy)]

    def _stage_group(self):
        """Every rank of this pipeline stage (TP x DP x CP = expert TP x EP x expert DP): the
        group that holds every expert of the stage, for the expert-parallel part."""
        group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
        expert = (parallel_state.get_expert_tensor_parallel_world_size() * parallel_state.get_expert_model_parallel_world_size()
                  * parallel_state.get_expert_data_parallel_world_size())
        if group.size() != expert:
            raise NotImplementedError(f"Spectra's expert part needs expert TP x EP x expert DP ({expert}) to span the "
                                      f"pipeline stage's TP x DP x CP ranks ({group.size()})")
        return group

    # ------------------------------------------------------------------ update norms

    def update_norms(self, updates: list[Clipped]) -> dict:
        """{'spectra/update-norm-before/<name>': ||U||_2, '.../after/<name>': ||H_c(U)||_2, and
        their maxima} of every full matrix of one step's clip, from this process's pieces (what
        the inner optimizer's update observers get); the same on every process of the group."""
        before = {u.param: u.u for u in updates}
        after = {u.param: u.h for u in updates}
        return update_norms(self.spectra_entries, before, after, self.spectra_clipper.group)

    def _keep_update_norms(self, updates: list[Clipped]) -> None:
        self.spectra_update_norms = self.update_norms(updates)

    # ------------------------------------------------------------------ gradients

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        found_inf = self._megatron_class.prepare_grads(self)
        if not found_inf and getattr(self, "grad_scaler", None) is None:  # else the loss scaler checked
            found_inf = self._nonfinite_gradients()
        if found_inf:
            return True
        if self.spectra_config.spectra_pre_clip and not self.is_stub_optimizer:
            self.optimizer.pre_clip_gradients()  # the official order: before global-norm clipping
        return False

    def _nonfinite_gradients(self) -> bool:
        """Whether any process of this optimizer has an inf/NaN gradient; all agree."""
        held = [e for e in self.spectra_entries if e.main is not None and e.main.grad is not None]
        finite = finite_flags([e.main.grad for e in held])
        group = self.get_grad_stats_parallel_group()
        flag = (~finite).any().float().reshape(1).to(comm_device(group))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item() == 0:  # one host read per step, as megatron-core's own found_inf
            return False
        bad = [e.name for e, ok in zip(held, finite.tolist()) if not ok]
        if self.spectra_config.spectra_nonfinite == "raise":
            where = f"parameter(s) {bad}" if bad else "a parameter on another rank"
            raise NonFiniteError(f"non-finite gradient in {where}; the weights were not changed")
        return True

    # ------------------------------------------------------------------ checkpoints

    def load_state_dict(self, state_dict) -> None:
        checkpoint.check_origin(self, state_dict)
        self._megatron_class.load_state_dict(self, state_dict)
        if not self.is_stub_optimizer:
            self.optimizer.restore_step()


def _init_state(optimizer, config=None) -> None:
    optimizer.init_state()


def _shares(cls):
    """Give a single-inheritance subclass the shared Spectra methods (see _SpectraMethods)."""
    for name, value in vars(_SpectraMethods).items():
        if not name.startswith("__") and name not in vars(cls):
            setattr(cls, name, value)
    cls._megatron_class = cls.__base__
    return cls


@_shares
class SpectraDistributedOptimizer(DistributedOptimizer):
    """ZeRO-1: each DP rank holds a flat range of every TP block; clipped over TP x DP."""

    def _entries(self) -> list[Entry]:
        entries = []
        for buffer in self.buffers:  # buffer and bucket order are the same on every rank
            for bucket in buffer.buckets:
                for model_param in bucket.params_list:
                    if model_param in self.model_param_gbuf_map:
                        r = self._get_model_param_range_map(model_param)["param"]
                        group, order = self.model_param_group_index_map[model_param]
                        main = self.optimizer.param_groups[group]["params"][order]
                        entries += self._entry(model_param, main, (r.start, r.end))
                    else:
                        entries += self._entry(model_param, None, (0, 0))
        return entries

    @property
    def optimizer_state_keys(self) -> tuple:
        """The base's moments (megatron-core 0.19 reads this name; 0.16 has Adam's built in)."""
        return get_base(self.spectra_config.base).state_keys

    def get_parameter_state_dp_zero(self, use_gloo_comm=True, empty_data=False, return_on_all_ranks=False):
        keys = ("param",) + self.optimizer_state_keys
        return checkpoint.gather_dp_zero(self, keys, use_gloo_comm, empty_data, return_on_all_ranks)

    def _set_main_param_and_optimizer_states(self, model_param, tensors) -> None:
        checkpoint.set_states(self, model_param, tensors)

    _zero = True

    def _engine_group(self):
        if self._expert_part:
            want = parallel_state.get_expert_data_parallel_world_size()
        else:
            want = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        if self.data_parallel_group.size() != want:
            raise NotImplementedError("Spectra needs one distributed-optimizer instance (num_distributed_optimizer_instances=1)")
        return self._stage_group() if self._expert_part else parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)


@_shares
class SpectraFloat16Optimizer(Float16OptimizerWithFloat16Params):
    """bf16/fp16 without ZeRO: every DP rank holds whole TP blocks; clipped over TP."""

    def _entries(self) -> list[Entry]:
        entries = []
        for model_group, main_group in zip(self.float16_groups, self.fp32_from_float16_groups):
            entries += [e for m, p in zip(model_group, main_group) for e in self._entry(m, p)]
        for group in self.fp32_from_fp32_groups:
            entries += [e for p in group for e in self._entry(p, p)]
        return entries

    _zero = False

    def _engine_group(self):
        return self._stage_group() if self._expert_part else parallel_state.get_tensor_model_parallel_group()


@_shares
class SpectraFP32Optimizer(FP32Optimizer):
    """fp32 without ZeRO: the model params are the main params; clipped over TP."""

    def _entries(self) -> list[Entry]:
        return [e for group in self.optimizer.param_groups for p in group["params"] for e in self._entry(p, p)]

    _zero = False

    def _engine_group(self):
        return self._stage_group() if self._expert_part else parallel_state.get_tensor_model_parallel_group()


SPECTRA_CLASSES = (
    (DistributedOptimizer, SpectraDistributedOptimizer),
    (Float16OptimizerWithFloat16Params, SpectraFloat16Optimizer),
    (FP32Optimizer, SpectraFP32Optimizer),
)
