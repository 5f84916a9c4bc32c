"""megatron-spectra: SPECTRA spectral clipping (arXiv 2603.14315) for Megatron-core and FSDP.

Layers, from the bottom: `ops` (the clipping operators, pure math), `optim` (base-optimizer
directions, threshold schedules, the single-process `Spectra`), `engine` (clipping matrices
that live in shards across processes), `megatron` and `fsdp` (adapters), `megatron_lm` (the
Megatron-LM hook and script runner), `train`, `launch`, `bench` and `cli` (the `spectra`
command, the main job `spectra demo` among its commands) on top.

The names below are imported on first use, so that `import megatron_spectra.launch` (the
launcher's dry runs) does not pay for torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "ClipNumerics": "ops",
    "normalize_singular_values": "ops",
    "soft_spectral_clip": "ops",
    "soft_spectral_clip_svd": "ops",
    "spectral_clip": "ops",
    "NonFiniteError": "optim",
    "Spectra": "optim",
    "ThresholdSchedule": "optim",
    "matrix_scale": "optim",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megatron_spectra' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
