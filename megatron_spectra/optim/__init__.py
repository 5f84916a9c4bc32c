"""Base-optimizer directions, threshold schedules and the reference Spectra optimizer."""

from .directions import BASES, Base, get_base
from .schedules import SCHEDULES, ThresholdSchedule, matrix_scale
from .spectra import NonFiniteError, Spectra, clip_kind

__all__ = ["BASES", "Base", "get_base", "SCHEDULES", "ThresholdSchedule", "matrix_scale", "NonFiniteError", "Spectra", "clip_kind"]
