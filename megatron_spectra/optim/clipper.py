"""The seam between the SPECTRA step and whatever clips its directions.

What a clip call takes (`Clip`: a param's piece with its `ParamSpec`; one threshold or one per
param group), what a clipper must answer (`Clipper`: the clip, and whether every process's
tensors are finite), the clipper of one process (`LocalClipper`), and which params get which
clip (`clip_kind`: SSC for matrices, the vector rule, or none, by `apply_to`). A distributed
path (Megatron's `EntryClipper`, FSDP's) implements `Clipper` over its own layouts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol, Sequence

import torch

from ..ops.finite import finite_flags
from ..ops.soft_clip import ClipNumerics, clip_vector, clip_wide

STAGES = ("update", "gradient")  # what a clipper call clips: directions U_k, or gradients (pre-clipping)
EMBEDDING_OR_OUTPUT = ("lm_head", "output", "output_layer", "head")  # module names of output layers


@dataclass(frozen=True)
class ParamSpec:
    """What the step needs to know of a param beyond its tensor."""

    name: str
    kind: str  # its update's clip: "matrix" (SSC), "vector" (the vector rule) or "none"
    scale: float  # alpha = sqrt(max(1, d_out/d_in)) of the global shape if kind is "matrix", else 1
    matrix: bool  # a weight matrix: pre-clipping clips its gradient, whatever `kind` says


class Clip(NamedTuple):
    """One tensor for the clipper: a param's direction (or gradient), laid out like the param."""

    param: torch.Tensor
    spec: ParamSpec
    tensor: torch.Tensor
    kind: str  # "matrix" | "vector"
    group: int = 0  # the index of its param group: its threshold when thresholds differ per group


Thresholds = float | Sequence[float | None]  # one c for all, or one per param group (None: lr 0)


def threshold_of(c, group: int) -> float:
    """The threshold of a tensor of param group `group`: `c` is one for all or one per group.
    A group that does not move (None) gets 1.0: its tensors' results are not used, but every
    process must pass the engine the same number."""
    if isinstance(c, (int, float)):
        return c
    return 1.0 if c[group] is None else c[group]


def stage_numerics(numerics: ClipNumerics, stage: str) -> ClipNumerics:
    """Pre-clipping is SSC whatever post_process the update uses (the official order)."""
    return replace(numerics, post="clip") if stage == "gradient" else numerics


class Clipped(NamedTuple):
    """What update observers get, per clipped param: this process's pieces of U and H_c(U)."""

    param: torch.Tensor
    spec: ParamSpec
    u: torch.Tensor
    h: torch.Tensor


class Clipper(Protocol):
    """The distributed seam. Every process of a step calls both methods alike, in order."""

    verified_finite: bool  # the last clip saw every process's items, also_check and results finite

    def clip(self, items: Sequence[Clip], c: Thresholds, stage: str, also_check: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
        """H_c of every item's full tensor, as this process's piece laid out like the item;
        an item's c is `threshold_of(c, item.group)`. `stage` ("update" | "gradient") lets a
        clipper keep a plan per kind of call (and pre-clips with `stage_numerics`).

        A clipper that communicates anyway may check, in the same collectives, that every
        process's items, the `also_check` tensors (the updates it does not clip) and the
        results are finite, and then set `verified_finite` (else False: the step asks
        `find_nonfinite`)."""

    def find_nonfinite(self, tensors: Sequence[torch.Tensor]) -> list[int] | None:
        """None if every process's tensors are finite; else which of this process's are not
        (possibly none: the bad one is elsewhere). Every process gets None or not alike."""


class LocalClipper:
    """Clips whole tensors in this process: one process, or DDP's identical replicas."""

    verified_finite = False  # its find_nonfinite is local and as cheap

    def __init__(self, numerics: ClipNumerics):
        self.numerics = numerics

    def clip(self, items: Sequence[Clip], c: Thresholds, stage: str = "update", also_check=()) -> list[torch.Tensor]:
        numerics = stage_numerics(self.numerics, stage)
        return [clip_update(item.tensor, threshold_of(c, item.group), item.kind, numerics) for item in items]

    def find_nonfinite(self, tensors: Sequence[torch.Tensor]) -> list[int] | None:
        if not tensors:
            return None
        finite = finite_flags(tensors)  # one device sync, not one per tensor
        return None if bool(finite.all()) else (~finite).nonzero().flatten().tolist()


def clip_kind(param: torch.Tensor, apply_to: str, override: str | None = None, name: str | None = None) -> str:
    """How a parameter's update is clipped: "matrix" (SSC), "vector" (the vector rule) or "none".

    - "all" (the official default): every matrix (embedding and output layer too) gets SSC,
      every 1-D parameter the vector rule;
    - "2d": matrices only; 1-D parameters keep their plain base update;
    - "hidden": matrices other than the embedding and output layer (the Muon convention);
    - "none": nothing, the plain base optimizer (the paper's baselines through the same code).
    A param group's "clip" key (`override`) wins over all of these.
    """
    if override is not None:
        return override
    if apply_to == "none":
        return "none"
    if param.ndim >= 2:
        return "none" if apply_to == "hidden" and is_embedding_or_output(param, name) else "matrix"
    return "vector" if apply_to == "all" else "none"


def is_embedding_or_output(param: torch.Tensor, name: str | None = None) -> bool:
    """Megatron marks them `is_embedding_or_output_parameter`; a param without the mark counts
    by its name: its module's name contains "embed" or "wte"/"wpe", or is one of
    EMBEDDING_OR_OUTPUT ("lm_head", "output", ...). Anything else: a group's "clip" key."""
    marked = getattr(param, "is_embedding_or_output_parameter", None)
    if marked is not None:
        return bool(marked)
    if not name:
        return False
    parts = name.split(".")
    module = parts[-2] if len(parts) > 1 else parts[-1]
    return "embed" in module or module in ("wte", "wpe") or module in EMBEDDING_OR_OUTPUT


def clip_update(u: torch.Tensor, c: float, kind: str, numerics: ClipNumerics) -> torch.Tensor:
    """H_c(u) of a whole tensor: SSC of a matrix, the vector rule, or u itself for "none"
    (and for an empty tensor, a (0, n) weight: nothing to clip)."""
    if kind == "none" or u.numel() == 0:
        return u
    if c <= 0:  # the end of a wsd-* schedule at final scale 0: H_c -> 0 as c -> 0
        return torch.zeros_like(u)
    if kind == "vector":
        return clip_vector(u.reshape(-1), c, numerics).view_as(u)
    return clip_matrix(u, c, numerics)


def clip_matrix(u: torch.Tensor, c: float, numerics: ClipNumerics) -> torch.Tensor:
    """SSC of a weight (d_out, *d_in) seen as a d_out x prod(d_in) matrix."""
    m = u.reshape(u.shape[0], -1)
    tall = m.shape[0] > m.shape[1]
    (out,) = clip_wide([m.mT if tall else m], [c], numerics)
    return (out.mT if tall else out).reshape(u.shape)
