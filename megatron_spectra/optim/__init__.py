"""Base-optimizer directions, threshold schedules, the SPECTRA step and the reference Spectra optimizer."""

from .clipper import Clip, Clipped, Clipper, LocalClipper, ParamSpec, clip_kind
from .directions import BASES, Base, get_base, register_base
from .guards import NonFiniteError
from .schedules import SCHEDULES, ThresholdSchedule, matrix_scale
from .spectra import Spectra
from .step import SpectraStep

__all__ = [
    "BASES", "Base", "get_base", "register_base", "SCHEDULES", "ThresholdSchedule", "matrix_scale", "NonFiniteError", "Spectra",
    "clip_kind", "Clip", "Clipped", "Clipper", "LocalClipper", "ParamSpec", "SpectraStep",
]
