"""Running megatron-core on CPU under gloo: for tests, and for the main job on a machine with no GPU.

    with megatron_on_cpu():
        ... parallel_state, GPTModel, DDP, get_megatron_optimizer, the schedules, dist_checkpointing ...

or `enable_megatron_cpu()` ... `disable_megatron_cpu()`. Nothing happens at import time.

Notes (megatron-core 0.16.1, torch 2.13 CPU build)
--------------------------------------------------
megatron-core has no CPU mode. Its layers are fine on CPU with `use_cpu_initialization=True`
and the local (non-Transformer-Engine) layer spec, and parallel_state builds its groups on any
backend; what breaks is a handful of direct CUDA calls in DDP, the optimizers and the model:

- `torch.cuda.current_device()` is the device of DDP's grad/param buffers, the distributed
  optimizer's dummy state and gathers, RoPE's `inv_freq` and many scratch tensors. It returns
  the CPU *device* here, not an index: every caller passes it on as `device=` or to `.to()`.
- `device="cuda"` is hard-coded in the scalars of `clip_grads`, `grad_scaler`,
  `MixedPrecisionOptimizer.__init__`, `FP32Optimizer`, `utils.local_multi_tensor_l2_norm` (the
  no-apex fallback) and dist_checkpointing's exchange/verification tensors. We remap it in the
  tensor factories (`torch.tensor/zeros/empty/..._like`), and drop `pin_memory=True`, which
  needs an accelerator (RoPE's context-parallel index).
- `Tensor.type()` without arguments: `Float16OptimizerWithFloat16Params` and
  `DistributedOptimizer._build_model_and_main_param_groups` accept only
  `'torch.cuda.{Float,Half,BFloat16}Tensor'` (else TypeError), `clip_grads` asserts it. A CPU
  tensor answers with its CUDA name; `.type(dtype)` is untouched.
- Streams, events and `synchronize` (the overlap paths of DDP and the distributed optimizer,
  p2p communication, dist_checkpointing) become no-ops: CPU work is already ordered.
- The CUDA RNG becomes the CPU default generator. The TP RNG tracker
  (`CudaRNGStatesTracker.add/fork`, `model_parallel_cuda_manual_seed`, activation
  checkpointing) saves, seeds and restores "the CUDA RNG" around dropout in TP regions; with
  the CPU generator in its place, a fork really changes the CPU draws inside it and restores
  them after, and each TP rank's tracker stream is seeded with its own seed, as on GPU.
  Surprise: megatron does not go through `torch.cuda.set_rng_state` but through its own
  `_get_cuda_rng_state/_set_cuda_rng_state` (default_generators, `_lazy_call`), so those two
  are redirected in `megatron.core.tensor_parallel.random` itself; the tracker and the
  checkpointing code look them up there at call time. A consequence: megatron's
  `model_parallel_cuda_manual_seed(seed)` reseeds the CPU generator with `seed`
  (Megatron-LM calls `torch.manual_seed(seed)` just before it, so nothing changes there).
- `Tensor.cuda()` is the identity (grad scaler and language-module state loading call it).
- Not redirected: `Tensor.to("cuda")` (only the CPU-offloading HybridDeviceOptimizer uses it),
  `Tensor.is_cuda` (a property torch itself relies on), `torch.cuda.is_available()` (megatron
  uses it to decide not to use CUDA-only features, which is what we want), memory statistics,
  CUDA graphs and NVTX (off by default in megatron).
- Also needed, but not by this module: the same seed on every rank (DDP does not broadcast
  the initial parameters), and gloo, which in torch 2.13 has every collective DDP, the
  distributed optimizer and dist_checkpointing use on this path.

Safety: it refuses to switch on where CUDA is available unless `force=True` (on a GPU
machine it would silently move megatron's work to the CPU), nested switching-on is counted,
and the last `disable_megatron_cpu()` puts back every original object: `getattr(owner, name)`
is again exactly what it was, and an attribute that was only inherited (`Tensor.type` lives
on `torch._C.TensorBase`) is deleted again rather than left shadowed.
"""

from __future__ import annotations

import contextlib
import importlib
import threading

import torch

__all__ = ["disable_megatron_cpu", "enable_megatron_cpu", "is_enabled", "megatron_on_cpu", "redirect_table"]

_CPU = torch.device("cpu")
_MISSING = object()  # "the owner had no attribute of its own"
_lock = threading.Lock()
_saved: list[tuple[object, str, object]] = []  # (owner, name, original or _MISSING), in apply order
_depth = 0

# The tensor factories that take `device=`; megatron passes "cuda" to several of them.
_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "eye", "linspace",
    "rand", "randn", "randint", "randperm", "empty_strided",
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
)


class _Event:
    """torch.cuda.Event on CPU: recorded and complete at once."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event):
        return 0.0


class _Stream:
    """torch.cuda.Stream (and current/default stream) on CPU: there is one ordered stream."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _Event()

    def synchronize(self):
        pass

    def query(self):
        return True


def cpu_as_one_device(original):
    """Megatron-LM's (and Bridge's) _initialize_distributed sets up megatron's model-parallel
    groups, and _set_random_seed seeds the TP RNG tracker, only when
    `torch.cuda.device_count() > 0`; for these calls the CPU counts as one device (the
    set_device and CUDA seeding they do are redirected here)."""

    def one_device(*args, **kwargs):
        count = torch.cuda.device_count
        torch.cuda.device_count = lambda: 1
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.device_count = count

    return one_device


def _synchronize(*args, **kwargs):
    pass


def _set_device(*args, **kwargs):
    pass


def _to_cpu(device):
    """'cuda', 'cuda:1', torch.device('cuda') and bare GPU indices -> the CPU device."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, (str, torch.device)) and str(device).startswith("cuda"):
        return _CPU
    return device


def _factory(original):
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # pinning needs an accelerator
        return original(*args, **kwargs)

    factory.__wrapped__ = original
    factory.__name__ = original.__name__
    return factory


def _tensor_type(original):
    def type(self, dtype=None, non_blocking=False, **kwargs):  # noqa: A001 - it is Tensor.type
        if dtype is None and not kwargs:
            name = original(self)
            if self.device.type == "cpu" and name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        return original(self, dtype, non_blocking, **kwargs)

    type.__wrapped__ = original
    return type


def _cuda_tensor(self, *args, **kwargs):
    return self


# The CPU default generator itself, not torch.manual_seed & co: torch.manual_seed calls
# torch.cuda.manual_seed_all, which would then call us back.
def _seed_cpu(seed):
    torch.default_generator.manual_seed(int(seed))


def _get_cpu_rng_state(*args, **kwargs):
    return torch.default_generator.get_state()


def _set_cpu_rng_state(new_state, *args, **kwargs):
    torch.default_generator.set_state(new_state)


def redirect_table() -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement): everything `enable_megatron_cpu` changes, in one table.

    Built afresh on each call (the factory wrappers close over the current originals); it
    imports megatron.core.tensor_parallel.random, whose two RNG helpers are in the table.
    """
    cuda, random = torch.cuda, importlib.import_module("megatron.core.tensor_parallel.random")
    table = [
        # DDP's _ParamAndGradBuffer allocates param_data/grad_data on it; DistributedOptimizer
        # allocates dummy state (load_state_dict) and gather buffers; tensor_parallel mappings,
        # RotaryEmbedding (inv_freq, .to(current_device)), dist_checkpointing async/verify flags.
        (cuda, "current_device", lambda: _CPU),
        # DDP bucket groups: default_stream().wait_stream(comm stream) with several optimizer
        # instances; dist_checkpointing and p2p_communication synchronize; overlap paths wait.
        (cuda, "current_stream", lambda *a, **k: _Stream()),
        (cuda, "default_stream", lambda *a, **k: _Stream()),
        (cuda, "stream", lambda *a, **k: contextlib.nullcontext()),
        (cuda, "Stream", _Stream),  # DistributedDataParallel.__init__ (num_distributed_optimizer_instances > 1)
        (cuda, "Event", _Event),
        (cuda, "synchronize", _synchronize),  # DDP offload helpers, p2p_communication, fully_parallel save/load
        (cuda, "set_device", _set_device),  # dist_checkpointing async workers (and Megatron-LM's initialize)
        # The "CUDA" RNG is the CPU default generator: CudaRNGStatesTracker.add seeds and reads
        # it, model_parallel_cuda_manual_seed seeds it, activation checkpointing saves it.
        (cuda, "get_rng_state", _get_cpu_rng_state),
        (cuda, "set_rng_state", _set_cpu_rng_state),
        (cuda, "manual_seed", _seed_cpu),
        (cuda, "manual_seed_all", _seed_cpu),
        (cuda.random, "get_rng_state", _get_cpu_rng_state),  # the same functions, called via torch.cuda.random
        (cuda.random, "set_rng_state", _set_cpu_rng_state),
        (cuda.random, "manual_seed", _seed_cpu),
        (cuda.random, "manual_seed_all", _seed_cpu),
        # megatron's own versions, used by CudaRNGStatesTracker.fork/add, _get/_set_all_rng_states
        # and CheckpointFunction; they go through torch.cuda.default_generators and _lazy_call.
        (random, "_get_cuda_rng_state", _get_cpu_rng_state),
        (random, "_set_cuda_rng_state", _set_cpu_rng_state),
        # Float16OptimizerWithFloat16Params, DistributedOptimizer and clip_grads accept only
        # 'torch.cuda.*Tensor' names (no-argument form only).
        (torch.Tensor, "type", _tensor_type(torch.Tensor.type)),
        # ConstantGradScaler/DynamicGradScaler.load_state_dict, LanguageModule's embedding
        # sync, dist_checkpointing exchange_utils, offload helpers.
        (torch.Tensor, "cuda", _cuda_tensor),
    ]
    # device="cuda": clip_grads (norms, zero counts), grad_scaler (scale, bounds),
    # MixedPrecisionOptimizer (found_inf, _dummy_overflow_buf, _scale_one), FP32Optimizer._scale,
    # utils.local_multi_tensor_l2_norm, transformer.utils masks, dist_checkpointing
    # (ShardedTensor.init_data("cuda"), exchange_utils empty_like, state_dict_saver flags).
    table += [(torch, name, _factory(getattr(torch, name))) for name in _FACTORIES]
    return table


def enable_megatron_cpu(force: bool = False) -> None:
    """Switch the redirects on. Nested calls are counted; each needs its own disable.

    Refuses where CUDA is available, unless `force=True`.
    """
    global _depth
    with _lock:
        if _depth == 0:
            if torch.cuda.is_available() and not force:
                raise RuntimeError(
                    "enable_megatron_cpu: CUDA is available on this machine; megatron would run on the "
                    "CPU instead of the GPU. Pass force=True if that is what you want."
                )
            _warm_dynamo()
            table = redirect_table()
            try:
                for owner, name, replacement in table:
                    _saved.append((owner, name, vars(owner).get(name, _MISSING)))
                    setattr(owner, name, replacement)
            except BaseException:
                _restore()
                raise
        _depth += 1


def disable_megatron_cpu() -> None:
    """Undo one enable; the last one puts every original object back."""
    global _depth
    with _lock:
        if _depth == 0:
            raise RuntimeError("disable_megatron_cpu() without a matching enable_megatron_cpu()")
        _depth -= 1
        if _depth == 0:
            _restore()


def _warm_dynamo() -> None:
    """torch._dynamo builds its table of torch functions once per process (functools.cache),
    from whatever `torch.cuda.synchronize` etc. are at that moment; megatron's torch.compile'd
    fusions trigger it at import. Built while we are on, it would record our stand-ins (and
    assert on any two names sharing one), and keep them after we are off. Build it first."""
    try:
        from torch._dynamo.trace_rules import get_torch_obj_rule_map
    except ImportError:
        return
    get_torch_obj_rule_map()


def _restore() -> None:
    while _saved:
        owner, name, original = _saved.pop()  # reverse order: a name patched twice ends as it began
        if original is _MISSING:
            delattr(owner, name)  # it was inherited; deleting ours uncovers it again
        else:
            setattr(owner, name, original)


@contextlib.contextmanager
def megatron_on_cpu(force: bool = False):
    """`with megatron_on_cpu(): ...` = enable_megatron_cpu(force) ... disable_megatron_cpu()."""
    enable_megatron_cpu(force)
    try:
        yield
    finally:
        disable_megatron_cpu()


def is_enabled() -> bool:
    return _depth > 0
