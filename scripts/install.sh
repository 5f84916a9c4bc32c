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
