"""Megatron-Bridge (0.3.1) on a machine without CUDA, for tests.

Nothing of `megatron.bridge` imports without Transformer Engine, which is CUDA-only: the
package's `__init__` imports AutoBridge -> models.conversion -> peft, and
`peft/lora_layers.py` runs `import transformer_engine.pytorch as te` and subclasses
`te.Linear` at import time (so do `peft/lora.py` and
`models/gpt_full_te_layer_autocast_spec.py`). `import_bridge()` serves exactly those
importers an inert stand-in (every attribute an empty nn.Module subclass): LoRA and the TE
layer spec are not used here. Every other importer (megatron-core) still gets ImportError and
keeps its non-TE code, which `import_bridge` checks afterwards. On a machine with TE the real
one is imported and nothing is stood in. `bridge_on_cpu()` lets Bridge's `pretrain()` run on
CPU processes (what the Megatron-LM hook's --spectra-cpu does for Megatron-LM).
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import importlib.util
import sys
import types

import torch

_TE = "transformer_engine"


class _InertType(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _InertType(name, (torch.nn.Module,), {})


class _InertModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _InertType(name, (torch.nn.Module,), {})


def _standing_in(original_import):
    """builtins.__import__ that hands megatron.bridge's own `import transformer_engine...`
    the stand-in (never entered in sys.modules, so no other module can pick it up) and
    everyone else what they would get without TE: ModuleNotFoundError."""
    top = _InertModule(_TE)
    top.pytorch = _InertModule(_TE + ".pytorch")

    def __import__(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and (name == _TE or name.startswith(_TE + ".")):
            if (globals or {}).get("__name__", "").startswith("megatron.bridge."):
                module = top
                if fromlist:  # `from transformer_engine.pytorch import X`: the innermost module
                    for part in name.split(".")[1:]:
                        module = getattr(module, part)
                return module
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return original_import(name, globals, locals, fromlist, level)

    return __import__


def missing_for_bridge() -> str | None:
    """What keeps megatron.bridge from importing here (a module name), or None."""
    try:
        import_bridge()
    except ImportError as e:
        return getattr(e, "name", None) or str(e)
    return None


def import_bridge():
    """megatron.bridge.training.{config,optim} (and the package), TE stood in if absent."""
    if importlib.util.find_spec(_TE) is not None:
        return importlib.import_module("megatron.bridge.training.optim")
    import megatron.core.optimizer  # noqa: F401 -- megatron-core first, seeing no TE

    original = builtins.__import__
    builtins.__import__ = _standing_in(original)
    try:
        importlib.import_module("megatron.bridge.training.config")
        optim = importlib.import_module("megatron.bridge.training.optim")
        importlib.import_module("megatron.bridge.training.pretrain")
        importlib.import_module("megatron.bridge.training.gpt_step")
    finally:
        builtins.__import__ = original
    _check_core_saw_no_te()
    return optim


def _check_core_saw_no_te() -> None:
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and module is not None:
            for value in vars(module).values():
                if isinstance(value, (_InertModule, _InertType)):
                    raise AssertionError(f"{name} took the Transformer Engine stand-in")


@contextlib.contextmanager
def bridge_on_cpu():
    """Bridge's pretrain() on CPU processes under gloo: megatron-core switched to CPU
    (megatron/cpu.py), and Bridge's set-up told what Megatron-LM's is by the hook's
    --spectra-cpu: initialize without CUDA, the CPU counted as one device for the model-
    parallel RNG seeding, no CUDA fusion warm-up."""
    import megatron.bridge.training.initialize as initialize
    import megatron.bridge.training.setup as setup

    from megatron_spectra.megatron.cpu import cpu_as_one_device, megatron_on_cpu

    def no_cuda(original):
        return lambda *args, **kwargs: original(*args, **{**kwargs, "allow_no_cuda": True})

    patches = [(setup, "initialize_megatron", no_cuda), (setup, "set_jit_fusion_options", lambda o: lambda *a, **k: None),
               (initialize, "_set_random_seed", cpu_as_one_device), (initialize, "compile_helpers", _built_helpers)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    with megatron_on_cpu():
        for owner, name, wrap in patches:
            setattr(owner, name, wrap(getattr(owner, name)))
        try:
            yield
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)


def _built_helpers(original):
    """Bridge's rank 0 runs `make` in megatron-core's datasets folder; the wheel ships the
    helpers built, so there is nothing to make when they import."""
    def compile_helpers():
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError:
            original()
    return compile_helpers
