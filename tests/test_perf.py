"""The tile planner (include/nattn/tile_plan.h via nattn._C), the speed-of-light model
(nattn.perf) and the named problems (nattn.problems), checked against brute force over the
reference's dense mask (nattn.reference.neighborhood_mask)."""

import itertools
import math
import random

import pytest
import torch

from nattn import perf, problems, reference

_C = pytest.importorskip("nattn._C")


def random_problem(rng, rank, max_len=12):
    shape, kernel, stride, dilation, causal = [], [], [], [], []
    for _ in range(rank):
        length = rng.randint(1, max_len)
        d = rng.randint(1, max(1, length // 2)) if rng.random() < 0.4 else 1
        k = rng.randint(1, length // d)
        shape.append(length)
        kernel.append(k)
        stride.append(rng.randint(1, k))
        dilation.append(d)
        causal.append(rng.random() < 0.3)
    return problems.NamedProblem(
        name="random", spatial_shape=tuple(shape), heads=rng.randint(1, 3), kv_heads=1,
        head_dim=rng.choice([8, 16]), kernel_size=tuple(kernel), stride=tuple(stride),
        dilation=tuple(dilation), is_causal=tuple(causal), source="test",
        batch=rng.randint(1, 2), value_dim=rng.choice([0, 4]), dtype=torch.float32)


def axes_of(p):
    return list(zip(p.spatial_shape, p.kernel_size, p.stride, p.dilation, p.is_causal))


def mask_of(p):
    return reference.neighborhood_mask(p.spatial_shape, p.kernel_size, p.stride, p.dilation,
                                       p.is_causal)


def group_tiles(length, dilation, tile):
    """Tiles of one axis in dilation-group space: (group, token indices, complete?)."""
    out = []
    for g in range(dilation):
        group_len = (length - g + dilation - 1) // dilation
        for t0 in range(0, group_len, tile):
            idx = [g + dilation * t for t in range(t0, min(t0 + tile, group_len))]
            out.append((g, idx, t0 + tile <= group_len))
    return out


def brute_multi_dim(p, q_tile, kv_tile):
    """(q_tiles, visited, full) by looking at every tile pair's block of the dense mask."""
    mask = mask_of(p)
    rank = p.rank
    strides = [math.prod(p.spatial_shape[a + 1:]) for a in range(rank)]
    q_axes = [group_tiles(p.spatial_shape[a], p.dilation[a], q_tile[a]) for a in range(rank)]
    kv_axes = [group_tiles(p.spatial_shape[a], p.dilation[a], kv_tile[a]) for a in range(rank)]

    def flat(combo):
        idx = [0]
        for a, (_, axis_idx, _) in enumerate(combo):
            idx = [i + j * strides[a] for i in idx for j in axis_idx]
        return torch.tensor(idx)

    q_count = math.prod(len(t) for t in q_axes)
    visited = full = 0
    for qc in itertools.product(*q_axes):
        qi = flat(qc)
        for kc in itertools.product(*kv_axes):
            if any(qc[a][0] != kc[a][0] for a in range(rank)):
                continue  # attention never leaves the dilation group
            block = mask[qi][:, flat(kc)]
            if block.any():
                visited += 1
                if block.all() and all(c[2] for c in kc):
                    full += 1
    return q_count, visited, full


def brute_flat(p, q_tile, kv_tile):
    mask = mask_of(p)
    n = mask.shape[0]
    visited = full = 0
    for a in range(0, n, q_tile):
        for c in range(0, n, kv_tile):
            block = mask[a:a + q_tile, c:c + kv_tile]
            if block.any():
                visited += 1
                full += bool(block.all()) and c + kv_tile <= n
    return -(-n // q_tile), visited, full


@pytest.mark.parametrize("seed", range(6))
def test_multi_dim_tile_counts_match_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(25):
        rank = rng.randint(1, 3)
        # rank 3 at length 12 means ~10^5 tile pairs of brute force: keep 3-D layouts small
        p = random_problem(rng, rank, max_len=12 if rank < 3 and seed % 2 else 6)
        q_tile = [rng.randint(1, 5) for _ in range(p.rank)]
        kv_tile = [rng.randint(1, 5) for _ in range(p.rank)]
        got = _C.tile_plan_summary(axes_of(p), q_tile, kv_tile)
        assert got[:3] == brute_multi_dim(p, q_tile, kv_tile), (p.describe(), q_tile, kv_tile)
        assert got[3] == got[1] - got[2]


@pytest.mark.parametrize("seed", range(4))
def test_flat_tile_counts_match_brute_force(seed):
    rng = random.Random(100 + seed)
    for _ in range(30):
        p = random_problem(rng, rng.randint(1, 3), max_len=10)
        q_tile, kv_tile = rng.randint(1, 9), rng.randint(1, 9)
        got = _C.flat_tile_counts(axes_of(p), q_tile, kv_tile)
        assert got == brute_flat(p, q_tile, kv_tile), (p.describe(), q_tile, kv_tile)


def test_axis_tile_range_per_q_tile():
    """Per Q tile of one group: the visited range is exactly the KV tiles with an attended
    pair, and the full sub-range exactly the complete tiles attended by every query."""
    rng = random.Random(7)
    for _ in range(300):
        group_len = rng.randint(1, 20)
        k = rng.randint(1, group_len)
        s = rng.randint(1, k)
        causal = rng.random() < 0.4
        tq, tk = rng.randint(1, 6), rng.randint(1, 6)
        mask = reference.neighborhood_mask((group_len,), (k,), (s,), (1,), (causal,))
        for qt in range(-(-group_len // tq)):
            kv_begin, kv_end, full_begin, full_end = _C.tile_axis_range(
                group_len, k, s, causal, tq, tk, qt)
            assert kv_begin <= full_begin <= full_end <= kv_end
            rows = mask[qt * tq:(qt + 1) * tq]
            for kt in range(-(-group_len // tk)):
                block = rows[:, kt * tk:(kt + 1) * tk]
                assert (kv_begin <= kt < kv_end) == bool(block.any())
                is_full = bool(block.all()) and (kt + 1) * tk <= group_len
                assert (full_begin <= kt < full_end) == is_full, (group_len, k, s, causal, tq,
                                                                  tk, qt, kt)


def test_axis_inverse_tile_range_per_kv_tile():
    """The backward's key-side walk (tile_plan.h: axis_inverse_tile_range), per KV tile of one
    group: every Q tile holding a query that attends a key of the KV tile is visited, and the
    full sub-range is exactly the complete Q tiles every query of which attends every key of
    the KV tile."""
    rng = random.Random(3)
    checked = 0
    for _ in range(400):
        group_len = rng.randint(1, 40)
        k = rng.randint(1, group_len)
        s = rng.randint(1, k)
        causal = rng.random() < 0.4
        tq, tk = rng.choice([1, 2, 4, 8]), rng.choice([1, 2, 4, 8])
        mask = reference.neighborhood_mask((group_len,), (k,), (s,), (1,), (causal,))
        for kt in range(-(-group_len // tk)):
            begin, end, full_begin, full_end = _C.tile_axis_inverse_range(
                group_len, k, s, causal, tk, tq, kt)
            assert begin <= full_begin <= full_end <= end
            cols = mask[:, kt * tk:(kt + 1) * tk]
            for qt in range(-(-group_len // tq)):
                block = cols[qt * tq:(qt + 1) * tq]
                if block.any():
                    assert begin <= qt < end, (group_len, k, s, causal, tq, tk, kt, qt)
                is_full = bool(block.all()) and (qt + 1) * tq <= group_len
                assert (full_begin <= qt < full_end) == is_full, (group_len, k, s, causal, tq,
                                                                  tk, kt, qt)
            checked += 1
    assert checked > 1000


def test_locate_q_tile_enumerates_groups_in_order():
    for length, dilation, tq in [(10, 3, 2), (9, 3, 4), (7, 1, 3), (13, 4, 1), (5, 5, 2)]:
        expected = []
        for g in range(dilation):
            group_len = (length - g + dilation - 1) // dilation
            expected += [(g, t) for t in range(-(-group_len // tq))]
        q_tiles, _, _ = _C.tile_axis_counts(length, 1, 1, dilation, False, tq, 1)
        assert q_tiles == len(expected)
        assert [_C.tile_locate_q_tile(length, dilation, tq, t) for t in range(q_tiles)] \
            == expected


def test_tile_planner_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):
        _C.tile_plan_summary([(8, 5, 1, 2, False)], [2], [2])
    with pytest.raises(ValueError, match="q_tile extent"):
        _C.tile_plan_summary([(8, 3, 1, 1, False)], [0], [2])
    with pytest.raises(ValueError, match="one extent per axis"):
        _C.tile_plan_summary([(8, 3, 1, 1, False)], [2, 2], [2])
    with pytest.raises(ValueError, match="kv_tile 4 out of range"):
        _C.tile_axis_inverse_range(8, 3, 1, False, 2, 2, 4)


@pytest.mark.parametrize("seed", range(3))
def test_flops_match_mask_nnz(seed):
    rng = random.Random(200 + seed)
    for _ in range(30):
        p = random_problem(rng, rng.randint(1, 3))
        nnz = int(mask_of(p).sum())
        n = p.tokens
        assert perf.window_pairs(p) == nnz
        d, dv = p.head_dim, p.value_dim
        assert perf.needed_flops(p) == 2 * p.batch * p.heads * nnz * (d + dv)
        assert perf.needed_flops(p, backward=True) == 2 * p.batch * p.heads * nnz * (3 * d + 2 * dv)
        assert perf.dense_flops(p) == 2 * p.batch * p.heads * n * n * (d + dv)
        assert perf.density(p) == pytest.approx(nnz / n**2)


def test_backward_is_two_and_a_half_forward_and_additional_tokens_count():
    base = problems.NamedProblem("t", (16, 16), 4, 2, 32, (5, 5), (1, 1), (1, 1), (False, False),
                                 "test", dtype=torch.float16)
    assert perf.needed_flops(base, backward=True) == 2.5 * perf.needed_flops(base)
    assert perf.needed_flops(base) == 4 * 4 * 256 * 25 * 32  # 4 B H sum|w| D
    extra = type(base)(**{**base.__dict__, "num_additional": 3})
    assert perf.window_pairs(extra) == 256 * 25 + 256 * 3
    # bytes: q, k, v, out in fp16, lse fp32, plus the additional k, v
    e = 2
    q = 256 * 4 * 32 * e
    kv = 256 * 2 * 64 * e
    assert perf.compulsory_bytes(base) == q + kv + q + 256 * 4 * 4
    assert perf.compulsory_bytes(extra) == q + (256 + 3) * 2 * 64 * e + q + 256 * 4 * 4
    assert perf.compulsory_bytes(base, backward=True) == 2 * q + 2 * kv + 2 * q + 256 * 4 * 4
    # additional tokens: every Q tile visits ceil(3 / 8) = 1 more tile, which is cut (masked)
    plain = perf.multi_dim_tiles(base, (4, 4), (2, 4))
    more = perf.multi_dim_tiles(extra, (4, 4), (2, 4))
    assert more.visited == plain.visited + plain.q_tiles
    assert more.full == plain.full


def test_gna_stride_equal_to_q_tile_is_perfectly_block_sparse():
    # GNA: stride = Q tile extent, window a multiple of the KV tile, and window starts on KV
    # tile boundaries: start = leader - K div 2 = 8 q + 4 - 12 = 8 (q - 1).
    p = problems.NamedProblem("gna", (64, 64), 2, 2, 64, (24, 24), (8, 8), (1, 1),
                              (False, False), "test", dtype=torch.float16)
    counts = perf.multi_dim_tiles(p, (8, 8), (8, 8))
    assert counts.masked == 0 and counts.visited > 0
    assert perf.stride_note(p, counts).startswith("perfectly block-sparse")
    # the same window at stride 1 needs masks, and the note proposes a stride
    p1 = type(p)(**{**p.__dict__, "stride": (1, 1)})
    c1 = perf.multi_dim_tiles(p1, (8, 8), (8, 8))
    assert c1.masked > 0
    note = perf.stride_note(p1, c1)
    assert "stride (8, 8)" in note and "0% masked" in note
    # 1-D flattened tiles of the same size cut across rows: many more pairs, all masked
    flat = perf.flat_tiles(p, 64, 64)
    assert flat.visited > counts.visited and flat.masked > 0


def test_recommended_tile_shape_minimizes_visited_pairs():
    p = problems.get("dinat-t-stage3")
    best = perf.recommend_tile_shape(p, 16, 16)
    for q_tile, kv_tile in perf.candidate_tile_shapes(2, 16, 16):
        assert perf.multi_dim_tiles(p, q_tile, kv_tile).visited >= best.visited
    assert math.prod(best.q_tile) == 16


def test_speed_of_light_bounds():
    p = problems.get("nat-t-stage1")
    c = perf.Ceilings(matmul_flops=1e12, bandwidth=1e11, source="supplied")
    r = perf.speed_of_light(p, c, q_tile=(8, 16), kv_tile=(8, 16))
    assert r.flop_bound == pytest.approx(perf.needed_flops(p) / 1e12)
    assert r.flop_bound == pytest.approx(r.dense_flops / 1e12 * r.density)
    assert r.memory_bound == pytest.approx(perf.compulsory_bytes(p) / 1e11)
    multi = r.tiles["multi-dim"]
    counts = perf.multi_dim_tiles(p, (8, 16), (8, 16))
    assert multi["visited"] == counts.visited
    assert multi["bound"] == pytest.approx(
        p.batch * p.heads * counts.visited * 128 * 128 * 2 * 64 / 1e12)
    assert r.tiles["1-D flat"]["q_tile"] == [128]
    # the tile-model time is a what-if, not a bound: only FLOP and memory bounds count here
    assert r.tightest_bound == max(r.flop_bound, r.memory_bound) == r.tightest_any_bound
    assert r.kernel_bound is None
    cpu = perf.speed_of_light(p, c, device_type="cpu")
    assert cpu.kernel_bound == pytest.approx(perf.cpu_forward_flops(p) / 1e12)
    assert cpu.tightest_bound == max(r.flop_bound, r.memory_bound, cpu.kernel_bound)
    assert perf.speed_of_light(p, c, backward=True, device_type="cpu").kernel_bound is None
    without = perf.speed_of_light(p, None)
    assert without.flop_bound is None and without.tiles["multi-dim"]["bound"] is None


def test_named_problems_follow_the_papers():
    nat = problems.get("nat-t-stage1")
    assert (nat.spatial_shape, nat.heads, nat.head_dim, nat.kernel_size) == \
        ((56, 56), 2, 32, (7, 7))
    dinat = problems.get("dinat-t-stage1")
    assert dinat.dilation == (8, 8)
    assert all(k * d == length for k, d, length in
               zip(dinat.kernel_size, dinat.dilation, dinat.spatial_shape))  # 7 x 8 = 56
    d3 = problems.get("dinat-t-stage3")
    assert (d3.spatial_shape, d3.heads, d3.dilation) == ((14, 14), 8, (2, 2))
    llm = problems.get("llm-sliding-window")
    assert (llm.heads, llm.kv_heads, llm.is_causal) == (32, 8, (True,))
    assert set(problems.SUITES["all"]) == set(problems.PROBLEMS)
    for p in problems.PROBLEMS.values():
        for axis in axes_of(p):
            assert _C.axis_params_error(*axis[:4]) is None, p.name


@pytest.mark.parametrize("factor", [1.0, 0.5, 0.25, 0.125, 1 / 16, 1 / 64, 0.3, 1.5])
def test_scale_keeps_windows_valid(factor):
    for p in problems.PROBLEMS.values():
        s = problems.scale(p, factor)
        assert s.rank == p.rank and s.heads == p.heads and s.head_dim == p.head_dim
        for axis in axes_of(s):
            assert _C.axis_params_error(*axis[:4]) is None, (p.name, factor, s.describe())
        if factor == 1.0:
            assert s == p


def test_scale_rules():
    dinat = problems.scale(problems.get("dinat-t-stage1"), 0.5)  # 28 x 28: dilation 28 // 7
    assert dinat.spatial_shape == (28, 28) and dinat.kernel_size == (7, 7)
    assert dinat.dilation == (4, 4)
    flux = problems.scale(problems.get("flux-4k"), 0.125)  # window 80 > 32: scaled with layout
    assert flux.spatial_shape == (32, 32) and flux.kernel_size == (10, 10)
    assert flux.stride == (2, 2)
    nat = problems.scale(problems.get("nat-seg-stage1"), 0.25)  # window fits: kept
    assert nat.spatial_shape == (64, 64) and nat.kernel_size == (7, 7)
    with pytest.raises(ValueError):
        problems.scale(nat, 0)


def test_default_cpu_scale_budget():
    for p in problems.PROBLEMS.values():
        f = problems.default_cpu_scale(p)
        s = problems.scale(p, f)
        if p.name.startswith("cpu-"):
            assert f == 1.0
        else:
            assert perf.needed_flops(s) <= 2e9
            assert s.batch * s.heads * s.tokens**2 <= 6.8e7
            assert f == 1.0 or perf.needed_flops(problems.scale(p, 2 * f)) > 2e9 or \
                p.heads * problems.scale(p, 2 * f).tokens ** 2 > 6.8e7


def test_kernel_tile_shape():
    p = problems.get("cpu-3d-16")
    cpu = perf.kernel_tile_shape(p, "cpu")
    assert cpu.q_tile == (1, 1, _C.cpu_q_tile) and cpu.kv_tile == (1, 1, _C.cpu_kv_tile)
    assert cpu.visited == _C.tile_plan_summary(axes_of(p), list(cpu.q_tile),
                                               list(cpu.kv_tile))[1]
    gpu = perf.kernel_tile_shape(p, "cuda")
    assert gpu == perf.recommend_tile_shape(p)


def test_timed_calls_run_with_the_garbage_collector_paused():
    """perf.time_calls and the interleaved bench rounds time each call with gc off (as timeit
    does), and leave the collector as they found it."""
    import gc

    from nattn.cli import common, peers

    seen = []

    def fn():
        seen.append(gc.isenabled())

    assert gc.isenabled()
    perf.time_calls(fn, torch.device("cpu"), warmup=1, repeats=2)
    assert seen == [True, False, False] and gc.isenabled()  # the warm-up call is not timed
    seen.clear()
    peers.measure_interleaved([common.Impl(name="a", kind="x", forward=fn)],
                              torch.device("cpu"), warmup=1, repeats=2, backward=False)
    assert seen == [True, False, False] and gc.isenabled()
    gc.disable()
    try:
        with perf.gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # it was off before: stays off
    finally:
        gc.enable()
