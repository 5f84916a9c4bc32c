"""SPECTRA in torchtitan (torchtitan 0.3.0 on torch 2.13).

torchtitan builds optimizers in `OptimizersContainer`: each `ParamGroupConfig` names an
optimizer, and `OptimizersContainer._resolve_optimizer_factory(name)` maps the name to a
constructor from a fixed table (Adam, AdamW, DistMuon). Its documented extension point is
inheritance ("users who want to customize the optimizer behavior can inherit from this
class"), so `SpectraOptimizersContainer` adds four names: "SpectraAdamW", "SpectraSignum",
"SpectraAdEMAMix" and "Spectra" (base given as an option). Select it in a torchtitan config:

    from megatron_spectra.fsdp.torchtitan import spectra_optimizer
    config.optimizer = spectra_optimizer(lr=8e-4, base="adamw", warmup_steps=2)

or run the example config below with torchtitan's own launcher (on GPUs, from a torchtitan
checkout, whose tests/assets hold the debug model's tokenizer and data):

    torchrun --nproc_per_node=8 -m torchtitan.train \
        --module megatron_spectra.fsdp.torchtitan --config llama3_debugmodel_spectra

On CPU, `torchrun --nproc_per_node=2 examples/torchtitan_cpu.py` trains a tiny LLaMA under
FSDP2 with torchtitan's optimizer and LR-scheduler containers.

Options: `ParamGroupConfig.optimizer_kwargs` become param-group keys (lr, weight_decay,
betas, clip, ...); the optimizer-wide options (base, clip_threshold, mode, warmup_steps,
...) go in `optimizer_factory_kwargs_by_name[name]`, or in optimizer_kwargs when every group
of that optimizer gives the same value. All groups naming the same optimizer become one
`FSDPSpectra`, so a step makes one engine call for all of them. Checkpoints go through
torchtitan's FQN-keyed optimizer state dict, which keeps param-group keys: the step and
skipped-step counters ride there.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial

from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig

from ..optim.directions import BASES
from ..optim.spectra import Spectra
from .optimizer import FSDPSpectra

NAMES = {"Spectra": None, "SpectraAdamW": "adamw", "SpectraSignum": "signum", "SpectraAdEMAMix": "ademamix"}
NO_DECAY = r"(^|\.)(tok_embeddings|output|lm_head|norm)\.|_norm\."  # LLaMA names (torchtitan: lm_head): embedding, head, norms


def _optimizer_wide() -> set[str]:
    """Constructor options that are not param-group keys."""
    names = {n for cls in (Spectra, FSDPSpectra) for n in inspect.signature(cls.__init__).parameters}
    group_keys = {k for b in BASES.values() for k in b.defaults} | {"self", "params", "lr", "weight_decay", "kwargs"}
    return names - group_keys


def build_spectra(param_groups: list[dict], *, base: str | None = None, **options) -> FSDPSpectra:
    """The factory torchtitan calls as factory(param_groups, **optimizer_factory_kwargs)."""
    wide = _optimizer_wide()
    for key in sorted({k for g in param_groups for k in g} & wide):
        values = {repr(g.get(key)) for g in param_groups}
        if len(values) > 1 or any(key not in g for g in param_groups):
            raise ValueError(f"Spectra option {key!r} is optimizer-wide: give it in every group with one value, or in optimizer_factory_kwargs_by_name")
        value = param_groups[0][key]
        if key in options and options[key] != value:
            raise ValueError(f"Spectra option {key!r} given twice: {options[key]!r} and {value!r}")
        options[key] = value
    groups = [{k: v for k, v in g.items() if k not in wide} for g in param_groups]
    given = options.pop("base", None)
    if base is not None and given not in (None, base):
        raise ValueError(f"the optimizer name fixes base={base!r}, the options say {given!r}; use the name 'Spectra' to choose")
    return FSDPSpectra(groups, base=base or given or "adamw", **options)


class SpectraOptimizersContainer(OptimizersContainer):
    """torchtitan's OptimizersContainer that also knows the Spectra optimizers."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        pass

    @staticmethod
    def _resolve_optimizer_factory(name: str):
        if name in NAMES:
            return partial(build_spectra, base=NAMES[name])
        return OptimizersContainer._resolve_optimizer_factory(name)


def spectra_optimizer(
    lr: float = 8e-4,
    base: str = "adamw",
    weight_decay: float = 0.1,
    no_decay_pattern: str = NO_DECAY,
    implementation: str = "for-loop",
    **options,
) -> SpectraOptimizersContainer.Config:
    """Like torchtitan's `default_adamw`, for SPECTRA with the paper's defaults.

    Weight decay on the block matrices only (the paper: none on embedding, output layer and
    norms, matched by `no_decay_pattern`); `options` are `FSDPSpectra` options
    (clip_threshold, clip_schedule, warmup_steps — match the lr scheduler's —, mode, betas...).
    """
    name = {"adamw": "SpectraAdamW", "signum": "SpectraSignum", "ademamix": "SpectraAdEMAMix"}[base]
    group_keys = {k for b in BASES.values() for k in b.defaults} | {"clip"}
    per_group = {k: v for k, v in options.items() if k in group_keys}
    wide = {k: v for k, v in options.items() if k not in group_keys}
    return SpectraOptimizersContainer.Config(
        implementation=implementation,
        param_groups=[
            ParamGroupConfig(pattern=no_decay_pattern, optimizer_name=name, optimizer_kwargs={"lr": lr, "weight_decay": 0.0, **per_group}),
            ParamGroupConfig(pattern=r".*", optimizer_name=name, optimizer_kwargs={"lr": lr, "weight_decay": weight_decay, **per_group}),
        ],
        optimizer_factory_kwargs_by_name={name: wide},
    )


def llama3_debugmodel_spectra():
    """torchtitan's llama3 debug config with Spectra-AdamW (a `--config` for `--module megatron_spectra.fsdp.torchtitan`)."""
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    config = llama3_debugmodel()
    config.optimizer = spectra_optimizer(lr=8e-4, base="adamw", warmup_steps=config.lr_scheduler.warmup_steps)
    return config
