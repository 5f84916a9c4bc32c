"""`python -m megatron_spectra.train [Megatron-LM flags]`, also under torchrun."""

from .logs import quiet_known_warnings

quiet_known_warnings()  # before megatron's imports, which warn

from .main import main  # noqa: E402

raise SystemExit(main())
