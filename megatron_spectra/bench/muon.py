"""megatron-core's own Muon, built as Megatron-LM builds `--optimizer dist_muon`.

    ok, reason = muon_available()
    optimizer = build_dist_muon([model], config)   # model: DDP without the distributed optimizer

`TensorParallelMuon` (default blockwise TP mode: every TP block orthogonalized on its own,
5 quintic Newton-Schulz steps) over the 2-D non-embedding weights, Adam over the rest, the
whole chain in a `LayerWiseDistributedOptimizer` (whole layers assigned to DP ranks, one
all-gather of the updated layers).

Where the pieces live depends on the megatron-core release (`_locate`):
- 0.16/0.17: `megatron.core.optimizer.muon` defines TensorParallelMuon and builds it,
  `get_megatron_muon_optimizer(..., layer_wise_distributed_optimizer=True)`, called as
  Megatron-LM's `setup_model_and_optimizer` calls it for `dist_muon`;
- 0.18+: `megatron.core.optimizer.emerging_optimizers` defines it (`muon` only forwards), and
  `get_megatron_optimizer` builds it from `optimizer="muon"` with
  `use_layer_wise_distributed_optimizer=True`, the config Megatron-LM's arguments turn
  `--optimizer dist_muon` into. The model here is plain DDP, so this is Megatron-LM's
  `--no-use-layer-wise-param-layout` build (Adam inside the LayerWise, one all-gather of the
  updated layers); its default instead wraps DDP with a shard-aligned parameter layout.

emerging-optimizers 0.3.0 declares Python >= 3.12. On Python 3.11 it needs two import shims,
and megatron-core 0.16.1, written against emerging-optimizers 0.1, one rename; each is applied
here, only where needed:
- `typing.override` (3.12) taken from typing_extensions;
- a stand-in for its optional triton kernels (`triton_kernels`) where triton is missing:
  they serve only its `use_syrk` path, which Muon's default does not take;
- 0.2.0's renames, `use_nesterov` -> `nesterov` (OrthogonalizedOptimizer) and `mode` ->
  `tp_mode` (`newton_schulz_tp`), passed under the new names where the core's Muon still
  passes the old ones (0.16; 0.17 picks the names itself, 0.18+ uses the new ones).
And on the LayerWiseDistributedOptimizer of every release:
- gloo has no all-gather of uneven sizes, which its `allgather_params` does; there the gather
  is one broadcast of each rank's flat layers instead (the same bytes);
- 0.18+ wraps its base optimizers only for bf16 and leaves fp32 ones as raw torch optimizers
  that its chain cannot step (no `prepare_grads`); those are wrapped in FP32Optimizer, as
  0.16/0.17's builder wraps them before handing them over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import sys
import types
from typing import Callable

import torch
import torch.distributed as dist

INSTALL = "pip install --no-deps --ignore-requires-python emerging-optimizers==0.3.0  (needs absl-py)"


def muon_available() -> tuple[bool, str]:
    """(True, versions) where megatron-core's Muon can be built here, else (False, why)."""
    try:
        _locate()
    except Exception as e:  # noqa: BLE001 - any import failure means: no Muon rows
        return False, f"{type(e).__name__}: {e}"
    from importlib.metadata import version

    return True, f"emerging-optimizers {version('emerging-optimizers')}, megatron-core {version('megatron-core')}"


def build_dist_muon(model_chunks, config, pg_collection=None, config_overrides=None):
    """megatron-core's dist_muon optimizer over `model_chunks` (DDP-wrapped, built without the
    distributed optimizer, as Megatron-LM requires for Muon). `config`: an OptimizerConfig
    with the muon_* fields (Megatron-LM's defaults where unset); it is copied, not changed."""
    from megatron.core.optimizer import get_standard_config_overrides

    core = _locate()
    config = dataclasses.replace(config, use_distributed_optimizer=False, **core.config_fields)
    if config_overrides is None:
        config_overrides = get_standard_config_overrides(config=config)
    names = core.build.__globals__  # where the build looks up the classes it builds
    swaps = {"LayerWiseDistributedOptimizer": _layer_wise(names["LayerWiseDistributedOptimizer"])}
    if core.renamed:
        swaps["TensorParallelMuon"] = _renamed_muon(core.muon)
    with _swapped(names, **swaps):
        return core.build(config, model_chunks, config_overrides=config_overrides, use_gloo_process_groups=True,
                          pg_collection=pg_collection, **core.build_kwargs)


# ----------------------------------------------------------------------------- where it lives


@dataclasses.dataclass(frozen=True)
class _Core:
    muon: types.ModuleType  # defines TensorParallelMuon
    build: Callable  # builds dist_muon; its module's globals name the classes it builds
    config_fields: dict  # what `--optimizer dist_muon` sets in the OptimizerConfig
    build_kwargs: dict  # and what the build is told besides
    renamed: bool  # the core passes emerging-optimizers' pre-0.2 argument names to >= 0.2


def _locate() -> _Core:
    """This megatron-core release's Muon, imported with emerging-optimizers found."""
    _import_shims()
    import emerging_optimizers.orthogonalized_optimizers  # noqa: F401 - the real ImportError, if any

    if importlib.util.find_spec("megatron.core.optimizer.emerging_optimizers") is not None:  # 0.18+
        package = importlib.import_module("megatron.core.optimizer")
        if not package.HAVE_EMERGING_OPTIMIZERS:  # fixed when megatron.core.optimizer was imported
            raise ImportError("megatron.core.optimizer was imported before emerging-optimizers could be")
        muon = importlib.import_module("megatron.core.optimizer.emerging_optimizers")
        core = _Core(muon, package.get_megatron_optimizer, {"optimizer": "muon", "use_layer_wise_distributed_optimizer": True},
                     {}, renamed=False)
    else:  # 0.16/0.17
        muon = importlib.import_module("megatron.core.optimizer.muon")
        if not muon.HAVE_EMERGING_OPTIMIZERS:  # imported earlier, before the shims
            muon = importlib.reload(muon)
        if not muon.HAVE_EMERGING_OPTIMIZERS:
            raise ImportError("megatron.core.optimizer.muon does not find emerging-optimizers")
        core = _Core(muon, muon.get_megatron_muon_optimizer, {"optimizer": "dist_muon"},
                     {"layer_wise_distributed_optimizer": True}, renamed=_passes_old_names(muon))
    return core


def _passes_old_names(muon) -> bool:
    """The core's Muon takes `use_nesterov` and passes it on as such (no HAVE_EO_V02 switch),
    while the installed OrthogonalizedOptimizer takes `nesterov`."""
    from emerging_optimizers.orthogonalized_optimizers import OrthogonalizedOptimizer

    core_old = "use_nesterov" in inspect.signature(muon.TensorParallelMuon.__init__).parameters
    installed_new = "nesterov" in inspect.signature(OrthogonalizedOptimizer.__init__).parameters
    return core_old and installed_new and not hasattr(muon, "HAVE_EO_V02")


# ----------------------------------------------------------------------------- the shims


def _import_shims() -> None:
    import typing

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override
    _triton_stand_in()


def _triton_stand_in() -> None:
    name = "emerging_optimizers.triton_kernels"
    if name in sys.modules:
        return
    try:
        import triton.language  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType(name)
        stand_in.HAS_TRITON_340 = False

        def unavailable(*args, **kwargs):
            raise RuntimeError("emerging-optimizers' triton kernels need triton (use_syrk=True)")

        stand_in.tsyrk_ex = stand_in.tsyrk_ex_small_matrix = unavailable
        sys.modules[name] = stand_in


def _renamed_muon(muon):
    """TensorParallelMuon passing 0.2.0's names to emerging-optimizers >= 0.2."""
    from emerging_optimizers.orthogonalized_optimizers import muon_utils

    def newton_schulz_tp(*args, mode="duplicated", **kwargs):
        return muon_utils.newton_schulz_tp(*args, tp_mode=mode, **kwargs)

    class Renamed(muon.OrthogonalizedOptimizer):
        def __init__(self, *args, use_nesterov: bool = False, scaled_orthogonalize_fn=None, **kwargs):
            if scaled_orthogonalize_fn is not None:
                # megatron-core's own closure, its `newton_schulz_tp` looked up in globals
                # that pass `mode` on as `tp_mode`: its code runs unchanged.
                fn = scaled_orthogonalize_fn
                scaled_orthogonalize_fn = types.FunctionType(
                    fn.__code__, {**fn.__globals__, "newton_schulz_tp": newton_schulz_tp}, fn.__name__,
                    fn.__defaults__, fn.__closure__,
                )
            super().__init__(*args, nesterov=use_nesterov, scaled_orthogonalize_fn=scaled_orthogonalize_fn, **kwargs)

    class CompatMuon(muon.TensorParallelMuon, Renamed):  # MRO: TensorParallelMuon -> Renamed -> installed
        pass

    return CompatMuon


def _layer_wise(layer_wise):
    """LayerWiseDistributedOptimizer with its fp32 base optimizers wrapped, and its uneven
    all-gather of the updated layers run as broadcasts where the DP group is gloo's."""
    from megatron.core.optimizer.optimizer import FP32Optimizer, MegatronOptimizer

    class Compat(layer_wise):
        def __init__(self, optimizers, config, *args, init_state_fn_list=None, **kwargs):
            if not (config.bf16 or config.fp16):
                # 0.18+ wraps its base optimizers only for bf16 and chains raw torch optimizers
                # otherwise, which cannot step (no prepare_grads): wrap them in FP32Optimizer as
                # 0.16/0.17's builder did before handing them over.
                fns = init_state_fn_list or [None] * len(optimizers)
                optimizers = [o if isinstance(o, MegatronOptimizer) else FP32Optimizer(o, config, fn)
                              for o, fn in zip(optimizers, fns)]
            super().__init__(optimizers, config, *args, init_state_fn_list=init_state_fn_list, **kwargs)

        @torch.no_grad()
        def allgather_params(self) -> None:
            if self.pg_collection is None or not self.dp_cp_params_list:
                return super().allgather_params()
            if dist.get_backend(self.pg_collection.dp_cp) != "gloo" or self.expt_dp_params_list:
                return super().allgather_params()
            _broadcast_layers(self.dp_cp_params_list, self.pg_collection.dp_cp)

    return Compat


def _broadcast_layers(params_list, group) -> None:
    """Each rank's updated layers to every rank: one flat broadcast per rank."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    rank = dist.get_rank(group)
    for owner, params in enumerate(params_list):
        if not params:
            continue
        flat = _flatten_dense_tensors(params) if owner == rank else params[0].new_empty(sum(p.numel() for p in params))
        dist.broadcast(flat, dist.get_global_rank(group, owner), group=group)
        if owner != rank:
            for new, p in zip(_unflatten_dense_tensors(flat, params), params):
                p.data.copy_(new)


@contextlib.contextmanager
def _swapped(namespace: dict, **names):
    """`names` bound in `namespace` (a module's globals) for the duration."""
    old = {name: namespace[name] for name in names}
    namespace.update(names)
    try:
        yield
    finally:
        namespace.update(old)
