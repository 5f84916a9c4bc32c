"""Which Megatron parameters Spectra clips, and how (no processes needed)."""

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_spectra.megatron.config import SpectraOptimizerConfig  # noqa: E402
from megatron_spectra.megatron.layouts import clip_kind  # noqa: E402


def _param(*shape, embedding=False):
    p = torch.nn.Parameter(torch.zeros(*shape))
    if embedding:
        p.is_embedding_or_output_parameter = True
    return p


@pytest.mark.parametrize(
    "apply_to, matrix, embedding, vector",
    [("all", "matrix", "matrix", "vector"), ("2d", "matrix", "matrix", "none"),
     ("hidden", "matrix", "none", "none"), ("none", "none", "none", "none")],
)
def test_apply_to_decides_each_kind(apply_to, matrix, embedding, vector):
    assert clip_kind(_param(8, 4), apply_to) == matrix
    assert clip_kind(_param(32, 4, embedding=True), apply_to) == embedding
    assert clip_kind(_param(4), apply_to) == vector


def test_unknown_apply_to_is_a_clear_error():
    with pytest.raises(ValueError, match="spectra_apply_to"):
        SpectraOptimizerConfig(optimizer="spectra-adamw", spectra_apply_to="everything")
