"""The SPECTRA settings are declared once (megatron_spectra/settings.py): every surface shows
exactly those settings, with their defaults and choices, and refuses a bad value naming it."""

import argparse
import dataclasses
import inspect
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_spectra import Spectra
from megatron_spectra.launch import ConfigError, validate
from megatron_spectra.launch.config import resolve_bases, set_dotted
from megatron_spectra.launch.schema import SPECTRA
from megatron_spectra.settings import SETTINGS, config_fields, flag_settings, spectra_settings

ROOT = Path(__file__).resolve().parents[1]

# One bad value per check; a setting with several ways to be wrong appears more than once.
BAD = [
    ("clip_threshold", 0.0), ("clip_threshold", -1.0), ("clip_threshold", math.inf),
    ("pre_clip_threshold", 0.0), ("decay_fraction", 0.0), ("decay_fraction", 1.5),
    ("ns_steps", 0), ("warmup_steps", -1), ("total_steps", 0),
    ("lr", -1e-3), ("lr", math.nan), ("weight_decay", -0.1), ("eps", -1e-8), ("betas", (0.9, 1.0)),
    ("momentum", 1.0), ("mix_alpha", -1.0), ("alpha_warmup", -1), ("ademamix_beta3", 1.0), ("ademamix_warmup", -1),
    ("clip_schedule", "cosine"), ("mode", "fast"), ("apply_to", "3d"), ("nonfinite", "ignore"), ("strategy", "nearest"),
    ("ns_fp32", "yes"), ("post_process", "orthogonalize"), ("clip_final_scale", -0.5), ("threshold_base_lr", "peak"),
    ("pre_clip_schedule", "cosine"), ("pre_clip_threshold_end", 0.0),
]


def params():
    return [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(3))]


def test_the_declaration_imports_neither_torch_nor_megatron_core():
    code = "import sys, megatron_spectra.settings; assert not {'torch', 'megatron.core'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_every_check_rejects_what_it_should_and_the_defaults_pass():
    for s in SETTINGS.values():
        assert s.validate(s.default) == s.default, s.name
        assert s.doc and (s.type is not str or s.choices), s.name
    for name, bad in BAD:
        with pytest.raises(ValueError, match=name):
            SETTINGS[name].validate(bad)


# ------------------------------------------------------------------ Spectra


def test_spectra_takes_exactly_the_declared_keywords_with_their_defaults():
    signature = inspect.signature(Spectra).parameters
    assert list(signature)[0] == "params"
    assert {n: p.default for n, p in list(signature.items())[1:]} == {s.name: s.default for s in spectra_settings()}
    opt = Spectra(params())
    assert {k: v for k, v in opt.settings.items() if k != "betas"} == {
        s.name: s.default for s in spectra_settings() if "adamw" in s.bases and s.name != "betas"}


def test_spectra_names_an_unknown_keyword_and_the_known_ones():
    with pytest.raises(ValueError, match=r"\['clip_threshhold'\].*clip_threshold"):
        Spectra(params(), clip_threshhold=3.0)
    with pytest.raises(ValueError, match="do not apply to base 'signum'"):
        Spectra(params(), "signum", betas=(0.9, 0.99))


@pytest.mark.parametrize("base", ["adamw", "signum", "ademamix"])
def test_the_declared_base_defaults_are_the_directions_own(base):
    from megatron_spectra.optim.directions import BASES

    opt = Spectra(params(), base)
    assert {k: opt.defaults[k] for k in BASES[base].defaults} == BASES[base].defaults


def test_the_declared_choices_are_what_the_code_implements():
    from megatron_spectra.ops.soft_clip import MODES
    from megatron_spectra.optim.directions import BUILT_IN
    from megatron_spectra.optim.schedules import SCHEDULES

    assert SETTINGS["base"].choices == BUILT_IN
    assert SETTINGS["clip_schedule"].choices == SCHEDULES
    assert SETTINGS["mode"].choices == MODES


@pytest.mark.parametrize("name, bad", [(n, b) for n, b in BAD if SETTINGS[n].spectra], ids=str)
def test_spectra_refuses_a_bad_value_naming_it(name, bad):
    base = SETTINGS[name].bases[-1]
    with pytest.raises(ValueError, match=name):
        Spectra(params(), base=base, **{name: bad})


def test_a_param_groups_own_values_are_checked_too():
    with pytest.raises(ValueError, match="param group 1's lr"):
        Spectra([{"params": params()[:1]}, {"params": params()[1:], "lr": -1.0}])


def test_fsdp_spectra_strategy_is_the_declared_one():
    from megatron_spectra.fsdp.optimizer import FSDPSpectra

    assert inspect.signature(FSDPSpectra).parameters["strategy"].default == SETTINGS["strategy"].default


# ------------------------------------------------------------------ Megatron: config and flags


@pytest.fixture(scope="module")
def megatron():
    pytest.importorskip("megatron.core")
    from megatron.core.optimizer import OptimizerConfig

    from megatron_spectra.megatron.arguments import add_spectra_arguments, spectra_config_from_args
    from megatron_spectra.megatron.config import SpectraOptimizerConfig

    return OptimizerConfig, SpectraOptimizerConfig, add_spectra_arguments, spectra_config_from_args


def parser(megatron):
    p = argparse.ArgumentParser(exit_on_error=False, allow_abbrev=False)
    p.add_argument("--optimizer", default="adam", choices=["adam"])
    p.add_argument("--lr-warmup-iters", type=int, default=0)
    p.add_argument("--train-iters", type=int, default=None)
    return megatron[2](p)


def test_the_config_adds_exactly_the_declared_fields(megatron):
    OptimizerConfig, SpectraOptimizerConfig, *_ = megatron
    assert dataclasses.is_dataclass(SpectraOptimizerConfig) and issubclass(SpectraOptimizerConfig, OptimizerConfig)
    inherited = {f.name for f in dataclasses.fields(OptimizerConfig)}
    ours = {f.name: f.default for f in dataclasses.fields(SpectraOptimizerConfig) if f.name not in inherited}
    assert ours == {s.megatron: s.default for s in config_fields()}
    for s in SETTINGS.values():  # the settings read from megatron-core's own fields
        assert not s.core or s.megatron in inherited


def test_the_flags_are_exactly_the_declared_ones(megatron):
    flags = {a.option_strings[0]: a for a in parser(megatron)._actions if a.option_strings[0].startswith("--spectra")}
    assert list(flags) == [s.flag for s in flag_settings()]
    for s in flag_settings():
        action = flags[s.flag]
        assert (action.dest, action.default, tuple(action.choices or ()), action.help) == (s.dest, s.default, s.choices, s.doc), s.name


def test_no_flags_make_the_declared_defaults(megatron):
    _, SpectraOptimizerConfig, _, from_args = megatron
    args = parser(megatron).parse_args(["--optimizer", "spectra-adamw"])
    assert from_args(args) == SpectraOptimizerConfig(optimizer="spectra-adamw")
    args = parser(megatron).parse_args(["--optimizer", "spectra-adamw", "--lr-warmup-iters", "5", "--train-iters", "50"])
    assert (from_args(args).spectra_warmup_steps, from_args(args).spectra_total_steps) == (5, 50)


@pytest.mark.parametrize("name, bad", [(n, b) for n, b in BAD if SETTINGS[n].megatron], ids=str)
def test_the_config_refuses_a_bad_value_naming_its_field(megatron, name, bad):
    field = SETTINGS[name].megatron
    with pytest.raises(ValueError, match=field):
        megatron[1](optimizer="spectra-adamw", **{field: bad})


@pytest.mark.parametrize("name, bad", [(n, b) for n, b in BAD if SETTINGS[n].flag and SETTINGS[n].type is not bool], ids=str)
def test_a_flag_refuses_a_bad_value_naming_it(megatron, name, bad):
    flag = SETTINGS[name].flag
    with pytest.raises(argparse.ArgumentError, match=flag):
        parser(megatron).parse_args(["--optimizer", "spectra-adamw", flag, str(bad)])


def test_megatron_core_fields_are_checked_too(megatron):
    for field, bad in (("adam_beta2", 1.0), ("adam_eps", -1.0), ("lr", math.inf), ("weight_decay", -1.0)):
        with pytest.raises(ValueError, match=field):
            megatron[1](optimizer="spectra-adamw", **{field: bad})
    with pytest.raises(ValueError, match=r"spectra_total_steps \(--train-iters\)"):
        megatron[1](optimizer="spectra-adamw", spectra_clip_schedule="wsd-sqrt")


@pytest.mark.parametrize("base", ["adamw", "signum", "ademamix"])
def test_a_config_means_the_same_spectra(megatron, base):
    config = megatron[1](optimizer=f"spectra-{base}", lr=2e-3, adam_beta2=0.95, spectra_clip_threshold=3.0,
                         spectra_signum_momentum=0.9, spectra_ademamix_warmup=7, spectra_log_update_norms=True)
    opt = Spectra(params(), **config.spectra_kwargs())
    assert opt.schedule.c == 3.0 and opt.track_update_norms and opt.param_groups[0]["lr"] == 2e-3
    assert {k: opt.defaults[k] for k in config.base_hyperparameters()} == config.base_hyperparameters()


# ------------------------------------------------------------------ the launcher


def tiny_config(**spectra) -> dict:
    data = resolve_bases(ROOT / "configs" / "tiny-cpu.yaml")
    data["optimizer"]["spectra"] = {}
    for key, value in spectra.items():
        data = set_dotted(data, f"optimizer.spectra.{key}", value)
    return data


def test_the_launch_table_is_exactly_the_flags():
    assert list(SPECTRA) == [s.launch_key for s in flag_settings()]
    for s in flag_settings():
        key = SPECTRA[s.launch_key]
        assert (key.default, key.choices, key.flag, key.doc) == (s.default, s.choices, s.flag, s.doc), s.name
    assert validate(tiny_config(), env={})["optimizer"]["spectra"] == {s.launch_key: s.default for s in flag_settings()}


@pytest.mark.parametrize("name, bad", [(n, b) for n, b in BAD if SETTINGS[n].flag], ids=str)
def test_the_launcher_refuses_a_bad_value_naming_its_key(name, bad):
    key = f"optimizer.spectra.{SETTINGS[name].launch_key}"
    with pytest.raises(ConfigError) as e:
        validate(tiny_config(**{SETTINGS[name].launch_key: bad}), env={})
    assert e.value.key == key and key in str(e.value)


def test_every_launch_key_reaches_the_config_through_its_flag(megatron):
    from megatron_spectra.launch import trainer_args

    changed = {"clip_threshold": 3.0, "clip_schedule": "constant", "decay_fraction": 0.5, "mode": "accurate", "ns_steps": 7,
               "ns_fp32": True, "apply_to": "hidden", "split_qkv": True, "split_fc1": True, "strategy": "gram",
               "pre_clip": True, "pre_clip_threshold": 0.2, "nonfinite": "skip", "log_update_norms": True,
               "signum_momentum": 0.9, "signum_nesterov": False, "ademamix_beta3": 0.99, "ademamix_alpha": 4.0,
               "ademamix_warmup": 5, "cpu": True, "post_process": "normalize", "clip_final_scale": 0.5,
               "threshold_base_lr": "group", "pre_clip_schedule": "linear", "pre_clip_threshold_end": 0.05,
               "signum_init": "zero", "decay_embeddings": True}
    assert set(changed) == set(SPECTRA) and all(changed[k] != SPECTRA[k].default for k in changed)
    args = trainer_args(validate(tiny_config(**changed), env={}))
    parsed, _ = parser(megatron).parse_known_args(args)
    for key, value in changed.items():
        assert getattr(parsed, "spectra_" + key) == value, key


@pytest.mark.parametrize("key, bad", [
    ("model.num_attention_heads", 0), ("model.num_layers", 0), ("model.seq_length", 0), ("model.num_query_groups", 0),
    ("model.dropout", 1.0), ("model.norm_epsilon", 0.0), ("training.lr", 0.0), ("training.lr", math.inf),
    ("training.min_lr", 1.0), ("training.adam_beta1", 1.0), ("training.adam_eps", -1.0), ("training.weight_decay", -0.1),
    ("training.clip_grad", -1.0), ("training.log_interval", 0), ("training.eval_interval", 0),
    ("training.save_interval", 0), ("training.lr_warmup_iters", -1), ("data.vocab_multiple", 0),
])
def test_the_launcher_checks_model_and_training_values_too(key, bad):
    with pytest.raises(ConfigError) as e:
        validate(set_dotted(tiny_config(), key, bad), env={})
    assert e.value.key == key and key in str(e.value)
