"""Megatron-LM integration: `--optimizer spectra-*` for pretrain_gpt.py, without forking it.

`install()` patches five names of megatron.training, all resolved at call time:
- `arguments.add_megatron_arguments`: adds the spectra names to `--optimizer` and the
  `--spectra-*` flags;
- `arguments.validate_args` (and the copy `initialize` imported in core_r0.16/0.17): runs
  Megatron's validation as for Adam, because for any other name it moves the run to the
  layer-wise optimizer and switches ZeRO-1 off, which our optimizer must keep;
- `training.get_megatron_optimizer_config`: builds a SpectraOptimizerConfig from the args
  (warmup and length of the threshold schedule from --lr-warmup-iters and --train-iters);
- `training.get_megatron_optimizer`: routes spectra names to our factory;
- `training.training_log`: adds the spectra scalars to TensorBoard / W&B.

Two ways in: the patch in `patches/` adds `import megatron_spectra.megatron.lm` to
pretrain_gpt.py (importing this module installs), or, with no edit, run
`torchrun ... -m megatron_spectra.run pretrain_gpt.py <args>`.
"""

from __future__ import annotations

import dataclasses

from .config import OPTIMIZERS, SpectraOptimizerConfig

_ORIGINALS: dict = {}
_LIVE_OPTIMIZERS: list = []


def add_spectra_arguments(parser):
    """The --spectra-* flags; dest names are SpectraOptimizerConfig's field names."""
    action = next(a for a in parser._actions if "--optimizer" in a.option_strings)
    if action.choices is not None:
        action.choices = list(action.choices) + [n for n in OPTIMIZERS if n not in action.choices]
    group = parser.add_argument_group("spectra", "SPECTRA spectral clipping (megatron-spectra)")
    group.add_argument("--spectra-clip-threshold", type=float, default=10.0, help="clipping threshold c")
    group.add_argument("--spectra-clip-schedule", default="standard", choices=["constant", "standard", "wsd-sqrt"])
    group.add_argument("--spectra-decay-fraction", type=float, default=0.2, help="wsd-sqrt: decay fraction of training")
    group.add_argument("--spectra-mode", default="paper", choices=["paper", "accurate"])
    group.add_argument("--spectra-ns-steps", type=int, default=10, help="Newton-Schulz steps (paper mode)")
    group.add_argument("--spectra-ns-fp32", action="store_true", help="paper mode in fp32 instead of bf16")
    group.add_argument("--spectra-apply-to", default="all", choices=["all", "2d", "hidden"])
    group.add_argument("--spectra-split-qkv", action="store_true", help="clip Q, K, V separately")
    group.add_argument("--spectra-split-fc1", action="store_true", help="clip SwiGLU gate and up separately")
    group.add_argument("--spectra-strategy", default="auto", choices=["auto", "owner", "gram"])
    group.add_argument("--spectra-pre-clip", action="store_true", help="pre-clip matrix gradients")
    group.add_argument("--spectra-pre-clip-threshold", type=float, default=0.1)
    group.add_argument("--spectra-nonfinite", default="skip", choices=["skip", "raise"])
    group.add_argument("--spectra-log-update-norms", action="store_true")
    group.add_argument("--spectra-signum-momentum", type=float, default=0.95)
    group.add_argument("--spectra-signum-no-nesterov", dest="spectra_signum_nesterov", action="store_false")
    group.add_argument("--spectra-ademamix-beta3", type=float, default=0.999)
    group.add_argument("--spectra-ademamix-alpha", type=float, default=8.0)
    group.add_argument("--spectra-ademamix-warmup", type=int, default=None)
    return parser


def spectra_config_from_args(args) -> SpectraOptimizerConfig:
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(SpectraOptimizerConfig) if f.init and hasattr(args, f.name)}
    kwargs["spectra_warmup_steps"] = getattr(args, "lr_warmup_iters", 0) or 0
    kwargs["spectra_total_steps"] = getattr(args, "train_iters", None)
    return SpectraOptimizerConfig(**kwargs)


def install() -> None:
    """Patch Megatron-LM's training package (idempotent)."""
    if _ORIGINALS:
        return
    import megatron.training.arguments as arguments
    import megatron.training.training as training

    from . import factory

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
            return optimizer

        return get_megatron_optimizer

    _patch(training, "get_megatron_optimizer_config", config_from_args)
    _patch(training, "get_megatron_optimizer", optimizer_factory)
    _patch(training, "training_log", _log_spectra_scalars)


def uninstall() -> None:
    for (module, name), original in _ORIGINALS.items():
        setattr(module, name, original)
    _ORIGINALS.clear()


def _patch(module, name: str, wrap) -> None:
    original = getattr(module, name)
    _ORIGINALS[(module, name)] = original
    setattr(module, name, wrap(original))


def _validate_as_adam(original):
    def validate_args(args, defaults={}):
        name = args.optimizer
        if name in OPTIMIZERS:
            args.optimizer = "adam"
        try:
            return original(args, defaults)
        finally:
            args.optimizer = name

    return validate_args


def _log_spectra_scalars(original):
    def training_log(*args, **kwargs):
        result = original(*args, **kwargs)
        iteration = kwargs.get("iteration", args[3] if len(args) > 3 else None)
        _write_scalars(iteration)
        return result

    return training_log


def _write_scalars(iteration) -> None:
    if not _LIVE_OPTIMIZERS or iteration is None:
        return
    from megatron.training import get_args
    from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

    args = get_args()
    if iteration % max(getattr(args, "tensorboard_log_interval", 1), 1):
        return
    scalars = spectra_scalars(_LIVE_OPTIMIZERS[0])
    writer, wandb = get_tensorboard_writer(), get_wandb_writer()
    for key, value in scalars.items():
        if writer is not None:
            writer.add_scalar(key, value, iteration)
    if wandb is not None and scalars:
        wandb.log(scalars, iteration)


def spectra_scalars(optimizer) -> dict:
    """The spectra scalars of every Spectra part of a (chained) Megatron optimizer."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    scalars = {}
    for i, part in enumerate(parts):
        if hasattr(part, "spectra_log"):
            suffix = "" if len(parts) == 1 else f"/{i}"
            scalars.update({k + suffix: v for k, v in part.spectra_log().items()})
    return scalars


install()
