"""Running megatron-core on CPU under gloo: for tests, and the main job on a machine with no GPU.

    with megatron_on_cpu():
        ... build parallel_state, GPTModel, DDP, the optimizer, train ...

megatron-core has no CPU mode; its DDP buffers, optimizers and layers call CUDA directly. We
redirect the handful of entry points they use, and only while switched on:

- `torch.cuda.current_device` -> the CPU device: buffers, grad-norm tensors and dummy optimizer
  state are allocated with `device=torch.cuda.current_device()`;
- streams, events and `synchronize` -> no-ops: the grad-reduce and param-gather overlap code
  waits on streams;
- `device="cuda"` in the tensor factories -> CPU: clip_grads, the grad scaler and
  MixedPrecisionOptimizer create their scalars that way;
- `Tensor.type()` (no-arg form) -> the CUDA name of the CPU type: Float16Optimizer and
  DistributedOptimizer accept only 'torch.cuda.{Float,Half,BFloat16}Tensor';
- `Tensor.cuda` -> identity;
- the CUDA RNG (`torch.cuda.{get,set}_rng_state,manual_seed`, megatron's `_get/_set_cuda_rng_state`)
  -> the CPU generator: the TP RNG tracker forks it around dropout and initialisation.

It refuses to switch on where CUDA is available unless asked (`force=True`), nests (a counter),
and `disable` puts back every original object, so torch behaves exactly as before.
"""

from __future__ import annotations

import contextlib
import importlib

import torch

_CPU = torch.device("cpu")
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint", "zeros_like", "ones_like", "empty_like")
_CUDA_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.HalfTensor": "torch.cuda.HalfTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor", "torch.LongTensor": "torch.cuda.LongTensor",
                    "torch.IntTensor": "torch.cuda.IntTensor", "torch.ByteTensor": "torch.cuda.ByteTensor",
                    "torch.BoolTensor": "torch.cuda.BoolTensor", "torch.DoubleTensor": "torch.cuda.DoubleTensor"}
_MISSING = object()
_saved: list[tuple[object, str, object]] = []
_depth = 0


class _Stream:
    """Stands in for torch.cuda.Stream/Event: every wait and record is a no-op on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def query(self):
        return True


def _on_cpu(device):
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, (str, torch.device)) and str(device).startswith("cuda")):
        return _CPU
    return device


def _factory(original):
    def make(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        return original(*args, **kwargs)

    return make


def _tensor_type(original):
    def type_(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        return _CUDA_TYPE_NAMES.get(result, result) if not args and not kwargs else result

    return type_


def _redirects() -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement): the whole shim in one table."""
    cuda = torch.cuda
    table = [
        (cuda, "current_device", lambda: _CPU),
        (cuda, "current_stream", lambda *a, **k: _Stream()),
        (cuda, "default_stream", lambda *a, **k: _Stream()),
        (cuda, "stream", lambda *a, **k: contextlib.nullcontext()),
        (cuda, "Stream", _Stream),
        (cuda, "Event", _Stream),
        (cuda, "synchronize", lambda *a, **k: None),
        (cuda, "empty_cache", lambda *a, **k: None),
        (cuda, "set_device", lambda *a, **k: None),
        (cuda, "device_count", lambda: 0),
        (cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state()),
        (cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
        (cuda, "manual_seed", lambda seed: None),
        (cuda, "manual_seed_all", lambda seed: None),
        (torch.Tensor, "cuda", lambda self, *a, **k: self),
        (torch.Tensor, "type", _tensor_type(torch.Tensor.type)),
    ]
    table += [(torch, name, _factory(getattr(torch, name))) for name in _FACTORIES]
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    table += [
        (random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state()),
        (random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state)),
    ]
    return table


def enable_megatron_cpu(force: bool = False) -> None:
    """Switch the redirects on (nested calls count)."""
    global _depth
    if _depth == 0:
        if torch.cuda.is_available() and not force:
            raise RuntimeError("megatron_on_cpu: CUDA is available here; pass force=True to run megatron-core on CPU anyway")
        for owner, name, replacement in _redirects():
            _saved.append((owner, name, vars(owner).get(name, _MISSING)))  # inherited: nothing to restore
            setattr(owner, name, replacement)
    _depth += 1


def disable_megatron_cpu() -> None:
    """Switch them off again once every enable has been matched; torch is then as before."""
    global _depth
    if _depth == 0:
        raise RuntimeError("disable_megatron_cpu without a matching enable_megatron_cpu")
    _depth -= 1
    if _depth == 0:
        while _saved:
            owner, name, original = _saved.pop()
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


@contextlib.contextmanager
def megatron_on_cpu(force: bool = False):
    enable_megatron_cpu(force)
    try:
        yield
    finally:
        disable_megatron_cpu()


def is_enabled() -> bool:
    return _depth > 0
