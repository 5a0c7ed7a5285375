"""The fused CPU kernels (backend "cpu") against the reference.

fp64: forward, lse and all gradients agree with autograd through nattn.reference to 1e-10 on a
seeded sweep of 300+ configurations. fp16/bf16: the error-ratio rule of DESIGN.md section 5.
Outputs are poisoned with NaN before every kernel call, so an unwritten element fails, and the
kernels use exactly torch.get_num_threads() threads however small the case.
"""

import random
from dataclasses import dataclass
from typing import Tuple

import pytest
import torch

import nattn
from conftest import cpu_problem, run_attention as run
from nattn import _native


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_native, "poison_outputs", True)
    # The small cases here would otherwise run on one thread (the kernels skip threads a
    # problem cannot keep busy); exact thread counts exercise the parallel schedules.
    monkeypatch.setattr(_native, "exact_threads", True)


@dataclass
class Case:
    batch: int
    shape: Tuple[int, ...]
    heads: int
    kv_heads: int
    dim: int
    dim_v: int
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    is_causal: Tuple[bool, ...]
    additional: int
    heads_first: bool  # inputs are heads-first storage seen through a heads-last view


def _axis(rng, length):
    d = rng.randint(1, max(1, length // 2)) if rng.random() < 0.4 else 1
    k = rng.randint(1, length // d)
    s = rng.randint(1, k) if rng.random() < 0.5 else 1
    return k, s, d


def random_case(rng: random.Random) -> Case:
    rank = rng.choice([1, 1, 2, 2, 3])
    max_len = {1: 40, 2: 11, 3: 6}[rank]
    shape = tuple(rng.randint(1, max_len) for _ in range(rank))
    axes = [_axis(rng, n) for n in shape]
    kv_heads = rng.choice([1, 2])
    return Case(
        batch=rng.choice([1, 2]),
        shape=shape,
        heads=kv_heads * rng.choice([1, 2, 3]),
        kv_heads=kv_heads,
        dim=rng.choice([1, 3, 8, 16, 33]),
        dim_v=rng.choice([2, 8, 16]),
        kernel_size=tuple(a[0] for a in axes),
        stride=tuple(a[1] for a in axes),
        dilation=tuple(a[2] for a in axes),
        is_causal=tuple(rng.random() < 0.3 for _ in range(rank)),
        additional=rng.choice([0, 0, 0, 1, 3]),
        heads_first=rng.random() < 0.3,
    )


# Edges named in the issue: length = K * d, lengths not divisible by d or s, even K, s = K,
# single-token axes.
EDGE_CASES = [
    Case(1, (12,), 2, 2, 8, 8, (4,), (1,), (3,), (False,), 0, False),          # L = K * d
    Case(1, (11,), 2, 1, 8, 8, (3,), (2,), (3,), (False,), 0, False),          # L % d, L % s
    Case(1, (10,), 2, 2, 8, 8, (4,), (4,), (1,), (False,), 0, False),          # blocked, L % s
    Case(1, (9, 7), 2, 2, 8, 8, (4, 2), (2, 2), (2, 1), (True, False), 0, True),  # even K
    Case(1, (1, 5), 1, 1, 8, 8, (1, 5), (1, 5), (1, 1), (False, True), 2, False),  # 1-token axis
    Case(2, (1, 1, 1), 2, 1, 4, 4, (1, 1, 1), (1, 1, 1), (1, 1, 1), (True,) * 3, 0, False),
    Case(1, (6, 6, 6), 2, 2, 8, 4, (3, 3, 3), (3, 1, 3), (2, 1, 2), (False, True, False), 1,
         True),
    Case(1, (13,), 4, 1, 16, 16, (13,), (1,), (1,), (True,), 0, False),        # full causal
]


def make_inputs(c: Case, dtype=torch.float64, generator=None):
    def tensor(heads, dim):
        if c.heads_first:
            t = torch.randn(c.batch, heads, *c.shape, dim, dtype=dtype, generator=generator)
            return t.movedim(1, -2)
        return torch.randn(c.batch, *c.shape, heads, dim, dtype=dtype, generator=generator)

    q, k, v = tensor(c.heads, c.dim), tensor(c.kv_heads, c.dim), tensor(c.kv_heads, c.dim_v)
    ak = av = None
    if c.additional:
        ak = torch.randn(c.batch, c.additional, c.kv_heads, c.dim, dtype=dtype,
                         generator=generator)
        av = torch.randn(c.batch, c.additional, c.kv_heads, c.dim_v, dtype=dtype,
                         generator=generator)
    return q, k, v, ak, av


def cpu_fn(*args, **kwargs):
    return nattn.neighborhood_attention(*args, backend="cpu", **kwargs)


def _sweep_cases():
    rng = random.Random(20261121)
    return EDGE_CASES + [random_case(rng) for _ in range(300)]


def test_fp64_sweep_matches_reference():
    cases = _sweep_cases()
    worst = 0.0
    for i, c in enumerate(cases):
        gen = torch.Generator().manual_seed(i)
        inputs = make_inputs(c, generator=gen)
        out_shape = (c.batch, *c.shape, c.heads)
        grads = (torch.randn(*out_shape, c.dim_v, dtype=torch.float64, generator=gen),
                 torch.randn(*out_shape, dtype=torch.float32, generator=gen))
        got = run(cpu_fn, c, inputs, grads)
        want = run(nattn.reference.neighborhood_attention, c, inputs, grads)
        names = ["out", "lse", "dq", "dk", "dv", "d_add_k", "d_add_v"]
        for name, g, w in zip(names, got, want):
            assert not torch.isnan(g).any(), (name, c)
            err = (g.double() - w.double()).abs().max().item()
            # lse is float32 by contract: compare it at float32 resolution.
            tol = 1e-10 if name != "lse" else 4e-6 * max(1.0, w.abs().max().item())
            assert err <= tol, (name, err, c)
            if name != "lse":
                worst = max(worst, err)
    assert len(cases) >= 300
    assert worst < 1e-10


def test_gradcheck_through_cpu_kernels():
    c = Case(1, (5, 4, 3), 2, 1, 3, 2, (3, 2, 3), (2, 1, 1), (1, 2, 1), (False, True, False), 2,
             True)
    inputs = [t.requires_grad_() for t in make_inputs(c)]

    def fn(q, k, v, ak, av):
        return cpu_fn(q, k, v, c.kernel_size, stride=c.stride, dilation=c.dilation,
                      is_causal=c.is_causal, additional_keys=ak, additional_values=av)

    assert torch.autograd.gradcheck(fn, inputs)


def test_backward_is_deterministic():
    c = Case(2, (9, 9), 4, 2, 16, 16, (5, 3), (1, 1), (1, 2), (False, False), 2, False)
    inputs = make_inputs(c, dtype=torch.float32)
    grads = (torch.randn(c.batch, *c.shape, c.heads, c.dim_v), torch.zeros(c.batch, *c.shape,
                                                                             c.heads))
    first = run(cpu_fn, c, inputs, grads)
    for _ in range(3):
        again = run(cpu_fn, c, inputs, grads)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_backward_schedules_agree_bitwise(dtype):
    """The backward runs each (batch, kv head) group on one thread with dq accumulated on the
    key-side walk when the groups keep the threads busy, and splits each group over all threads
    with a separate dq pass otherwise; the two do the same sums in the same order. One thread
    (fused), as many threads as groups (fused) and one more (split) must give identical bits,
    for random configurations with a non-zero lse gradient."""
    rng = random.Random(5)
    before = torch.get_num_threads()
    try:
        for i in range(25):
            c = random_case(rng)
            gen = torch.Generator().manual_seed(i)
            inputs = make_inputs(c, dtype=dtype, generator=gen)
            shape = (c.batch, *c.shape, c.heads)
            grads = (torch.randn(*shape, c.dim_v, dtype=dtype, generator=gen),
                     torch.randn(*shape, generator=gen))
            results = []
            for threads in (1, c.batch * c.kv_heads, c.batch * c.kv_heads + 1):
                torch.set_num_threads(threads)
                results.append(run(cpu_fn, c, inputs, grads))
            for other in results[1:]:
                for a, b in zip(results[0], other):
                    assert torch.equal(a, b), c
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape,kernel_size", [((1, 8192, 4, 64), 7),
                                               ((1, 96, 96, 4, 32), (5, 7))])
def test_bf16_backward_schedules_agree_bitwise(shape, kernel_size):
    """bf16 at the avx512bf16 level sums dk and dv over pairs of queries on bf16 products; the
    fused and split schedules must pair the same queries in the same order. A mismatch changes
    the fp32 sums in their last bits, which the bf16 gradients hide unless a sum sits at a
    rounding boundary: hence problems of about 10^5-10^6 gradient elements (a chunk walk that
    pairs queries from an odd position changed 8-15 of them). One group (a kv head shared by
    four heads): one thread runs it fused, two split it."""
    gen = torch.Generator().manual_seed(7)
    q, g = (torch.randn(*shape, generator=gen).bfloat16() for _ in range(2))
    k, v = (torch.randn(*shape[:-2], 1, shape[-1], generator=gen).bfloat16() for _ in range(2))
    fn = nattn.na1d if len(shape) == 4 else nattn.na2d
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            fn(*leaves, kernel_size=kernel_size, backend="cpu").backward(g)
            results.append([t.grad for t in leaves])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_fp32_large_scores_match_reference():
    """Scores in the thousands: the online softmax must subtract each row's true running max
    (a wrong one overflows exp to inf or underflows whole rows to 0). fp32 kernel error on the
    output <= 2x that of the reference computed in fp32, plus a small floor."""
    rng = random.Random(11)
    for i in range(10):
        c = random_case(rng)
        gen = torch.Generator().manual_seed(300 + i)
        q, k, v, ak, av = make_inputs(c, generator=gen)
        q, k = q * 40, k * 40  # scores up to about 1600 * dim * scale
        if ak is not None:
            ak = ak * 40
        exact_inputs = [q, k, v, ak, av]
        low_inputs = [None if t is None else t.float() for t in exact_inputs]
        shape = (c.batch, *c.shape, c.heads)
        grads = (torch.zeros(*shape, c.dim_v), torch.zeros(shape))
        exact = run(nattn.reference.neighborhood_attention, c, exact_inputs,
                    [g.double() for g in grads])[0]
        torch_low = run(nattn.reference.neighborhood_attention, c, low_inputs, grads)[0]
        kernel = run(cpu_fn, c, low_inputs, grads)[0]
        assert torch.isfinite(kernel).all(), c
        k_err = (kernel.double() - exact).abs().max().item()
        t_err = (torch_low.double() - exact).abs().max().item()
        assert k_err <= 2 * t_err + 1e-5, (k_err, t_err, c)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_half_precision_value_round_trips(dtype):
    """With a window of one key, out = 1 * v exactly, so every one of the 65536 bit patterns of
    fp16 / bf16 as a value must come back unchanged through the kernels' conversions to fp32 and
    back (cpu_common.h, including the vectorized fp16 rows): zeros, subnormals, the largest
    normals, infinities; NaN stays NaN. -0 comes back as +0 (0 + 1 * -0 = +0 in the sum), so
    values are compared with ==, and the bits of every nonzero one.

    bf16 at the avx512bf16 level runs on bf16 products (vdpbf16ps), which read subnormal inputs
    as 0 (block_kernels.h: lane_forward_bf16): there the 254 subnormal bf16 values must come back
    as exactly 0, and every other value unchanged."""
    v = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(1, 4096, 1, 16)
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 4096, 1, 16, generator=gen).to(dtype) for _ in range(2))
    out = nattn.na1d(q, k, v, kernel_size=1, backend="cpu")
    nan = v.isnan()
    assert torch.equal(out.isnan(), nan)
    if dtype == torch.bfloat16 and _native._C.cpu_isa() == "avx512bf16":
        subnormal = (v != 0) & (v.abs() < torch.finfo(dtype).tiny)
        assert int(subnormal.sum()) == 254
        assert torch.equal(out[subnormal], torch.zeros_like(v[subnormal]))
        v = torch.where(subnormal, torch.zeros_like(v), v)
    assert torch.equal(out[~nan], v[~nan])
    nonzero = ~nan & (v != 0)
    assert torch.equal(out[nonzero].view(torch.int16), v[nonzero].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_error_ratio(dtype):
    """Kernel error vs the fp64 reference <= 2x (forward) / 3x (gradients) the error of the
    reference computed by PyTorch in the kernel's own dtype, plus a small absolute floor."""
    rng = random.Random(7)
    floor = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}[dtype]
    for i in range(12):
        c = random_case(rng)
        gen = torch.Generator().manual_seed(100 + i)
        exact_inputs = make_inputs(c, generator=gen)
        low_inputs = [None if t is None else t.to(dtype) for t in exact_inputs]
        # Compare all three on the same (rounded) inputs: the exact reference sees them in fp64.
        exact_inputs = [None if t is None else t.double() for t in low_inputs]
        shape = (c.batch, *c.shape, c.heads)
        g_out = torch.randn(*shape, c.dim_v, generator=gen).to(dtype)
        grads_exact = (g_out.double(), torch.zeros(shape))
        grads_low = (g_out, torch.zeros(shape))
        exact = run(nattn.reference.neighborhood_attention, c, exact_inputs, grads_exact)
        torch_low = run(nattn.reference.neighborhood_attention, c, low_inputs, grads_low)
        kernel = run(cpu_fn, c, low_inputs, grads_low)
        for n, (e, t, k) in enumerate(zip(exact, torch_low, kernel)):
            if n == 1:
                continue  # lse: float32 in every path
            ratio = 2.0 if n == 0 else 3.0
            assert k.dtype == dtype
            k_err = (k.double() - e).abs().max().item()
            t_err = (t.double() - e).abs().max().item()
            assert k_err <= ratio * t_err + floor, (n, k_err, t_err, c)


# Problems whose fp32 forward runs two-row lane tiles (block_kernels.h: LaneTile, rows = 2):
# neighbouring indices of axis 1 (the second-to-last spatial axis) paired, with odd counts,
# dilation groups, strides (identical windows), causal windows, partial last-axis tiles, GQA and
# additional tokens.
PAIRED_CASES = [
    Case(1, (16, 40), 2, 2, 32, 32, (7, 7), (1, 1), (1, 1), (False, False), 0, False),
    Case(2, (9, 29), 4, 2, 16, 8, (3, 5), (1, 1), (1, 1), (False, False), 0, True),
    Case(1, (16, 12), 2, 1, 8, 16, (5, 3), (1, 2), (2, 1), (False, False), 3, False),
    Case(1, (11, 10), 2, 2, 16, 16, (4, 3), (2, 1), (1, 1), (True, False), 0, False),
    Case(1, (5, 7, 9), 2, 2, 8, 8, (3, 3, 3), (1, 1, 1), (1, 2, 1), (False, True, False), 1,
         False),
    Case(1, (4, 8, 20), 1, 1, 33, 8, (3, 7, 5), (1, 3, 1), (1, 1, 2), (False, False, True), 0,
         False),
]


def _kernels(shape, kernel_size, stride, dilation, dim, dim_v, is_causal=False):
    """The product kernels ("lane" or "block") the fp32 CPU forward runs for this shape."""
    from nattn import perf
    return perf.cpu_forward_kernels(cpu_problem(shape, kernel_size, stride, dilation, is_causal,
                                                head_dim=dim, value_dim=dim_v))


@pytest.mark.parametrize("c", PAIRED_CASES)
def test_fp32_two_row_lane_tiles_match_reference(c):
    """fp32 forward (and lse) of the two-row lane tiles against the fp64 reference: error <= 2x
    that of the reference computed in fp32, plus 1e-6 (DESIGN.md section 5)."""
    from nattn import _C
    if _C.cpu_lane_forward():  # else the block kernels run: still checked, as they are here
        assert _kernels(c.shape, c.kernel_size, c.stride, c.dilation, c.dim, c.dim_v,
                        c.is_causal) == "lane"
    gen = torch.Generator().manual_seed(sum(c.shape) + c.dim)
    low = [None if t is None else t.float() for t in make_inputs(c, generator=gen)]
    exact_inputs = [None if t is None else t.double() for t in low]
    kwargs = dict(stride=c.stride, dilation=c.dilation, is_causal=c.is_causal,
                  additional_keys=low[3], additional_values=low[4], return_lse=True)
    exact = nattn.reference.neighborhood_attention(
        *exact_inputs[:3], c.kernel_size, **{**kwargs, "additional_keys": exact_inputs[3],
                                             "additional_values": exact_inputs[4]})
    torch_low = nattn.reference.neighborhood_attention(*low[:3], c.kernel_size, **kwargs)
    kernel = cpu_fn(*low[:3], c.kernel_size, **kwargs)
    for e, t, k in zip(exact, torch_low, kernel):
        k_err = (k.double() - e).abs().max().item()
        t_err = (t.double() - e).abs().max().item()
        assert k_err <= 2 * t_err + 1e-6, (k_err, t_err, c)


@pytest.mark.parametrize("odd_strides", [False, True], ids=["dense", "odd-strides"])
@pytest.mark.parametrize("c", PAIRED_CASES)
def test_bf16_lane_forward_matches_reference(c, odd_strides):
    """bf16 forward and lse of the lane tiles against the fp64 reference: error <= 2x that of the
    reference computed in bf16, plus 1e-3 (DESIGN.md section 5; the floor of
    test_low_precision_error_ratio). At the avx512bf16 level these run on bf16 products
    (block_kernels.h: lane_forward_bf16) where head_dim is even, there are no additional tokens
    and the strides keep depth pairs whole (the heads-first cases are views); odd_strides gives
    every input rows of dim + 1 elements seen through a slice, which fall back to the fp32
    products. One- and two-row tiles, odd offset counts, dilation, strides, causal, GQA."""
    gen = torch.Generator().manual_seed(sum(c.shape) + c.dim + 1)
    low = [None if t is None else t.to(torch.bfloat16) for t in make_inputs(c, generator=gen)]
    if odd_strides:
        low[:3] = [torch.cat([t, t[..., :1]], -1)[..., :-1] for t in low[:3]]
        assert all(t.stride(-2) % 2 == 1 or t.shape[-1] % 2 == 1 for t in low[:3])
    exact_inputs = [None if t is None else t.double() for t in low]
    kwargs = dict(stride=c.stride, dilation=c.dilation, is_causal=c.is_causal, return_lse=True)
    exact = nattn.reference.neighborhood_attention(
        *exact_inputs[:3], c.kernel_size, additional_keys=exact_inputs[3],
        additional_values=exact_inputs[4], **kwargs)
    torch_low = nattn.reference.neighborhood_attention(
        *low[:3], c.kernel_size, additional_keys=low[3], additional_values=low[4], **kwargs)
    kernel = cpu_fn(*low[:3], c.kernel_size, additional_keys=low[3], additional_values=low[4],
                    **kwargs)
    assert kernel[0].dtype == torch.bfloat16 and kernel[1].dtype == torch.float32
    for e, t, k in zip(exact, torch_low, kernel):
        assert torch.isfinite(k).all()
        k_err = (k.double() - e).abs().max().item()
        t_err = (t.double() - e).abs().max().item()
        assert k_err <= 2 * t_err + 1e-3, (k_err, t_err, c)


# bf16 backward cases: the lane tiles above, a window too wide for lanes (the block products of
# both walks) and an odd head_dim (the fp32 products).
BF16_BACKWARD_CASES = PAIRED_CASES + [
    Case(1, (300,), 2, 1, 32, 16, (255,), (1,), (1,), (False,), 0, False),
    Case(2, (21, 18), 2, 2, 16, 16, (13, 5), (1, 2), (1, 1), (False, True), 0, True),
]


@pytest.mark.parametrize("c", BF16_BACKWARD_CASES)
def test_bf16_backward_matches_reference(c):
    """bf16 gradients against the fp64 reference: error <= 3x that of the reference computed in
    bf16, plus 1e-3 (test_low_precision_error_ratio's rule), on one thread (the fused schedule)
    and on one thread more than the (batch, kv head) groups (the split schedule), which must
    also agree bitwise. At the avx512bf16 level S, dP, dq, dk and dv run on bf16 products where
    the head dims are even and there are no additional tokens (block_kernels.h:
    accumulate_pairs_bf16); the other cases take the fp32 products."""
    gen = torch.Generator().manual_seed(sum(c.shape) + c.dim + 2)
    low = [None if t is None else t.to(torch.bfloat16) for t in make_inputs(c, generator=gen)]
    exact_inputs = [None if t is None else t.double() for t in low]
    shape = (c.batch, *c.shape, c.heads)
    g_out = torch.randn(*shape, c.dim_v, generator=gen).to(torch.bfloat16)
    d_lse = torch.randn(*shape, generator=gen)
    exact = run(nattn.reference.neighborhood_attention, c, exact_inputs,
                (g_out.double(), d_lse.double()))
    torch_low = run(nattn.reference.neighborhood_attention, c, low, (g_out, d_lse))
    before = torch.get_num_threads()
    kernels = []
    try:
        for threads in (1, c.batch * c.kv_heads + 1):
            torch.set_num_threads(threads)
            kernels.append(run(cpu_fn, c, low, (g_out, d_lse)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*kernels):
        assert torch.equal(a, b), c
    for n, (e, t, k) in enumerate(zip(exact, torch_low, kernels[0])):
        if n < 2:
            continue  # out, lse: the forward tests
        assert torch.isfinite(k).all()
        k_err = (k.double() - e).abs().max().item()
        t_err = (t.double() - e).abs().max().item()
        assert k_err <= 3 * t_err + 1e-3, (n, k_err, t_err, c)


@pytest.mark.parametrize("shape,kernel_size,dilation", [
    ((16, 40), (7, 7), (1, 1)), ((13, 40), (3, 5), (2, 1)), ((10, 33), (4, 3), (1, 1))])
def test_two_row_lane_tiles_are_exact(shape, kernel_size, dilation):
    """A 2-D problem runs two-row lane tiles along its first axis; the same problem as 3-D with
    a one-token middle axis has no axis to pair (it runs one row per tile), and visits the same
    key lines in the same order. A paired row's sums only gain exact zeros, so the two must
    agree bit for bit."""
    from nattn import _C

    def kernels(spatial, ks, dil):
        return _kernels(spatial, ks, (1,) * len(ks), dil, 16, 16)

    as_3d = (shape[0], 1, shape[1])
    ks3, dil3 = (kernel_size[0], 1, kernel_size[1]), (dilation[0], 1, dilation[1])
    if not _C.cpu_lane_forward():
        pytest.skip("no lane kernels at this instruction-set level")
    assert kernels(shape, kernel_size, dilation) == kernels(as_3d, ks3, dil3) == "lane"
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, *shape, 2, 16, generator=gen) for _ in range(3))
    out2, lse2 = cpu_fn(q, k, v, kernel_size, dilation=dilation, return_lse=True)
    out3, lse3 = cpu_fn(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), ks3, dilation=dil3,
                        return_lse=True)
    assert torch.equal(out2, out3.squeeze(2))
    assert torch.equal(lse2, lse3.squeeze(2))


def test_rpb_at_this_isa_level():
    """The relative-bias block kernels (block_add_bias, block_add_bias_grad) at this process's
    instruction-set level (tests/test_cpu_isa.py reruns this file at the lower ones): fp64 edge
    cases of tests/test_rpb.py against the reference to 1e-10, d_rpb included."""
    import test_rpb

    for index, c in enumerate(test_rpb.EDGE_CASES[:4]):
        gen = torch.Generator().manual_seed(index)
        inputs = test_rpb.make_inputs(c, torch.float64, gen)
        grads = test_rpb._grads(c, torch.float64, gen)
        want = test_rpb.run(nattn.reference.neighborhood_attention, c, inputs, grads)
        got = test_rpb.run(test_rpb.cpu_fn, c, inputs, grads)
        for n, (g, w) in enumerate(zip(got, want)):
            assert (g - w).abs().max().item() <= 1e-10 * max(1.0, w.abs().max().item()), (n, c)
