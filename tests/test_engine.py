"""The distributed clip engine on CPU processes (gloo) against the single-process operator."""

import random

import pytest
import torch

from megatron_spectra.engine import LayoutMismatch, Placement, ShardedClipper, build_plan
from megatron_spectra.engine.plan import clip_cost, matrix_parts
from megatron_spectra.ops import ClipNumerics, soft_spectral_clip
from megatron_spectra.launch.spawn import run_all_failures, run_distributed

# ----------------------------------------------------------------------------- layouts


def random_cuts(numel: int, pieces: int, rng: random.Random, style: str) -> list[tuple[int, int]]:
    """`pieces` contiguous ranges covering [0, numel): even, uneven mid-row, or with empties."""
    if style == "even":
        cuts = [numel * i // pieces for i in range(pieces + 1)]
    elif style == "empty":  # the last ranks get nothing, as FSDP2 gives a layer with few rows
        cuts = [min(numel, numel * i // max(1, pieces - 2)) for i in range(pieces + 1)]
    else:
        cuts = sorted([0, numel, *(rng.randrange(numel + 1) for _ in range(pieces - 1))])
    return list(zip(cuts, cuts[1:]))


def scenario(world: int, tp: int, seed: int):
    """Tensors mixing TP on both dims, ZeRO ranges, empties, fused parts, vectors, replication."""
    rng = random.Random(seed)
    specs = [
        # (name, shape, tp_dim, row_parts, range style, strategy)
        ("qkv", (48, 16), 0, (8, 2, 2), "uneven", "auto"),
        ("proj", (16, 16), 1, None, "uneven", "auto"),
        ("fc1", (64, 16), 0, (16 // tp * 2, 16 // tp * 2) if tp > 1 else (32, 32), "uneven", "auto"),
        ("fc2", (16, 32), 1, None, "even", "auto"),
        ("embedding", (200, 8), 0, None, "uneven", "auto"),
        ("wide", (12, 40), None, None, "empty", "auto"),
        ("tall_gram", (60, 12), None, None, "uneven", "gram"),
        ("tall_owner", (60, 12), 0, None, "uneven", "owner"),
        ("square_pure_tp", (24, 24), 0, None, "whole", "auto"),
        ("norm", (16,), None, None, "uneven", "auto"),
        ("tp_bias", (32,), 0, None, "even", "auto"),
        ("replicated", (20, 30), None, None, "replicated", "owner"),
        ("tiny", (2, 3), None, None, "empty", "auto"),
    ]
    gen = torch.Generator().manual_seed(seed)
    fulls, layouts = {}, [[] for _ in range(world)]
    names = []
    for name, shape, tp_dim, parts, style, strategy in specs:
        split = tp if tp_dim is not None and shape[tp_dim if len(shape) == 2 else 0] % tp == 0 else 1
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        if name == "tall_gram":  # a rank-deficient one
            x = torch.randn(shape[0], 3, generator=gen, dtype=torch.float64) @ torch.randn(3, shape[1], generator=gen, dtype=torch.float64)
        if name == "embedding":  # a rank-1 spike
            x[:, 0] += 300.0
        fulls[name] = (x * rng.choice([0.1, 1.0, 20.0])).float()
        names.append(name)
        base = [Placement(shape, tp_dim if split > 1 else None, split, b, None, parts, strategy) for b in range(split)]
        dp = world // split
        cuts = {b: random_cuts(base[b].block_numel, dp, rng, "even" if style in ("whole", "replicated") else style) for b in range(split)}
        for rank in range(world):
            b, d = rank % split, rank // split
            if style == "replicated":
                layouts[rank].append(base[b])
            elif style == "whole":
                layouts[rank].append(base[b] if d == 0 else Placement(shape, base[b].tp_dim, split, b, (0, 0), parts, strategy))
            else:
                s, e = cuts[b][d]
                layouts[rank].append(Placement(shape, base[b].tp_dim, split, b, (s, e), parts, strategy))
    return names, fulls, layouts


def reference(full: torch.Tensor, p: Placement, c: float, numerics: ClipNumerics) -> torch.Tensor:
    kw = dict(mode=numerics.mode, ns_steps=numerics.ns_steps, fp32=numerics.fp32)
    if p.is_vector:
        return soft_spectral_clip(full, c, **kw)
    if p.row_parts is None:
        return soft_spectral_clip(full, c, **kw)
    period = sum(p.row_parts)
    out = full.clone().view(-1, period, full.shape[1])
    start = 0
    for size in p.row_parts:
        part = out[:, start : start + size].reshape(-1, full.shape[1])
        out[:, start : start + size] = soft_spectral_clip(part, c, **kw).view(-1, size, full.shape[1])
        start += size
    return out.view_as(full)


def _engine_vs_reference(rank, world, tp, seed, mode, c):
    numerics = ClipNumerics(mode, fp32=True)
    names, fulls, layouts = scenario(world, tp, seed)
    mine = layouts[rank]
    pieces = [p.piece_of(fulls[n]) for n, p in zip(names, mine)]
    clipper = ShardedClipper(None, numerics, count_flops=True)
    outs = clipper.clip(pieces, mine, c, names)
    again = clipper.clip(pieces, mine, c, names)  # the cached plan gives the same answer
    errors = {}
    for name, p, out, out2 in zip(names, mine, outs, again):
        want = p.piece_of(reference(fulls[name], p, c, numerics))
        # Relative in the Frobenius norm of this piece: the engine sums Grams in another
        # order, and fp32 rounding of a Gram perturbs the clip of an ill-conditioned matrix
        # element-wise by up to ~eps·(s_max/c)² (1e-5 of the largest entry, measured).
        norm = torch.linalg.vector_norm(want).item()
        error = torch.linalg.vector_norm(out - want).item() / max(norm, 1e-30)
        errors[name] = error / tolerance(fulls[name], c)
        assert torch.equal(out, out2)
    assert clipper.results_finite  # carried back by the all-to-all, one flag per peer
    return errors, clipper.stats


def tolerance(full: torch.Tensor, c: float) -> float:
    """1e-5, relative to the piece's norm, up to s_max/c = 100. Beyond, any fp32 evaluation of
    F·X loses ~eps·s_max/c to cancellation (entries ~s_max, results ~c), so two evaluations
    that round differently (the engine sums Grams in another order) agree only to that."""
    s_max = torch.linalg.matrix_norm(full.double().reshape(full.shape[0], -1), ord=2).item()
    return 1e-5 * max(1.0, s_max / c / 100)


LAYOUTS = [(2, 1), (2, 2), (3, 1), (4, 2), (4, 1), (8, 2), (8, 4)]
CASES = [(w, t, "accurate") for w, t in LAYOUTS] + [(w, t, "paper") for w, t in [(2, 2), (4, 1), (8, 4)]]


@pytest.mark.parametrize("world, tp, mode", CASES)
def test_engine_matches_single_process_clip(world, tp, mode):
    results = run_distributed(_engine_vs_reference, world, args=(tp, 1000 * world + tp, mode, 2.0), timeout=240)
    for rank, (errors, _) in enumerate(results):
        for name, err in errors.items():
            assert err <= 1.0, f"rank {rank} {name}: relative error {err:.2f} x its tolerance"


def _overflow_or_nan(rank, world, case):
    from megatron_spectra.engine import NonFiniteInput

    # Two 8 x 8 matrices split in rows over the ranks. Paper mode's Gram of entries ~1e25
    # overflows fp32 on the owner alone; every rank must learn it from the way back.
    shape = (8, 8)
    fulls = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    if case == "overflow":
        fulls[1] = fulls[1] * 1e25
    cuts = [(8 * 8 * r // world, 8 * 8 * (r + 1) // world) for r in range(world)]
    mine = [Placement(shape, None, 1, 0, cuts[rank], None, "owner") for _ in fulls]
    pieces = [p.piece_of(f) for p, f in zip(mine, fulls)]
    extra = [torch.full((3,), float("nan") if case == "nan" and rank == world - 1 else 1.0)]
    clipper = ShardedClipper(None, ClipNumerics("paper", fp32=True))
    try:
        outs = clipper.clip(pieces, mine, 1.0, ["a", "b"], also_check=extra)
    except NonFiniteInput:
        return "NonFiniteInput"
    return clipper.results_finite, [bool(torch.isfinite(o).all()) for o in outs]


@pytest.mark.parametrize("case", ["fine", "overflow", "nan"])
def test_every_rank_learns_whether_the_clip_and_its_companions_are_finite(case):
    results = run_distributed(_overflow_or_nan, 4, args=(case,))
    if case == "nan":  # a companion tensor on one rank: nothing is clipped anywhere
        assert results == ["NonFiniteInput"] * 4
    elif case == "fine":
        assert results == [(True, [True, True])] * 4
    else:  # only the owner computed the non-finite result; every rank knows
        assert all(finite is False for finite, _ in results)
        assert not all(ok[1] for _, ok in results)


def _gram_flops(rank, world, mode):
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(400, 16, generator=gen)
    p = Placement((400, 16), flat=(6400 * rank // world, 6400 * (rank + 1) // world), strategy="gram")
    clipper = ShardedClipper(None, ClipNumerics(mode, fp32=True), count_flops=True)
    (out,) = clipper.clip([p.piece_of(full)], [p], 2.0, ["w"])
    single = ShardedClipper(None, ClipNumerics(mode, fp32=True), count_flops=True)
    single.world, single.rank = 1, 0  # the same clip in this process alone
    (alone,) = single.clip([full.reshape(-1)], [Placement((400, 16))], 2.0, ["w"])
    return clipper.stats.clip_flops, single.stats.clip_flops, out, p.piece_of(alone.view(400, 16))


@pytest.mark.parametrize("mode", ["paper", "accurate"])
def test_a_gram_matrix_has_its_root_computed_once(mode):
    """The lines' products split over their holders and the k x k root runs on one process:
    the group's FLOPs add up to one clip's, and every holder applies the same factor."""
    results = run_distributed(_gram_flops, 4, args=(mode,), timeout=120)
    assert sum(f for f, *_ in results) == results[0][1]
    flops = sorted(f for f, *_ in results)
    assert flops[0] == flops[-2] < flops[-1]  # equal line work; the root's rank alone does the k x k products
    for _, _, out, want in results:
        assert torch.allclose(out, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def _mismatch(rank, world):
    p = Placement((8, 4), tp_dim=0, tp_size=2, tp_block=rank % 2)
    q = Placement((8, 4) if rank != 2 else (8, 6), tp_dim=0 if rank != 2 else None)
    clipper = ShardedClipper()
    pieces = [torch.randn(p.local_numel), torch.randn(q.local_numel)]
    clipper.clip(pieces, [p, q], 1.0, ["w", "other"])


def _count_mismatch(rank, world):
    clipper = ShardedClipper()
    n = 2 if rank else 1
    clipper.clip([torch.randn(4)] * n, [Placement((4,))] * n, 1.0)


@pytest.mark.parametrize("fn, match", [(_mismatch, r"'other'.*rank\(s\) \[2\]"), (_count_mismatch, "different numbers")])
def test_a_mismatched_layout_raises_on_every_rank(fn, match):
    import re

    results = run_all_failures(fn, 4, timeout=60)
    for ok, value in results:
        assert not ok and re.search(match, value), value


def _wrong_piece(rank, world):
    """The last rank's piece of 'b' is one element short of its flat range."""
    a = Placement((8, 4), tp_dim=0, tp_size=2, tp_block=rank % 2)
    b = Placement((6, 5), flat=(30 * rank // world, 30 * (rank + 1) // world))
    short = int(rank == world - 1)
    ShardedClipper().clip([torch.randn(a.local_numel), torch.randn(b.local_numel - short)], [a, b], 1.0, ["a", "b"])


def _missing_threshold(rank, world):
    """Rank 1 passes one threshold for two tensors."""
    p = Placement((4, 4))
    thresholds = [1.0] if rank == 1 else [1.0, 1.0]
    ShardedClipper().clip([torch.randn(16), torch.randn(16)], [p, p], thresholds, ["a", "b"])


def _nan_threshold(rank, world):
    p = Placement((4, 4))
    ShardedClipper().clip([torch.randn(16)], [p], float("nan") if rank == 0 else 1.0, ["w"])


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("fn, match", [
    (_wrong_piece, r"tensor 1 \('b'\) on rank {last}: its local piece has \d+ elements, its placement says \d+"),
    (_missing_threshold, r"rank 1 passes 2 tensors but 1 placements, names or thresholds"),
    (_nan_threshold, r"tensor 0 \('w'\) on rank 0: its clipping threshold is not a finite number"),
])
def test_a_bad_local_piece_raises_the_same_error_on_every_rank(fn, match, world):
    """A rank whose own arguments are bad must not raise alone (the others would block in the
    first collective): every rank raises one and the same error, naming the tensor and rank."""
    import re

    results = run_all_failures(fn, world, timeout=60)
    messages = set()
    for ok, value in results:
        assert not ok, value
        last = value.strip().splitlines()[-1]
        assert re.search(match.format(last=world - 1), last), last
        assert last.startswith("megatron_spectra.engine.agreement.LayoutMismatch"), last
        messages.add(last)
    assert len(messages) == 1, messages


def test_a_bad_piece_is_named_in_one_process():
    with pytest.raises(LayoutMismatch, match=r"tensor 0 \('w'\) on rank 0: its local piece has 15 elements, its placement says 16"):
        ShardedClipper().clip([torch.randn(15)], [Placement((4, 4))], 1.0, ["w"])


def _zero1_transformer(world: int):
    """A 12-layer d=768 transformer with untied 50304 x 768 embedding and output layer, in one
    flat ZeRO-1 buffer cut evenly into `world` ranges, ignoring tensor boundaries."""
    d, ffn, vocab, layers = 768, 2048, 50304, 12
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(3 * d, d), (d, d), (2 * ffn, d), (d, ffn)]
    shapes.append((vocab, d))
    sizes = [r * c for r, c in shapes]
    total, offset, placements = sum(sizes), 0, [[] for _ in range(world)]
    for (r, c), n in zip(shapes, sizes):
        for rank in range(world):
            lo, hi = total * rank // world, total * (rank + 1) // world
            s, e = max(lo, offset) - offset, min(hi, offset + n) - offset
            placements[rank].append(Placement((r, c), flat=(s, e) if s < e else (0, 0)))
        offset += n
    return shapes, placements


@pytest.mark.parametrize("paper, products", [(True, 27), (False, 18)])
def test_owner_assignment_balances_a_12_layer_transformer_at_8_ranks(paper, products):
    shapes, placements = _zero1_transformer(8)
    plan = build_plan(placements, paper=paper, products=products)
    # No matrix is more than a rank's share of the work: every one goes to an owner.
    assert {tp.strategy for tp in plan.tensors} == {"owner"}
    mean = sum(plan.loads) / 8
    assert max(plan.loads) <= 1.1 * mean, [round(x / mean, 3) for x in plan.loads]
    assert sum(plan.loads) == pytest.approx(sum(clip_cost(*shape, products) for shape in shapes))


def test_at_32_ranks_accurate_mode_splits_the_vocabulary_matrices_by_gram():
    """Each 50304 x 768 clip is more than a rank's share at 32 ranks. Paper mode keeps it with
    one owner (bit for bit), which then sets the busiest rank; accurate mode takes Gram: lines
    where ZeRO put them, the root computed once, the busiest rank near the mean."""
    shapes, placements = _zero1_transformer(32)
    paper = build_plan(placements, paper=True, products=27)
    assert {tp.strategy for tp in paper.tensors} == {"owner"}
    assert max(paper.loads) == pytest.approx(clip_cost(*shapes[0], 27))
    plan = build_plan(placements, paper=False, products=18)
    gram = [tp for tp in plan.tensors if tp.strategy == "gram"]
    assert [tp.index for tp in gram] == [0, len(shapes) - 1]
    for tp in gram:
        held = {r for r in range(32) if placements[r][tp.index].local_numel}
        assert {u.rank for u in tp.units} <= held and 0 <= tp.root < 32  # no line moves
    mean = sum(plan.loads) / 32
    assert max(plan.loads) <= 1.25 * mean, [round(x / mean, 3) for x in plan.loads]
    assert sum(plan.loads) == pytest.approx(sum(clip_cost(*shape, 18) for shape in shapes))


def _accurate_flops(rank, world, products):
    import megatron_spectra.engine.clip as engine_clip
    from megatron_spectra.bench.simulated import MODELS, Layout, model_params, rank_placements, update_like

    engine_clip.ACCURATE_PRODUCTS = products
    params = model_params(MODELS["160m"].scaled(8))
    placements = rank_placements(params, Layout(2, 2), rank, "auto")
    pieces = [p.piece_of(u) for u, p in zip(update_like(params, 0, 10.0), placements)]
    clipper = ShardedClipper(None, ClipNumerics("accurate"), count_flops=True)
    clipper.clip(pieces, placements, 10.0, [p.name for p in params])
    return clipper.stats.clip_flops


def test_accurate_mode_balances_owners_by_its_own_step_count():
    # Accurate mode's 4-5 minimax steps weigh a matrix's k³ part less than the paper's 10:
    # planned with the paper's costs, the busiest rank (counted FLOPs, 160m at 1/8 width,
    # TP2 x DP2, bench engine's updates) does 1.10x the mean; with its own, 1.02x.
    from megatron_spectra.engine.plan import ACCURATE_PRODUCTS, clip_cost

    assert clip_cost(256, 768, ACCURATE_PRODUCTS) == 4 * 256**2 * 768 + 2 * ACCURATE_PRODUCTS * 256**3
    for products, bound in ((30, 1.15), (ACCURATE_PRODUCTS, 1.04)):
        flops = run_distributed(_accurate_flops, world_size=4, args=(products,))
        assert max(flops) <= bound * sum(flops) / 4, (products, [f / (sum(flops) / 4) for f in flops])


def test_finite_flags_agree_with_isfinite():
    from megatron_spectra.ops.finite import finite_flags

    inf, nan = float("inf"), float("nan")
    tensors = [torch.randn(5), torch.zeros(0), torch.full((3,), 3e38), torch.tensor([1.0, nan]),
               torch.tensor([inf, -inf]), torch.tensor([6e4, 6e4], dtype=torch.float16), torch.tensor([inf], dtype=torch.bfloat16)]
    assert finite_flags(tensors).tolist() == [bool(torch.isfinite(t).all()) for t in tensors]
    assert finite_flags([]).tolist() == []


def test_matrix_parts_of_fused_qkv_and_fc1():
    assert matrix_parts(Placement((48, 16), row_parts=(8, 2, 2))) == [(32, 16), (8, 16), (8, 16)]
    assert matrix_parts(Placement((64, 16), tp_dim=0, tp_size=2, row_parts=(16, 16))) == [(32, 16), (32, 16)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shape=(8, 6), tp_dim=1, tp_size=4), "equal blocks"),
        (dict(shape=(8, 6), flat=(0, 49)), "outside"),
        (dict(shape=(8, 6), row_parts=(3,)), "tile"),
        (dict(shape=(8, 6), strategy="fast"), "strategy"),
        (dict(shape=(2, 3, 4)), "1-D or 2-D"),
    ],
)
def test_bad_placements_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Placement(**kwargs)


def test_uncovered_elements_are_an_error():
    with pytest.raises(ValueError, match="held by no process"):
        build_plan([[Placement((4, 4), flat=(0, 10))], [Placement((4, 4), flat=(11, 16))]])


def test_mismatch_exception_type_is_public():
    assert issubclass(LayoutMismatch, ValueError)


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("world, tp", [(1, 1), (3, 1), (4, 2), (8, 4)])
def test_pieces_embed_back_into_their_full_tensors(world, tp):
    """Every process's piece, embedded, sums to the full tensor (held ranges are disjoint),
    and cutting the embedded piece gives the piece back."""
    names, fulls, layouts = scenario(world, tp, seed=7)
    for i, name in enumerate(names):
        full, placements = fulls[name], [layouts[rank][i] for rank in range(world)]
        if name == "replicated":  # every rank holding a block holds all of it: count one per block
            placements = list({p.tp_block: p for p in placements}.values())
        total = torch.zeros_like(full)
        for p in placements:
            piece = p.piece_of(full)
            assert piece.shape == (p.local_numel,)
            assert torch.equal(p.piece_of(p.embed(piece)), piece)
            total += p.embed(piece)
        assert torch.equal(total, full)


def test_piece_of_cuts_the_tp_block_then_the_flat_range():
    full = torch.arange(24.0).reshape(4, 6)
    # column blocks of 3: block 1 is columns 3..5, flattened row-major, elements [2, 7)
    p = Placement((4, 6), tp_dim=1, tp_size=2, tp_block=1, flat=(2, 7))
    assert p.piece_of(full).tolist() == [5.0, 9.0, 10.0, 11.0, 15.0]
    # row blocks of 2: block 1 is rows 2..3, elements [1, 4)
    q = Placement((4, 6), tp_dim=0, tp_size=2, tp_block=1, flat=(1, 4))
    assert q.piece_of(full).tolist() == [13.0, 14.0, 15.0]
    embedded = q.embed(torch.tensor([-1.0, -2.0, -3.0]))
    assert embedded.shape == (4, 6) and embedded[2, 1:4].tolist() == [-1.0, -2.0, -3.0]
    assert embedded.abs().sum() == 6.0
    v = Placement((8,), tp_dim=0, tp_size=2, tp_block=1)  # a vector's TP split cuts its columns
    assert v.piece_of(torch.arange(8.0)).tolist() == [4.0, 5.0, 6.0, 7.0]
    assert v.embed(torch.ones(4)).tolist() == [0.0] * 4 + [1.0] * 4


def _rank(rank, world):
    return rank


def test_a_port_taken_between_choosing_and_listening_is_chosen_again(monkeypatch):
    """free_port() closes its probe socket before rank 0 listens; another process may take the
    port in between (two test runs at once did): the world starts again on another port."""
    import socket

    from megatron_spectra.launch import spawn

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken, real, calls = blocker.getsockname()[1], spawn.free_port, []
        monkeypatch.setattr(spawn, "free_port", lambda: calls.append(1) or (taken if len(calls) == 1 else real()))
        assert run_distributed(_rank, 2, timeout=60) == [0, 1]
    assert len(calls) == 2
