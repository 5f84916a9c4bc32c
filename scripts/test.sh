#!/usr/bin/env bash
# The test suite, after the set-up it needs (CI runs exactly this), as two jobs:
# - main: $PYTHON (default python3: 3.11 here), megatron-core 0.16.1, the pinned CPU torch
#   wheel; every test.
# - py312: Python 3.12 with the newest megatron-core release, in the venv .venv-py312 (made
#   on first use, reused after; torch for 3.12 comes from PyPI as a CUDA build, about 4.5 GB,
#   which runs on the CPU). It runs the tests whose code meets megatron-core and
#   torch.distributed (PY312_TESTS, with the megatron bench, which builds megatron-core's own
#   Muon); the math, launcher and other bench tests do not depend on the megatron-core
#   release and run in the main job. Skipped, saying so, when no Python
#   3.12 is found (pyenv's versions/3.12.*, else python3.12 on PATH; PYTHON312 overrides).
# Arguments go to both pytest runs. SPECTRA_TEST_JOBS="main" (or "py312") runs one job.
set -uo pipefail
cd "$(dirname "$0")/.."
NEWEST_MEGATRON_CORE=0.19.2
PY312_TESTS=(tests/megatron tests/train tests/fsdp tests/test_bench_megatron.py)  # the last: megatron-core's own Muon, ~40 s
JOBS=${SPECTRA_TEST_JOBS:-main py312}
failed=()

timed() {  # NAME COMMAND...: run, report the wall time, remember a failure
    local name=$1 start=$SECONDS
    shift
    echo "== test.sh: job $name"
    "$@" || failed+=("$name")
    echo "== test.sh: job $name took $((SECONDS - start)) s"
}

find_python312() {
    local candidate
    for candidate in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3 2>/dev/null | sort -V -r) \
                     "$(command -v python3.12 || true)"; do
        if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
}

main_job() {
    bash scripts/install.sh && "${PYTHON:-python3}" -m pytest -q tests "$@"
}

free_gb() {  # the free space, in whole GB, on the disk under the working directory
    echo $(( $(df -Pk . | awk 'NR == 2 {print $4}') / 1048576 ))
}

py312_job() {
    local venv=.venv-py312 need_gb=10  # CUDA torch: ~4 GB of wheels downloaded, 4.9 GB installed
    if [ ! -x "$venv/bin/python" ]; then
        if [ "$(free_gb)" -lt $need_gb ]; then
            echo "test.sh: job py312 needs about $need_gb GB free to make $venv; $(free_gb) GB free on the disk under $(pwd)" >&2
            return 1
        fi
        "$PY312" -m venv "$venv" || { echo "test.sh: $PY312 cannot make a venv" >&2; return 1; }
    fi
    PYTHON="$venv/bin/python" MEGATRON_CORE=$NEWEST_MEGATRON_CORE bash scripts/install.sh \
        && "$venv/bin/python" -m pytest -q "${PY312_TESTS[@]}" "$@"
}

for job in $JOBS; do
    case $job in
        main) timed main main_job "$@" ;;
        py312)
            PY312=${PYTHON312:-$(find_python312)}
            if [ -z "$PY312" ]; then
                echo "== test.sh: SKIPPED job py312 (Python 3.12 x megatron-core $NEWEST_MEGATRON_CORE): no Python 3.12 found" \
                     "(looked for ${PYENV_ROOT:-$HOME/.pyenv}/versions/3.12.*/bin/python3 and python3.12 on PATH; set PYTHON312)"
            else
                timed py312 py312_job "$@"
            fi ;;
        *) echo "test.sh: unknown job $job (main, py312)" >&2; exit 2 ;;
    esac
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "== test.sh: FAILED: ${failed[*]}"
    exit 1
fi
