"""Run a Megatron-LM script with Spectra installed and no edit to the checkout:

    torchrun --nproc-per-node 8 -m megatron_spectra.run /path/to/Megatron-LM/pretrain_gpt.py \\
        --optimizer spectra-adamw --spectra-clip-threshold 10 --use-distributed-optimizer ...

On a machine without a GPU add `--spectra-cpu` (megatron on CPU under gloo; see
megatron_spectra.megatron.lm), as tests/megatron/test_megatron_lm.py does.
"""

from __future__ import annotations

import os
import runpy
import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith(".py"):
        raise SystemExit("usage: python -m megatron_spectra.run SCRIPT.py [script args...]")
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        raise SystemExit(f"megatron_spectra.run: no such script {script}")
    # pretrain_gpt.py imports gpt_builders and model_provider from the checkout's root.
    sys.path.insert(0, os.path.dirname(script))
    import megatron_spectra.megatron.lm  # noqa: F401  (installs the hooks)

    sys.argv = [script, *argv[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
