"""Spectra selected from a torchtitan optimizer config, with the real torchtitan package."""

import pytest

pytest.importorskip(
    "torchtitan.components.optimizer",
    reason="torchtitan is not importable: pip install --no-deps torchtitan==0.3.0 spmd_types==0.2.3 tyro",
)

from tests.support.fsdp import Run, reference_losses  # noqa: E402
from megatron_spectra.fsdp.torchtitan import NAMES, SpectraOptimizersContainer, build_spectra  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def titan(two_ranks):
    return two_ranks[0]["torchtitan"]  # run in the 2-rank launch (conftest.py)


def _close(got, want, rel=1e-4):
    assert len(got) == len(want) and got
    assert max(abs(g - w) / abs(w) for g, w in zip(got, want)) <= rel, f"\n got {got}\nwant {want}"


def test_the_container_builds_one_spectra_with_the_papers_groups(titan):
    # no decay on embedding, output layer and norms; decay on the 2 x 7 block matrices
    assert titan["optimizers"] == [("FSDPSpectra", [(0.0, 2 + 1 + 2 * 2), (0.1, 2 * 7)])]


def test_the_container_trains_like_the_reference_spectra(titan):
    _close(titan["constant"], reference_losses(Run("fsdp", "adamw")))


def test_torchtitan_checkpoint_resumes_the_same(titan):
    assert titan["loaded_step"] == 4
    _close(titan["resumed"], titan["scheduled"][4:])


def test_optimizer_names_and_options():
    import torch.nn as nn
    from torchtitan.components.optimizer import ParamGroupConfig

    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))

    def build(name, group_kwargs, factory_kwargs=None):
        config = SpectraOptimizersContainer.Config(
            implementation="for-loop",
            param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name=name, optimizer_kwargs={"lr": 1e-3, **group_kwargs})],
            optimizer_factory_kwargs_by_name={name: factory_kwargs or {}},
        )
        return config.build(model_parts=[model]).optimizers[0]

    assert sorted(NAMES) == ["Spectra", "SpectraAdEMAMix", "SpectraAdamW", "SpectraSignum"]
    assert build("SpectraSignum", {"momentum": 0.9}).base.name == "signum"
    opt = build("Spectra", {"base": "ademamix"}, {"clip_threshold": 5.0, "mode": "accurate"})
    assert opt.base.name == "ademamix" and opt.schedule.c == 5.0 and opt.numerics.mode == "accurate"
    assert "base" not in opt.param_groups[0] and opt.param_groups[0]["lr"] == 1e-3
    assert build("AdamW", {}).__class__.__name__ == "AdamW"  # torchtitan's own names still work
    with pytest.raises(ValueError, match="fixes base='signum'"):
        build("SpectraSignum", {"base": "adamw"})
    with pytest.raises(ValueError, match="given twice"):
        build_spectra([{"params": list(model.parameters()), "mode": "paper"}], mode="accurate")


def test_the_example_config_parses_with_torchtitans_config_manager():
    pytest.importorskip(
        "torchtitan.models.llama3.config_registry",
        reason="torchtitan's LLaMA-3 configs import its data stack (torchdata, tokenizers, datasets), not installed here",
    )
    from torchtitan.config import ConfigManager

    config = ConfigManager().parse_args(["--module", "megatron_spectra.fsdp.torchtitan", "--config", "llama3_debugmodel_spectra"])
    assert isinstance(config.optimizer, SpectraOptimizersContainer.Config)
    assert {g.optimizer_name for g in config.optimizer.param_groups} == {"SpectraAdamW"}
