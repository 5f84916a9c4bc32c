"""SPECTRA for PyTorch FSDP2 / DTensor (HSDP, tensor parallelism, torchtitan).

    from megatron_spectra.fsdp import Spectra          # = FSDPSpectra
    opt = Spectra(model.named_parameters(), base="adamw", lr=1e-3, weight_decay=0.1)

`megatron_spectra.fsdp.torchtitan` plugs it into torchtitan's optimizer config (imported
separately: it needs torchtitan).
"""

from .optimizer import FSDPSpectra
from .placements import UnsupportedPlacement, engine_placement, held_ranges

Spectra = FSDPSpectra  # the name an FSDP user reaches for; the reference single-process one is optim.Spectra

__all__ = ["FSDPSpectra", "Spectra", "UnsupportedPlacement", "engine_placement", "held_ranges"]
