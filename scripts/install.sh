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
# megatron-core is pinned for the tests to the newest release that installs on Python 3.11.
"$PY" -m pip install -q -e ".[test,plot]" "megatron-core==0.16.1"
# torchtitan, for the FSDP integration's tests: its wheel asks for a newer torch (and pulls a
# CUDA build), but the parts we use (optimizer/LR-scheduler containers, its DCP state dict)
# run on the torch above, so it and spmd_types go in without dependencies; tyro is its
# config parser. Optional: the torchtitan tests skip without it.
if ! "$PY" -c "import torchtitan" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps "torchtitan==0.3.0" "spmd_types==0.2.3" \
        && "$PY" -m pip install -q "tyro==1.0.17" \
        || echo "install.sh: torchtitan not installed; its tests will be skipped" >&2
fi
