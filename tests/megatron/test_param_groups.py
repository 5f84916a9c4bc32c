"""Where weight decay goes on a real megatron-core GPT (built-in trainer, one process).

The paper (the official code's param groups) decays the weights of Linear layers only: no
decay on the embedding, the output layer, norms and biases. megatron-core's standard groups
also decay the embedding and the output layer; `--spectra-decay-embeddings` asks for that."""

import pytest

pytest.importorskip("megatron.core")

from megatron_spectra.launch.spawn import run_distributed  # noqa: E402

WD = 0.1
NOT_DECAYED_BY_THE_PAPER = ("embedding.word_embeddings.weight", "output_layer.weight")


def _decay_of_every_param(rank, world, workdir, runs):
    """{run: {param name: the weight_decay its group had at the last step}}."""
    from tests.support.megatron import NamedWeights, Record, tiny_gpt, train

    def decays(trainer):
        out = {}
        for part in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
            groups = part.optimizer.param_groups
            for entry in part.spectra_entries:
                group = next(g for g in groups if any(p is entry.main for p in g["params"]))
                out[entry.name] = group["weight_decay"]
        return out

    results = {}
    for name, flags in runs.items():
        argv = tiny_gpt(workdir, name, steps=2) + ["--weight-decay", str(WD), "--lr", "1e-3"] + flags
        record = Record(finish=decays)
        train(argv, init_model=NamedWeights(), on_step=record)
        results[name] = record.final
    return results


@pytest.fixture(scope="module")
def decays(tmp_path_factory):
    runs = {
        "paper": ["--optimizer", "spectra-signum"],
        "paper-zero1": ["--optimizer", "spectra-adamw", "--use-distributed-optimizer"],
        "megatron": ["--optimizer", "spectra-adamw", "--spectra-decay-embeddings"],
    }
    return run_distributed(_decay_of_every_param, 1, args=(str(tmp_path_factory.mktemp("groups")), runs), timeout=300)[0]


@pytest.mark.parametrize("run", ["paper", "paper-zero1"])
def test_the_paper_decays_linear_weights_only(decays, run):
    got = decays[run]
    assert set(NOT_DECAYED_BY_THE_PAPER) <= set(got)
    for name, wd in got.items():
        linear = name.endswith(".weight") and "layernorm" not in name and "norm." not in name and name not in NOT_DECAYED_BY_THE_PAPER
        assert wd == (WD if linear else 0.0), name
    assert sum(wd == WD for wd in got.values()) == 2 * 4  # 2 layers x (qkv, proj, fc1, fc2)


def test_decay_embeddings_gives_megatrons_placement(decays):
    got = decays["megatron"]
    for name, wd in got.items():
        assert wd == (WD if name.endswith(".weight") and "norm" not in name else 0.0), name
    assert all(got[name] == WD for name in NOT_DECAYED_BY_THE_PAPER)


def test_overrides_merge_with_a_decoupled_lr():
    # Megatron-LM hands its own overrides (a decoupled lr for the same params): both must hold
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides

    from megatron_spectra.megatron.config import SpectraOptimizerConfig
    from megatron_spectra.megatron.factory import weight_decay_overrides

    config = SpectraOptimizerConfig(optimizer="spectra-adamw", lr=1e-3, decoupled_lr=5e-4)
    got = weight_decay_overrides(config, get_standard_config_overrides(config))
    assert got[ParamKey(attr="is_embedding_or_output_parameter")] == {"max_lr": 5e-4, "wd_mult": 0.0}
    config.spectra_decay_embeddings = True
    assert ParamKey(attr="is_embedding_or_output_parameter") not in weight_decay_overrides(config, {})
