"""Base-optimizer directions, threshold schedules, the SPECTRA step and the reference Spectra optimizer."""

from .directions import BASES, Base, get_base, register_base
from .schedules import SCHEDULES, ThresholdSchedule, matrix_scale
from .spectra import Spectra
from .step import Clip, Clipped, Clipper, LocalClipper, NonFiniteError, ParamSpec, SpectraStep, clip_kind

__all__ = [
    "BASES", "Base", "get_base", "register_base", "SCHEDULES", "ThresholdSchedule", "matrix_scale", "NonFiniteError", "Spectra",
    "clip_kind", "Clip", "Clipped", "Clipper", "LocalClipper", "ParamSpec", "SpectraStep",
]
