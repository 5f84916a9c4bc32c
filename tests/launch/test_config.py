"""Config validation: errors name the key; the paper configs give the paper's numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_spectra.launch import ConfigError, layout, load_config, missing_inputs, trainer_args, validate
from megatron_spectra.launch.config import resolve_bases

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
ENV = {"DATA_PATH": "/data/fwe", "VOCAB_FILE": "/data/vocab.json", "MERGE_FILE": "/data/merges.txt", "MEGATRON_LM": "/opt/Megatron-LM"}
RUN_FILES = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name not in ("models", "optimizers", "sweeps"))


def tiny(**sections) -> dict:
    data = resolve_bases(CONFIGS / "tiny-cpu.yaml")
    for dotted, value in sections.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return data


def flag(args: list, name: str):
    i = args.index(name)
    return args[i + 1]


@pytest.mark.parametrize("change, key", [
    (dict(training__lrr=1.0), "training.lrr"),
    (dict(modell={}), "modell"),
    (dict(optimizer__spectra={"clip_threshhold": 3.0}), "optimizer.spectra.clip_threshhold"),
    (dict(training__lr="fast"), "training.lr"),
    (dict(training__train_iters=6.5), "training.train_iters"),
    (dict(training__bf16=1), "training.bf16"),
    (dict(parallel__tensor_parallel=3), "parallel.tensor_parallel"),
    (dict(training__global_batch_size=10), "training.global_batch_size"),
    (dict(parallel__pipeline_parallel=2, parallel__gpus_per_node=4, model__num_layers=3), "parallel.pipeline_parallel"),
    (dict(optimizer__name="lion"), "optimizer.name"),
    (dict(parallel__nodes=2), "parallel.nodes"),
    (dict(parallel__sequence_parallel=True), "parallel.sequence_parallel"),
])
def test_errors_name_the_key(change, key):
    with pytest.raises(ConfigError) as e:
        validate(tiny(**change), env={})
    assert e.value.key == key, str(e.value)
    assert key in str(e.value)


def test_batch_error_gives_the_numbers():
    with pytest.raises(ConfigError, match=r"10 is not divisible by micro_batch_size 2 x data-parallel size 2 = 4"):
        validate(tiny(training__global_batch_size=10), env={})


def test_missing_env_and_paths_name_the_key(tmp_path):
    data = tiny(data__path="${DATA_PATH}")
    with pytest.raises(ConfigError, match="data.path: environment variable DATA_PATH is not set"):
        validate(data, env={})
    ok = load_config(CONFIGS / "780m-deep" / "spectra-adamw.yaml", env={"DATA_PATH": str(tmp_path / "d"), "VOCAB_FILE": str(tmp_path / "v"),
                                                                          "MERGE_FILE": str(tmp_path / "m"), "MEGATRON_LM": str(tmp_path)})
    assert {e.key for e in missing_inputs(ok)} == {"data.path", "data.vocab_file", "data.merge_file", "megatron.path"}
    (tmp_path / "d.bin").write_bytes(b""), (tmp_path / "d.idx").write_bytes(b"")
    for name in ("v", "m"):
        (tmp_path / name).write_text("x")
    (tmp_path / "pretrain_gpt.py").write_text("")
    assert missing_inputs(ok) == []


def test_unset_variables_are_missing_inputs_like_absent_files():
    """allow_unset (the spectra commands): an unset ${VAR} stays in the value and is one more
    missing input, reported with the absent files, all at once."""
    config = load_config(CONFIGS / "780m-deep" / "spectra-adamw.yaml", env={"DATA_PATH": "/nowhere/fwe"}, allow_unset=True)
    missing = {e.key: str(e) for e in missing_inputs(config)}
    assert set(missing) == {"data.path", "data.vocab_file", "data.merge_file", "megatron.path"}
    assert "no /nowhere/fwe.bin" in missing["data.path"]
    assert missing["data.vocab_file"].endswith("data.vocab_file: environment variable VOCAB_FILE is not set")
    assert missing["megatron.path"].endswith("megatron.path: environment variable MEGATRON_LM is not set")
    assert config["data"]["vocab_file"] == "${VOCAB_FILE}"  # what the dry run's command shows
    builtin = validate(tiny(data__vocab_file="${VOCAB_FILE}"), env={}, allow_unset=True)
    assert missing_inputs(builtin) == []  # the builtin trainer reads no vocabulary file
    with pytest.raises(ConfigError, match="launcher: environment variable WHERE is not set"):
        validate(tiny(launcher="${WHERE}"), env={}, allow_unset=True)  # not a valid value: an error at once


def test_inheritance_and_float_spelling():
    config = load_config(CONFIGS / "160m" / "signum.yaml", env=ENV)
    assert config["training"]["lr"] == 5e-4 and isinstance(config["training"]["lr"], float)  # written 5.0e-4
    assert config["training"]["lr_warmup_iters"] == 8000  # run file over model file over paper.yaml
    assert config["training"]["adam_beta1"] == 0.8
    assert config["optimizer"]["spectra"]["apply_to"] == "none"
    over = load_config(CONFIGS / "160m" / "signum.yaml", overrides={"training.lr": 1e-3}, env=ENV)
    assert over["training"]["lr"] == 1e-3


# The paper's numbers (arXiv 2603.14315, Appendix F: Tables F.1 and F.5-F.8; the official run scripts).
PAPER = {
    "124m": dict(layers=12, hidden=768, heads=12, ffn=2048, seq=512, batch=256, clip=0.5, betas=("0.8", "0.999"), iters=24414, tied=True),
    "160m": dict(layers=12, hidden=768, heads=12, ffn=2048, seq=512, batch=256, clip=0.5, betas=("0.8", "0.999"), iters=128000, tied=False),
    "780m-deep": dict(layers=32, hidden=1280, heads=20, ffn=3584, seq=1024, batch=1012, clip=0.1, betas=("0.9", "0.999"), iters=16000, tied=False),
    "820m-wide": dict(layers=12, hidden=2048, heads=16, ffn=5632, seq=1024, batch=992, clip=0.1, betas=("0.9", "0.999"), iters=16000, tied=False),
}
LR = {("780m-deep", "signum"): "0.0002", ("820m-wide", "signum"): "0.0002", ("160m", "signum"): "0.0005", ("124m", "signum"): "0.0005",
      ("780m-deep", "ademamix"): "0.0005"}


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_paper_config_arguments(path):
    model, opt = path.parent.name, path.stem
    p = PAPER[model]
    config = load_config(path, env=ENV)
    args = trainer_args(config)
    expect = {"--num-layers": p["layers"], "--hidden-size": p["hidden"], "--num-attention-heads": p["heads"],
              "--ffn-hidden-size": p["ffn"], "--seq-length": p["seq"], "--max-position-embeddings": p["seq"],
              "--global-batch-size": p["batch"], "--clip-grad": p["clip"], "--train-iters": p["iters"],
              "--adam-beta1": p["betas"][0], "--adam-beta2": p["betas"][1], "--weight-decay": "0.1",
              "--lr": LR.get((model, opt), "0.001"), "--lr-decay-style": "WSD", "--lr-wsd-decay-style": "minus_sqrt",
              "--lr-wsd-decay-iters": round(0.2 * p["iters"]), "--min-lr": "0.0", "--norm-epsilon": "1e-05",
              "--lr-warmup-iters": 8000 if opt == "signum" and model in ("124m", "160m") else 2000,
              "--attention-dropout": "0.0", "--hidden-dropout": "0.0", "--tokenizer-type": "GPT2BPETokenizer",
              "--data-path": "/data/fwe", "--vocab-file": "/data/vocab.json", "--merge-file": "/data/merges.txt"}
    for name, value in expect.items():
        assert flag(args, name) == str(value), name
    assert float(flag(args, "--lr-warmup-init")) == pytest.approx(float(flag(args, "--lr")) / 100)
    for switch in ("--swiglu", "--disable-bias-linear", "--bf16", "--use-distributed-optimizer"):
        assert switch in args
    assert flag(args, "--normalization") == "RMSNorm" and flag(args, "--position-embedding-type") == "rope"
    assert ("--untie-embeddings-and-output-weights" in args) == (not p["tied"])
    # vocab 50304: GPT-2's 50257 padded to a multiple of make_vocab_size_divisible_by x TP = 128
    tp = int(flag(args, "--tensor-model-parallel-size"))
    assert int(flag(args, "--make-vocab-size-divisible-by")) * tp == 128
    lay = layout(config)
    assert lay.micro_batch_size * lay.data_parallel * lay.grad_accum == p["batch"]
    assert lay.world_size == lay.tensor_parallel * lay.pipeline_parallel * lay.data_parallel
    _check_optimizer(model, opt, args)


def _check_optimizer(model, opt, args):
    name = flag(args, "--optimizer")
    assert name == "spectra-" + opt.removeprefix("spectra-")  # the AdamW baseline too: the paper's wd placement
    assert "--spectra-decay-embeddings" not in args  # wd on Linear weights only, as the paper
    if "signum" in opt:
        assert flag(args, "--spectra-signum-init") == "weight"  # the official Signum's buffer start
    if opt.startswith("spectra-"):
        assert flag(args, "--spectra-clip-threshold") == "10.0"
        assert flag(args, "--spectra-clip-schedule") == ("wsd-sqrt" if model == "780m-deep" else "standard")
        assert flag(args, "--spectra-mode") == "paper" and flag(args, "--spectra-ns-steps") == "10"
        assert flag(args, "--spectra-apply-to") == "all" and "--spectra-pre-clip" not in args
    else:  # baselines Megatron lacks: the same base direction, nothing clipped
        assert flag(args, "--spectra-apply-to") == "none"
    if "signum" in opt:
        assert flag(args, "--spectra-signum-momentum") == "0.95" and "--spectra-signum-no-nesterov" not in args
    if "ademamix" in opt:
        assert flag(args, "--spectra-ademamix-beta3") == "0.999" and flag(args, "--spectra-ademamix-alpha") == "8.0"
        assert flag(args, "--spectra-ademamix-warmup") == flag(args, "--train-iters")


def test_every_model_has_its_optimizers():
    names = {(p.parent.name, p.stem) for p in RUN_FILES}
    for model in ("160m", "780m-deep", "820m-wide"):
        for opt in ("adamw", "spectra-adamw", "signum", "spectra-signum", "ademamix", "spectra-ademamix"):
            assert (model, opt) in names


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM"), reason="set MEGATRON_LM to a Megatron-LM checkout to parse with its own parser")
def test_megatron_lm_parser_accepts_every_paper_command():
    commands = [trainer_args(load_config(p, env=ENV)) for p in RUN_FILES]
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "megatron_lm_parse.py"), os.environ["MEGATRON_LM"]],
                         input=json.dumps(commands), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1:] == ["ok"], out.stdout + out.stderr


def test_builtin_parser_accepts_the_commands():
    args_mod = pytest.importorskip("megatron_spectra.train.args", reason="the builtin trainer is not there")
    parser = args_mod.build_parser()
    for path in [CONFIGS / "tiny-cpu.yaml", *RUN_FILES[:4]]:
        data = resolve_bases(path)
        data.update(entry="builtin", launcher="local")
        data["data"] = {"path": None}
        data["parallel"] = {"nodes": 1, "gpus_per_node": data["parallel"]["gpus_per_node"],
                            "tensor_parallel": data["parallel"].get("tensor_parallel", 1)}
        parser.parse_args(trainer_args(validate(data, env=ENV)))
