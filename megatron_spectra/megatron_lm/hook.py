"""The Megatron-LM hook: `--optimizer spectra-*` for pretrain_gpt.py, without forking it.
Importing this module installs it.

`install()` patches five names of megatron.training and one of megatron-core, all resolved
at call time:
- `arguments.add_megatron_arguments`: adds the spectra names to `--optimizer` and the
  `--spectra-*` flags;
- `arguments.validate_args` (and the copy `initialize` imported in core_r0.16/0.17): runs
  Megatron's validation as for Adam, because for any other name it moves the run to the
  layer-wise optimizer and switches ZeRO-1 off, which our optimizer must keep; it first
  refuses --use-torch-fsdp2 and --use-megatron-fsdp (factory.FSDP_REFUSALS says why);
- `training.get_megatron_optimizer_config`: builds a SpectraOptimizerConfig from the args
  (warmup and length of the threshold schedule from --lr-warmup-iters and --train-iters);
- `training.get_megatron_optimizer`: routes spectra names to our factory;
- `training.training_log`: adds the spectra scalars to TensorBoard / W&B.
- `megatron.core.dist_checkpointing.load` (which Megatron-LM's load_checkpoint calls for
  every dist format): refuses a checkpoint whose optimizer state the live Spectra
  optimizer cannot take (a plain Adam one into spectra-signum) with the clear
  `CheckpointMismatch` of megatron/checkpoint.py, before dist_checkpointing would fail
  with its list of missing tensor keys.

With `--spectra-cpu` on the command line (a machine without a GPU: tests, smoke runs) it
also switches megatron-core to CPU (`cpu.enable_megatron_cpu`, which refuses where CUDA is
available), lets `initialize_megatron` run without CUDA and makes gloo the backend. The flag
is read from `sys.argv` at install, because Megatron-LM asserts CUDA before it parses args.

Two ways in: the patch in `patches/` adds `import megatron_spectra.megatron_lm.hook` to
pretrain_gpt.py, or, with no edit, run
`torchrun ... -m megatron_spectra.megatron_lm pretrain_gpt.py <args>` (`__main__.py`).
"""

from __future__ import annotations

import os
import sys

from ..megatron.arguments import add_spectra_arguments, spectra_config_from_args
from ..megatron.config import OPTIMIZERS
from ..megatron.scalars import write_spectra_scalars

_ORIGINALS: dict = {}
_LIVE_OPTIMIZERS: list = []


def install() -> None:
    """Patch Megatron-LM's training package (idempotent)."""
    if _ORIGINALS:
        return
    import megatron.training.arguments as arguments
    import megatron.training.training as training

    from ..megatron import factory

    _patch(arguments, "add_megatron_arguments", lambda original: lambda parser: add_spectra_arguments(original(parser)))
    _patch(arguments, "validate_args", _validate_as_adam)
    try:
        import megatron.training.initialize as initialize

        if hasattr(initialize, "validate_args"):  # core_r0.16/0.17 import it by name
            _patch(initialize, "validate_args", _validate_as_adam)
    except ImportError:
        pass

    def config_from_args(original):
        def get_megatron_optimizer_config(args):
            if args.optimizer not in OPTIMIZERS:
                return original(args)
            from megatron.core.optimizer import get_standard_config_overrides

            config = spectra_config_from_args(args)
            return config, get_standard_config_overrides(config=config)

        return get_megatron_optimizer_config

    def optimizer_factory(original):
        def get_megatron_optimizer(config, model_chunks, *a, **kw):
            if config.optimizer not in OPTIMIZERS:
                return original(config, model_chunks, *a, **kw)
            optimizer = factory.get_megatron_optimizer(config, model_chunks, *a, **kw)
            _LIVE_OPTIMIZERS[:] = [optimizer]
            _announce(config, optimizer)
            return optimizer

        return get_megatron_optimizer

    _patch(training, "get_megatron_optimizer_config", config_from_args)
    _patch(training, "get_megatron_optimizer", optimizer_factory)
    _patch(training, "training_log", _log_spectra_scalars)
    import megatron.core.dist_checkpointing as dist_checkpointing

    from ..megatron.checkpoint import checking_load

    _patch(dist_checkpointing, "load", lambda original: checking_load(original, lambda: _LIVE_OPTIMIZERS))
    if "--spectra-cpu" in sys.argv:
        _switch_to_cpu(training)


def _announce(config, optimizer) -> None:
    """One line on rank 0 naming what was built (Megatron's own log of the config says
    'adam': its factory is what builds our optimizer's skeleton)."""
    from megatron.training.utils import print_rank_0

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    kinds = ", ".join(type(p).__name__ for p in parts)
    print_rank_0(
        f"> megatron-spectra: {config.optimizer} [{kinds}] clip threshold {config.spectra_clip_threshold} "
        f"({config.spectra_clip_schedule}), mode {config.spectra_mode}, strategy {config.spectra_strategy}, "
        f"distributed optimizer {'on' if config.use_distributed_optimizer else 'off'}"
    )


def uninstall() -> None:
    for (module, name), original in _ORIGINALS.items():
        if module == "cpu":
            from ..megatron.cpu import disable_megatron_cpu

            disable_megatron_cpu()
        else:
            setattr(module, name, original)
    _ORIGINALS.clear()


def _patch(module, name: str, wrap) -> None:
    original = getattr(module, name)
    _ORIGINALS[(module, name)] = original
    setattr(module, name, wrap(original))


def _switch_to_cpu(training) -> None:
    from ..megatron.cpu import cpu_as_one_device, enable_megatron_cpu

    enable_megatron_cpu()  # raises on a machine with CUDA: megatron would silently leave the GPU idle
    # validate_args insists on it with TP on pre-Blackwell devices (our stand-in is 0.0);
    # it only orders CUDA kernel queues, so on CPU it changes nothing.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _ORIGINALS[("cpu", "enable_megatron_cpu")] = None  # uninstall() switches it off again

    def no_cuda(original):
        def initialize_megatron(*args, **kwargs):
            kwargs["allow_no_cuda"] = True
            return original(*args, **kwargs)

        return initialize_megatron

    _patch(training, "initialize_megatron", no_cuda)
    # The warm-up compiles Megatron's CUDA fusions for GPU shapes (inductor, minutes on CPU).
    _patch(training, "set_jit_fusion_options", lambda original: lambda *args, **kwargs: None)
    import megatron.training.arguments as arguments
    import megatron.training.initialize as initialize

    # validate_args asks the GPU's architecture; a CPU is "pre-Blackwell" (then it wants
    # CUDA_DEVICE_MAX_CONNECTIONS=1 with TP, set above).
    _patch(arguments, "get_device_arch_version", lambda original: lambda: 0)

    for name in ("_initialize_distributed", "_set_random_seed"):
        _patch(initialize, name, cpu_as_one_device)
    try:  # core_r0.16 only: CUDA extensions built with nvcc; the CPU path uses none of them
        import megatron.legacy.fused_kernels as fused_kernels

        _patch(fused_kernels, "load", lambda original: lambda *args, **kwargs: None)
    except ImportError:
        pass


def _validate_as_adam(original):
    def validate_args(args, defaults={}):
        name = args.optimizer
        _refuse_unsupported(args)
        if getattr(args, "spectra_cpu", False):
            args.distributed_backend = "gloo"
        if name in OPTIMIZERS:
            args.optimizer = "adam"
        try:
            return original(args, defaults)
        finally:
            args.optimizer = name

    return validate_args


def _refuse_unsupported(args) -> None:
    """Megatron-LM's FSDP flags, refused for the spectra names before Megatron validates or
    builds anything (every rank parses and validates the same command line)."""
    from ..megatron.factory import fsdp_refusal

    if args.optimizer not in OPTIMIZERS:
        return
    for flag in ("--use-torch-fsdp2", "--use-megatron-fsdp"):
        if getattr(args, flag[2:].replace("-", "_"), False):
            raise ValueError(fsdp_refusal(args.optimizer, flag))


def _log_spectra_scalars(original):
    def training_log(*args, **kwargs):
        result = original(*args, **kwargs)
        iteration = kwargs.get("iteration", args[3] if len(args) > 3 else None)
        _write_scalars(iteration)
        return result

    return training_log


def _write_scalars(iteration) -> None:
    """After Megatron-LM's own training_log, at its TensorBoard interval, through its writers
    (which exist on the last rank only, as for every other scalar Megatron logs)."""
    if not _LIVE_OPTIMIZERS or iteration is None:
        return
    from megatron.training import get_args
    from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

    if iteration % max(getattr(get_args(), "tensorboard_log_interval", 1), 1):
        return
    tensorboard, wandb = get_tensorboard_writer(), get_wandb_writer()
    if tensorboard is not None or wandb is not None:
        write_spectra_scalars(_LIVE_OPTIMIZERS[0], iteration, tensorboard, wandb)


install()
