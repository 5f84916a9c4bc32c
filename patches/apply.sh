#!/usr/bin/env bash
# Add the one-line megatron-spectra hook to a Megatron-LM checkout's pretrain_gpt.py
# (core_r0.16 through 0.19) and check that it took. Usage: patches/apply.sh /path/to/Megatron-LM
set -euo pipefail
target="${1:?usage: $0 /path/to/Megatron-LM}/pretrain_gpt.py"
hook='import megatron_spectra.megatron_lm.hook  # noqa: F401  megatron-spectra: --optimizer spectra-*'
[ -f "$target" ] || { echo "no pretrain_gpt.py at $target" >&2; exit 1; }
here="$(cd "$(dirname "$0")" && pwd)"
if grep -qF "import megatron_spectra.megatron_lm.hook" "$target"; then
    echo "already patched: $target"
elif (cd "$(dirname "$target")" && git apply --unidiff-zero "$here/pretrain_gpt.patch" 2>/dev/null); then
    echo "patched with pretrain_gpt.patch: $target"
else
    # Not a git checkout, or a header that moved: insert before the first import, which is
    # what the patch does on core_r0.16 through 0.19 (all have it at line 6).
    python3 - "$target" "$hook" <<'PY'
import sys
path, hook = sys.argv[1], sys.argv[2]
lines = open(path).read().split("\n")
first = next(i for i, l in enumerate(lines) if l.startswith(("import ", "from ")))
lines.insert(first, hook)
open(path, "w").write("\n".join(lines))
PY
    echo "patched: $target"
fi
python3 - "$target" <<'PY'
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
ok = any(isinstance(n, ast.Import) and any(a.name == "megatron_spectra.megatron_lm.hook" for a in n.names) for n in imports[:1])
sys.exit(0 if ok else "the hook is not the first import of pretrain_gpt.py")
PY
echo "check passed: the hook is the first import"
