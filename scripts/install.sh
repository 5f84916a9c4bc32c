#!/usr/bin/env bash
# Everything a fresh machine needs, and nothing it already has.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Keep the user's torch. Without one, take the pinned CPU wheel explicitly: a bare "torch"
# requirement lets pip pull a multi-GB CUDA build.
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
# megatron-core is pinned: 0.16.1, the newest release that installs on Python 3.11; the
# Python 3.12 job of scripts/test.sh passes MEGATRON_CORE=<the newest release>.
"$PY" -m pip install -q -e ".[test,plot]" "megatron-core==${MEGATRON_CORE:-0.16.1}"
# torchtitan, for the FSDP integration's tests: its wheel asks for a newer torch (and pulls a
# CUDA build), but the parts we use (optimizer/LR-scheduler containers, its DCP state dict)
# run on the torch above, so it and spmd_types go in without dependencies; tyro is its
# config parser. Optional: the torchtitan tests skip without it.
if ! "$PY" -c "import torchtitan" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps "torchtitan==0.3.0" "spmd_types==0.2.3" \
        && "$PY" -m pip install -q "tyro==1.0.17" \
        || echo "install.sh: torchtitan not installed; its tests will be skipped" >&2
fi
# emerging-optimizers, for megatron-core's own Muon (the dist-muon rows of `spectra bench
# megatron`, megatron_spectra/bench/muon.py): 0.3.0 declares Python >= 3.12 but runs on 3.11
# with the shim there; without dependencies (its torch requirement would pull a CUDA build),
# absl-py is the one it imports. Optional: the bench skips its rows without it.
if ! "$PY" -c "import emerging_optimizers" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --ignore-requires-python "emerging-optimizers==0.3.0" \
        && "$PY" -m pip install -q "absl-py==2.5.1" \
        || echo "install.sh: emerging-optimizers not installed; bench megatron skips its dist-muon rows" >&2
fi
# megatron-bridge, for tests/megatron/test_megatron_bridge.py (megatron-core 0.15/0.16 only):
# its wheel lists CUDA-only dependencies (transformer-engine, mamba-ssm, causal-conv1d, ...),
# so it and the two NVIDIA packages its training modules import at load time go in without
# dependencies, then the pure-Python packages those imports need (datasets brings pyarrow and
# pandas; triton because megatron-core's inference modules, which Bridge imports, import it
# unconditionally). Transformer Engine is stood in by the test. Optional: the test skips without it.
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(not m.version('megatron-core').startswith(('0.15.', '0.16.')))" \
    && ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('megatron.bridge') is None)" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps "megatron-bridge==0.3.1" "nvidia-resiliency-ext==0.4.1" "nvidia-modelopt==0.40.0" \
        && "$PY" -m pip install -q "transformers==4.57.6" "huggingface-hub<1.0" "datasets==5.0.1" "omegaconf==2.4.0" \
            "einops==0.8.2" "rich" "tqdm" "defusedxml" "nvidia-ml-py" "pulp" "torchprofile==0.1.0" \
            "triton==3.9.0" "six" "pydantic" "scipy" "tensorboard" \
        || echo "install.sh: megatron-bridge not installed; tests/megatron/test_megatron_bridge.py will be skipped" >&2
fi
# With MEGATRON_LM naming a Megatron-LM checkout (tests/megatron/test_megatron_lm.py): what
# Megatron-LM imports on pretrain_gpt.py's path and needs to build its dataset helpers
# (pybind11), plus psutil (torch_dist checkpoints) and tensorboard (the scalars test).
if [ -n "${MEGATRON_LM:-}" ]; then
    "$PY" -m pip install -q triton pybind11 six regex pydantic pyyaml psutil tensorboard
fi
