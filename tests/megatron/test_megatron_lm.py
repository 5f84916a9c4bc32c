"""Spectra inside a real Megatron-LM checkout: pretrain_gpt.py end to end, both ways in.

Runs only with MEGATRON_LM naming a checkout (Megatron-LM is not on PyPI):

    MEGATRON_LM=/path/to/Megatron-LM pytest tests/megatron/test_megatron_lm.py

- the zero-edit runner: `torchrun --nproc-per-node 4 -m megatron_spectra.megatron_lm pretrain_gpt.py`;
- the patched checkout: patches/apply.sh on a copy, then `torchrun pretrain_gpt.py`;
- apply.sh on pretrain_gpt.py of every release tag core_v0.16.1 .. core_v0.19.0 the
  checkout's git knows;
- checkpoints through Megatron-LM's load_checkpoint: a plain `--optimizer adam` torch_dist
  checkpoint is refused by spectra-signum with CheckpointMismatch (not dist_checkpointing's
  missing keys) and taken over by spectra-adamw.

A tiny LLaMA-style GPT (TP=2 x DP=2, distributed optimizer, mock data) trains for a few
iterations on CPU processes (`--spectra-cpu`, gloo). Set-up (the tests skip naming what is
missing):
- a checkout: `git clone https://github.com/NVIDIA/Megatron-LM && git -C Megatron-LM checkout
  core_v0.16.1` (any release core_r0.16 .. 0.19), then MEGATRON_LM=<that path>;
- Megatron-LM's imports on this path: `pip install triton pybind11 six regex pydantic pyyaml`
  (scripts/install.sh installs them when MEGATRON_LM is set);
- for the checkpoint tests `pip install psutil`; for the TensorBoard test `pip install tensorboard`.
Megatron-LM compiles its dataset helpers (megatron/core/datasets/helpers_cpp*.so) with
`make`, which asks `python3` and `python3-config`; a checkout's .python-version names 3.12,
so under pyenv those resolve to 3.12 and a 3.11 run fails ("MockGPTDataset failed to build as
a mock data generator"). The test builds the helpers first for the interpreter that runs it,
with both names pointing at that interpreter (and PYENV_VERSION set to it under pyenv), in
its own runs as in Megatron-LM's rebuild check.
Releases from 0.18 on target Python 3.12; on 3.11 the one 3.12 feature on this path,
`typing.override` (a no-op decorator), is supplied by a sitecustomize in the test's PYTHONPATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MEGATRON_LM = os.environ.get("MEGATRON_LM")
needs_checkout = pytest.mark.skipif(not MEGATRON_LM, reason="set MEGATRON_LM to a Megatron-LM checkout")

REPO = Path(__file__).resolve().parents[2]
APPLY = REPO / "patches" / "apply.sh"
ITERS, C = 8, 10.0
MODEL_ARGS = [
    "--optimizer", "spectra-adamw", "--spectra-clip-threshold", str(C), "--use-distributed-optimizer",
    "--tensor-model-parallel-size", "2", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "127",
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
    "--train-iters", str(ITERS), "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2",
    "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--clip-grad", "1.0",
    "--transformer-impl", "local", "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
    "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--attention-dropout", "0",
    "--hidden-dropout", "0", "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
    "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
    "--use-cpu-initialization", "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
    "--seed", "1234", "--split", "100,0,0",
]
ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.Ee+-]+)")


# module -> pip name: what Megatron-LM imports on this path (initialize.py: triton, yaml;
# the tokenizers: six, regex; megatron.rl: pydantic) and its dataset helpers' build (pybind11).
REQUIRED = {"triton": "triton", "pybind11": "pybind11", "six": "six", "regex": "regex", "pydantic": "pydantic",
            "yaml": "pyyaml"}


def _requirements(extra: dict | None = None):
    import importlib.util
    import torch

    missing = [pip for module, pip in {**REQUIRED, **(extra or {})}.items() if importlib.util.find_spec(module) is None]
    if missing:
        pytest.skip(f"Megatron-LM needs {', '.join(missing)} (pip install {' '.join(missing)})")
    if torch.cuda.is_available():
        pytest.skip("these runs are for CPU machines (--spectra-cpu refuses where CUDA is available)")


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    # Megatron-LM builds its dataset helpers with `make`, which calls `python3` and
    # `python3-config`: both must be this interpreter, whatever pyenv or a venv would pick.
    env["PATH"] = os.pathsep.join([str(_this_python(tmp)), env.get("PATH", "")])
    version = ".".join(map(str, sys.version_info[:3]))
    pyenv_root = Path(env.get("PYENV_ROOT", Path.home() / ".pyenv"))
    if (pyenv_root / "versions" / version).is_dir():  # pyenv shims elsewhere on PATH: the same version
        env["PYENV_VERSION"] = version
    paths = [str(REPO)]
    if sys.version_info < (3, 12):
        shim = tmp / "py312"
        shim.mkdir(exist_ok=True)
        (shim / "sitecustomize.py").write_text(
            "import typing\nif not hasattr(typing, 'override'):\n    typing.override = lambda f: f\n"
        )
        paths.insert(0, str(shim))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    return env


def _this_python(tmp: Path) -> Path:
    """A folder with `python3` (this interpreter, venv included) and `python3-config` (its
    installation's, which knows its extension suffix and headers)."""
    import sysconfig

    folder = tmp / "python-bin"
    folder.mkdir(exist_ok=True)
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    config = Path(sysconfig.get_config_var("BINDIR")) / f"python{minor}-config"
    if not config.is_file():
        pytest.skip(f"no {config}: Megatron-LM's dataset helpers need this interpreter's python3-config")
    for name, target in (("python3", sys.executable), ("python3-config", str(config))):
        wrapper = folder / name
        wrapper.write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
        wrapper.chmod(0o755)
    return folder


def _build_helpers(checkout: Path, tmp: Path) -> None:
    """Megatron-LM's dataset helpers for this interpreter, before the run: rank 0's own
    `make` then finds them up to date (and a failure shows here, not as a mock-data error)."""
    import sysconfig

    datasets = checkout / "megatron" / "core" / "datasets"
    built = subprocess.run(["make", "-C", str(datasets)], env=_env(tmp), capture_output=True, text=True)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    assert built.returncode == 0 and (datasets / f"helpers_cpp{suffix}").is_file(), built.stdout + built.stderr


def _torchrun(cwd: Path, script_args: list[str], tmp: Path, timeout: float = 900, model_args=MODEL_ARGS) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
               "--master-port", str(_free_port()), *script_args, *model_args, "--spectra-cpu",
               "--spectra-log-update-norms", "--tensorboard-dir", str(tmp / "tensorboard")]
    _build_helpers(cwd, tmp)
    done = subprocess.run(command, cwd=cwd, env=_env(tmp), capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    (tmp / "output.txt").write_text(output)
    losses = {int(i): float(loss) for i, loss in ITERATION.findall(output)}
    return {"rc": done.returncode, "output": output, "losses": losses, "tensorboard": tmp / "tensorboard"}


def _free_port() -> int:
    from megatron_spectra.launch.spawn import free_port

    return free_port()


def _check_run(run: dict) -> None:
    tail = run["output"][-4000:]
    assert run["rc"] == 0, tail
    assert sorted(run["losses"]) == list(range(1, ITERS + 1)), tail  # every iteration, to the end
    assert run["losses"][ITERS] < 0.8 * run["losses"][1], run["losses"]
    announced = re.findall(r"> megatron-spectra: (.*)", run["output"])
    assert len(announced) == 1, tail  # rank 0 only
    assert announced[0].startswith(f"spectra-adamw [SpectraDistributedOptimizer] clip threshold {C}")
    assert announced[0].endswith("distributed optimizer on")


@pytest.fixture(scope="module")
def runner_run(tmp_path_factory):
    _requirements()
    tmp = tmp_path_factory.mktemp("runner")
    return _torchrun(Path(MEGATRON_LM), ["-m", "megatron_spectra.megatron_lm", str(Path(MEGATRON_LM) / "pretrain_gpt.py")], tmp)


@needs_checkout
def test_runner_trains_with_spectra_and_the_distributed_optimizer(runner_run):
    _check_run(runner_run)


@needs_checkout
def test_tensorboard_gets_the_spectra_scalars(runner_run):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    _check_run(runner_run)
    events = event_accumulator.EventAccumulator(str(runner_run["tensorboard"]), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm loss", "spectra/clip-threshold", "spectra/update-norm-after-max"} <= tags, sorted(tags)
    threshold = events.Scalars("spectra/clip-threshold")
    assert [e.step for e in threshold] == list(range(1, ITERS + 1))
    assert threshold[-1].value == C  # the standard schedule is back at c after the warmup
    after = events.Scalars("spectra/update-norm-after-max")
    before = events.Scalars("spectra/update-norm-before-max")
    assert after[-1].value <= C * 1.05 < before[-1].value  # clipped: paper mode (bf16) is approximate
    assert len([t for t in tags if t.startswith("spectra/update-norm-before/")]) == 10


@needs_checkout
def test_patched_checkout_trains_with_spectra(tmp_path):
    _requirements()
    checkout = tmp_path / "Megatron-LM"
    ignore = shutil.ignore_patterns(".git", "tests", "docs", "examples", "images", "__pycache__")
    shutil.copytree(MEGATRON_LM, checkout, ignore=ignore)
    first = subprocess.run(["bash", str(APPLY), str(checkout)], capture_output=True, text=True)
    assert first.returncode == 0 and "check passed" in first.stdout, first.stdout + first.stderr
    again = subprocess.run(["bash", str(APPLY), str(checkout)], capture_output=True, text=True)
    assert again.returncode == 0 and "already patched" in again.stdout
    _check_run(_torchrun(checkout, ["pretrain_gpt.py"], tmp_path))


def _runner(tmp: Path, optimizer: str, *extra: str) -> dict:
    """The zero-edit runner with MODEL_ARGS under another --optimizer (later flags win)."""
    model_args = [*MODEL_ARGS, "--optimizer", optimizer, "--ckpt-format", "torch_dist", *extra]
    script = ["-m", "megatron_spectra.megatron_lm", str(Path(MEGATRON_LM) / "pretrain_gpt.py")]
    return _torchrun(Path(MEGATRON_LM), script, tmp, model_args=model_args)


SAVED = ITERS // 2


@pytest.fixture(scope="module")
def adam_checkpoint(tmp_path_factory):
    """Megatron's own Adam (distributed optimizer, dp_reshardable) for ITERS iterations,
    saved as torch_dist every SAVED; the runs below load iteration SAVED (`--ckpt-step`)."""
    _requirements({"psutil": "psutil"})
    tmp = tmp_path_factory.mktemp("adam")
    run = _runner(tmp, "adam", "--save", str(tmp / "ckpt"), "--save-interval", str(SAVED))
    assert run["rc"] == 0 and sorted(run["losses"]) == list(range(1, ITERS + 1)), run["output"][-4000:]
    assert (tmp / "ckpt" / f"iter_{SAVED:07d}").is_dir()
    return {**run, "dir": tmp / "ckpt"}


@needs_checkout
def test_spectra_signum_refuses_a_plain_adam_checkpoint(adam_checkpoint, tmp_path):
    run = _runner(tmp_path, "spectra-signum", "--load", str(adam_checkpoint["dir"]), "--ckpt-step", str(SAVED))
    tail = run["output"][-4000:]
    assert run["rc"] != 0 and not run["losses"], tail
    assert "CheckpointMismatch: the checkpoint holds a plain Adam optimizer state (exp_avg, exp_avg_sq); " \
           "spectra-signum keeps ('momentum_buffer',)" in run["output"], tail
    assert "--no-load-optim" in run["output"]
    assert "not in state dict" not in run["output"], tail  # dist_checkpointing's KeyError never came


@needs_checkout
def test_spectra_adamw_takes_over_a_plain_adam_checkpoint(adam_checkpoint, tmp_path):
    run = _runner(tmp_path, "spectra-adamw", "--load", str(adam_checkpoint["dir"]), "--ckpt-step", str(SAVED))
    tail = run["output"][-4000:]
    assert run["rc"] == 0 and sorted(run["losses"]) == list(range(SAVED + 1, ITERS + 1)), tail
    assert "Loading a plain Megatron Adam checkpoint into spectra-adamw" in run["output"], tail
    assert f"step count ({SAVED}" in run["output"], tail  # Adam's count carried over
    # the first resumed loss is a forward pass of the loaded weights on Adam's next batch
    adam, resumed = adam_checkpoint["losses"], run["losses"]
    assert resumed[SAVED + 1] == pytest.approx(adam[SAVED + 1], rel=1e-4), (adam, resumed)
    assert resumed[ITERS] < 0.95 * resumed[SAVED + 1], (adam, resumed)  # and it trains on


RELEASES = ["core_v0.16.1", "core_v0.17.0", "core_v0.18.0", "core_v0.19.0"]


@needs_checkout
@pytest.mark.parametrize("tag", RELEASES)
def test_apply_sh_patches_every_release(tag, tmp_path):
    shown = subprocess.run(["git", "-C", MEGATRON_LM, "show", f"{tag}:pretrain_gpt.py"], capture_output=True, text=True)
    if shown.returncode != 0:
        pytest.skip(f"{MEGATRON_LM} has no git tag {tag}")
    script = tmp_path / "pretrain_gpt.py"
    script.write_text(shown.stdout)
    done = subprocess.run(["bash", str(APPLY), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "patched with pretrain_gpt.patch" in done.stdout  # the patch itself, not the fallback
    patched = script.read_text().splitlines()
    original = shown.stdout.splitlines()
    assert [line for line in patched if "megatron_spectra" in line] == [
        "import megatron_spectra.megatron_lm.hook  # noqa: F401  megatron-spectra: --optimizer spectra-*"
    ]
    assert [line for line in patched if "megatron_spectra" not in line] == original  # nothing else changed


def test_apply_sh_refuses_a_script_where_the_hook_is_not_first(tmp_path):
    (tmp_path / "pretrain_gpt.py").write_text('"""doc"""\nimport os\nimport megatron_spectra.megatron_lm.hook\n')
    done = subprocess.run(["bash", str(APPLY), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode != 0 and "not the first import" in done.stderr
