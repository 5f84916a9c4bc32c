"""DTensor layouts (FSDP2, HSDP, FSDP x TP, plain DTensor) to engine placements, checked against full_tensor()."""

import pytest

from megatron_spectra.engine import Placement
from megatron_spectra.fsdp.placements import _strategy, connected_components

pytestmark = pytest.mark.slow


def test_every_layout_describes_the_local_shard(four_ranks):
    layouts = four_ranks[0]["layouts"]  # each rank already checked its piece against full_tensor()
    # what torch 2.13 produces, and the empty shards this test relies on
    assert layouts["fsdp_tp.0.weight"][0] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert layouts["fsdp_tp.1.weight"][0] == "(Shard(dim=0), Shard(dim=1))"
    assert layouts["hsdp.0.weight"][0] == "(Replicate(), Shard(dim=0))"
    assert four_ranks[3]["layouts"]["fsdp.0.weight"][1] == (0, 8)
    assert four_ranks[3]["layouts"]["fsdp_tp.2.weight"][1] == (0, 8)  # dp rank 1 of a 1-row TP block


def test_unsupported_placement_names_the_parameter(four_ranks):
    for result in four_ranks:
        messages = result["unsupported"]
        assert sorted(messages) == ["dim2", "partial", "uneven_columns"]
        for message in messages.values():
            assert "'layers.0.bad'" in message and "placements" in message, message
        assert "does not split into 4 equal blocks" in messages["uneven_columns"]
        assert "Partial" in messages["partial"]


def test_components_join_ranks_that_share_a_tensor():
    # FSDP x TP: the dp submesh params {0,2},{1,3} and the 2-D mesh {0,1,2,3} join everything
    assert connected_components([(0, 2), (1, 3), (0, 1, 2, 3)], range(4)) == [(0, 1, 2, 3)]
    # HSDP: shard groups only, replicas apart
    assert connected_components([(0, 1), (2, 3)], range(4)) == [(0, 1), (2, 3)]
    with pytest.raises(ValueError, match="not in the optimizer's process group"):
        connected_components([(0, 5)], range(4))


def test_gram_only_where_shards_split_the_long_side():
    tall_rows = Placement((64, 16), flat=(0, 16 * 16))  # FSDP rows of a tall matrix: Gram 16 x 16
    wide_rows = Placement((16, 64), flat=(0, 4 * 64))  # rows of a wide one: the Gram would be 64 x 64
    square = Placement((16, 16), flat=(0, 64))
    wide_bands = Placement((16, 64), tp_dim=1, tp_size=2, tp_block=0)  # RowwiseParallel: Gram 16 x 16
    assert [_strategy(p, "gram") for p in (tall_rows, wide_rows, square, wide_bands)] == ["gram", "owner", "owner", "gram"]
    assert _strategy(wide_rows, "auto") == "auto" and _strategy(tall_rows, "owner") == "owner"
