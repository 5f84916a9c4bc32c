"""SPECTRA in Megatron-Bridge (0.3.x, on megatron-core 0.15/0.16): one line in a recipe.

    from megatron_spectra.megatron_bridge import use_spectra

    cfg = llama3_8b_pretrain_config(...)                 # any recipe's ConfigContainer
    use_spectra(cfg, "spectra-adamw", spectra_clip_threshold=1.0)   # the one line
    pretrain(cfg, forward_step)

`use_spectra` replaces `cfg.optimizer` with a `SpectraOptimizerConfig` that keeps every field
of the recipe's own OptimizerConfig (lr, min_lr, weight decay, betas, eps, clip_grad,
bf16/fp16, use_distributed_optimizer, ...), plus the `spectra_*` keywords given. The
threshold schedule's warmup and length come from `cfg.scheduler.lr_warmup_iters` and
`cfg.train.train_iters` (as the Megatron-LM hook takes them from --lr-warmup-iters and
--train-iters) unless given as `spectra_warmup_steps` / `spectra_total_steps`.

Bridge builds its optimizer in `megatron.bridge.training.optim.setup_optimizer`, which calls
megatron-core's `get_megatron_optimizer` by the name it imported. `install()` (called by
`use_spectra`, idempotent) rebinds that one name to our factory (`megatron/factory.py`):
spectra names get the Spectra optimizers, every other name goes to megatron-core as before.
So Bridge's own parts stay as they are: its weight-decay overrides (the factory adds the
paper's: no decay on embeddings and output layer unless `spectra_decay_embeddings`), its
LR scheduler, its checkpoints (the optimizers' `sharded_state_dict` is megatron-core's).

Not supported, refused on every rank at `use_spectra` (and again by the factory):
Megatron-FSDP (`ddp.use_megatron_fsdp` / `dist.use_megatron_fsdp`) and PyTorch FSDP2
(`dist.use_torch_fsdp2`); `factory.FSDP_REFUSALS` says why and what to use instead.
"""

from __future__ import annotations

import dataclasses

from ..megatron.config import OPTIMIZERS, SpectraOptimizerConfig
from ..megatron.factory import FSDP_REFUSALS

__all__ = ["install", "spectra_config", "uninstall", "use_spectra"]

_ORIGINALS: dict = {}


def use_spectra(cfg, optimizer: str = "spectra-adamw", **spectra) -> SpectraOptimizerConfig:
    """Make Bridge ConfigContainer `cfg` train with Spectra `optimizer` (one of OPTIMIZERS);
    `spectra` are SpectraOptimizerConfig fields (spectra_clip_threshold=..., lr=...).
    Returns the new `cfg.optimizer`."""
    _refuse_fsdp(cfg, optimizer)
    spectra.setdefault("spectra_warmup_steps", getattr(cfg.scheduler, "lr_warmup_iters", 0) or 0)
    spectra.setdefault("spectra_total_steps", getattr(cfg.train, "train_iters", None))
    cfg.optimizer = spectra_config(cfg.optimizer, optimizer, **spectra)
    install()
    return cfg.optimizer


def spectra_config(base, optimizer: str = "spectra-adamw", **spectra) -> SpectraOptimizerConfig:
    """A SpectraOptimizerConfig with every init field of megatron-core OptimizerConfig `base`,
    then `optimizer` and the keywords `spectra` (an unknown keyword is a TypeError naming it)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: {optimizer!r} is not a Spectra optimizer; expected one of {OPTIMIZERS}")
    own = {f.name for f in dataclasses.fields(SpectraOptimizerConfig) if f.init}
    unknown = sorted(set(spectra) - own)
    if unknown:
        raise TypeError(f"SpectraOptimizerConfig has no field {unknown[0]!r}")
    kept = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init and f.name in own}
    return SpectraOptimizerConfig(**{**kept, **spectra, "optimizer": optimizer})


def install() -> None:
    """Route Bridge's optimizer construction through our factory (idempotent)."""
    if _ORIGINALS:
        return
    import megatron.bridge.training.optim as bridge_optim

    from ..megatron import factory

    _ORIGINALS[(bridge_optim, "get_megatron_optimizer")] = bridge_optim.get_megatron_optimizer
    bridge_optim.get_megatron_optimizer = factory.get_megatron_optimizer


def uninstall() -> None:
    for (module, name), original in _ORIGINALS.items():
        setattr(module, name, original)
    _ORIGINALS.clear()


# Bridge's spelling of Megatron-LM's flags, for the refusal.
_BRIDGE_FSDP = {
    "--use-megatron-fsdp": (("ddp", "use_megatron_fsdp"), ("dist", "use_megatron_fsdp")),
    "--use-torch-fsdp2": (("dist", "use_torch_fsdp2"),),
}


def _refuse_fsdp(cfg, optimizer: str) -> None:
    for flag, keys in _BRIDGE_FSDP.items():
        for section, key in keys:
            if getattr(getattr(cfg, section, None), key, False):
                raise ValueError(f"optimizer {optimizer} does not support {section}.{key} ({flag}): {FSDP_REFUSALS[flag]}")
