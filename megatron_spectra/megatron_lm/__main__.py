"""Run a Megatron-LM script with Spectra installed and no edit to the checkout:

    torchrun --nproc-per-node 8 -m megatron_spectra.megatron_lm /path/to/Megatron-LM/pretrain_gpt.py \\
        --optimizer spectra-adamw --spectra-clip-threshold 10 --use-distributed-optimizer ...

On a machine without a GPU add `--spectra-cpu` (megatron on CPU under gloo; see
megatron_spectra.megatron_lm.hook), as tests/megatron/test_megatron_lm.py does.
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = "usage: python -m megatron_spectra.megatron_lm SCRIPT.py [script args...]"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith(".py"):
        raise SystemExit(USAGE)
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        raise SystemExit(f"megatron_spectra.megatron_lm: no such script {script}")
    # pretrain_gpt.py imports gpt_builders and model_provider from the checkout's root.
    sys.path.insert(0, os.path.dirname(script))
    from ..known_warnings import quiet_known_warnings

    quiet_known_warnings()  # before megatron's imports, which warn
    from . import hook  # noqa: F401  (importing installs)

    sys.argv = [script, *argv[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
