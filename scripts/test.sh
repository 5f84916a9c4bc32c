#!/usr/bin/env bash
# The whole test suite, after the set-up it needs (CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest -q tests "$@"
