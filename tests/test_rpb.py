"""Relative positional bias (rpb, DESIGN.md section 7) in the fused op.

The oracle is nattn.reference (a dense bias built from the section's formula, plain autograd),
itself checked here against a loop over (query, key) pairs written from the same text. The CPU
kernels ("cpu") must match it in fp64 to 1e-10 for out, lse and every gradient, d_rpb included,
on a seeded sweep of 1-D/2-D/3-D problems with odd and even kernels, dilation, strides (GNA),
per-axis causal masks, GQA and additional tokens. Outputs are poisoned with NaN before every
kernel call and the kernels use exactly torch.get_num_threads() threads.
"""

import itertools
import random
from dataclasses import dataclass
from typing import Tuple

import pytest
import torch

import nattn
from nattn import _native


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_native, "poison_outputs", True)
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
    heads_first: bool  # q, k, v, rpb are views of differently ordered storage


def _axis(rng, length):
    d = rng.randint(1, max(1, length // 3)) if rng.random() < 0.4 else 1
    k = rng.randint(1, length // d)
    s = rng.randint(1, k) if rng.random() < 0.4 else 1
    return k, s, d


def random_case(rng: random.Random) -> Case:
    rank = rng.choice([1, 1, 2, 2, 3])
    max_len = {1: 40, 2: 12, 3: 6}[rank]
    shape = tuple(rng.randint(1, max_len) for _ in range(rank))
    axes = [_axis(rng, n) for n in shape]
    kv_heads = rng.choice([1, 2])
    return Case(
        batch=rng.choice([1, 2]),
        shape=shape,
        heads=kv_heads * rng.choice([1, 2, 3]),
        kv_heads=kv_heads,
        dim=rng.choice([1, 4, 8, 16, 33]),
        dim_v=rng.choice([2, 8, 16]),
        kernel_size=tuple(a[0] for a in axes),
        stride=tuple(a[1] for a in axes),
        dilation=tuple(a[2] for a in axes),
        is_causal=tuple(rng.random() < 0.3 for _ in range(rank)),
        additional=rng.choice([0, 0, 0, 1, 3]),
        heads_first=rng.random() < 0.3,
    )


EDGE_CASES = [
    # NAT stage-1-like: odd kernel, borders shift the window (offsets up to K - 1 on one side)
    Case(1, (14, 14), 2, 2, 8, 8, (7, 7), (1, 1), (1, 1), (False, False), 0, False),
    # DiNAT: dilation, L not divisible by d
    Case(2, (13, 11), 2, 1, 8, 8, (3, 3), (1, 1), (4, 3), (False, False), 0, True),
    # even kernels (r keys before the leader, r - 1 after), GNA strides, causal axis
    Case(1, (9, 10), 2, 2, 8, 8, (4, 6), (2, 3), (2, 1), (True, False), 0, False),
    # 1-D causal sliding window with GQA and additional tokens (which get no bias)
    Case(2, (37,), 4, 1, 16, 8, (9,), (1,), (1,), (True,), 3, False),
    # self-attention K = L and blocked s = K
    Case(1, (12,), 2, 2, 8, 8, (12,), (1,), (1,), (False,), 0, False),
    Case(1, (16,), 2, 2, 8, 8, (4,), (4,), (1,), (False,), 1, True),
    # 3-D, mixed causal, K = 1 on one axis, even kernel, dilation
    Case(1, (4, 6, 7), 2, 2, 8, 4, (1, 4, 3), (1, 2, 1), (1, 1, 2), (False, True, False), 2,
         False),
    # long last axis: many key chunks per row tile, and several tiles per line
    Case(1, (3, 70), 2, 2, 8, 8, (3, 21), (1, 5), (1, 1), (False, False), 0, False),
]


def _sweep():
    rng = random.Random(1307)
    return EDGE_CASES + [random_case(rng) for _ in range(72)]


SWEEP = _sweep()


def make_inputs(c: Case, dtype, gen):
    def tensor(shape):
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        if not c.heads_first:
            return x
        # Heads-first storage [B, H, *spatial, D] seen through a heads-last view.
        perm = [0, len(shape) - 2] + list(range(1, len(shape) - 2)) + [len(shape) - 1]
        inv = [perm.index(i) for i in range(len(shape))]
        return x.permute(perm).contiguous().permute(inv)

    q = tensor((c.batch, *c.shape, c.heads, c.dim))
    k = tensor((c.batch, *c.shape, c.kv_heads, c.dim))
    v = tensor((c.batch, *c.shape, c.kv_heads, c.dim_v))
    ak = av = None
    if c.additional:
        ak = torch.randn(c.batch, c.additional, c.kv_heads, c.dim, generator=gen,
                         dtype=torch.float64).to(dtype)
        av = torch.randn(c.batch, c.additional, c.kv_heads, c.dim_v, generator=gen,
                         dtype=torch.float64).to(dtype)
    rpb_shape = (c.heads,) + tuple(2 * k - 1 for k in c.kernel_size)
    rpb = torch.randn(rpb_shape, generator=gen, dtype=torch.float64).to(dtype)
    if c.heads_first:  # heads-last storage: a non-contiguous table, the kernels read strides
        rpb = rpb.movedim(0, -1).contiguous().movedim(-1, 0)
    return [q, k, v, ak, av, rpb]


def run(fn, c: Case, inputs, grads):
    """[out, lse, *grads of (out . g_out + lse . g_lse) w.r.t. q, k, v, (ak, av), rpb]."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    q, k, v, ak, av, rpb = leaves
    out, lse = fn(q, k, v, c.kernel_size, stride=c.stride, dilation=c.dilation,
                  is_causal=c.is_causal, additional_keys=ak, additional_values=av,
                  return_lse=True, rpb=rpb)
    g_out, g_lse = grads
    loss = (out * g_out).sum() + (lse * g_lse).sum()
    return [out, lse] + list(torch.autograd.grad(loss, [t for t in leaves if t is not None]))


def cpu_fn(*args, **kwargs):
    return nattn.neighborhood_attention(*args, backend="cpu", **kwargs)


def _grads(c: Case, dtype, gen):
    shape = (c.batch, *c.shape, c.heads)
    return (torch.randn(*shape, c.dim_v, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(*shape, generator=gen, dtype=torch.float64).float() * 0.5)


@pytest.mark.parametrize("index", range(len(SWEEP)))
def test_fp64_against_reference(index):
    c = SWEEP[index]
    gen = torch.Generator().manual_seed(index)
    inputs = make_inputs(c, torch.float64, gen)
    grads = _grads(c, torch.float64, gen)
    want = run(nattn.reference.neighborhood_attention, c, inputs, grads)
    got = run(cpu_fn, c, inputs, grads)
    assert len(got) == len(want)
    for n, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (n, c)
        assert not torch.isnan(g).any(), (n, c)
        err = (g - w).abs().max().item() if g.numel() else 0.0
        assert err <= 1e-10 * max(1.0, w.abs().max().item()), (n, err, c)


def test_sweep_covers_the_issue():
    """The sweep holds every combination the issue names."""
    assert len(SWEEP) >= 80
    ranks = {len(c.shape) for c in SWEEP}
    assert ranks == {1, 2, 3}
    assert any(k % 2 == 0 for c in SWEEP for k in c.kernel_size)
    assert any(k % 2 == 1 and k > 1 for c in SWEEP for k in c.kernel_size)
    assert any(d > 1 for c in SWEEP for d in c.dilation)
    assert any(s > 1 for c in SWEEP for s in c.stride)
    assert any(any(c.is_causal) and not all(c.is_causal) for c in SWEEP)
    assert any(c.heads > c.kv_heads for c in SWEEP)
    assert any(c.additional for c in SWEEP)


# ---------------------------------------------------------------------------------------------
# The oracle itself, against the text of DESIGN.md section 7


def _loop_bias(rpb, shape, kernel_size, stride, dilation, is_causal):
    """[H, N, N] bias by a loop over pairs: 0 outside the neighborhood."""
    n = 1
    for x in shape:
        n *= x
    coords = list(itertools.product(*[range(x) for x in shape]))
    mask = nattn.reference.neighborhood_mask(shape, kernel_size, stride, dilation, is_causal)
    out = torch.zeros(rpb.shape[0], n, n, dtype=rpb.dtype)
    for i, xi in enumerate(coords):
        for j, xj in enumerate(coords):
            if not mask[i, j]:
                continue
            index = []
            for a in range(len(shape)):
                assert (xj[a] - xi[a]) % dilation[a] == 0
                b = (xj[a] - xi[a]) // dilation[a] + kernel_size[a] - 1
                assert 0 <= b <= 2 * kernel_size[a] - 2
                index.append(b)
            out[:, i, j] = rpb[(slice(None), *index)]
    return out


def test_reference_bias_worked_example():
    """DESIGN.md section 7: L = 7, K = 3, d = 1: query 0 uses indices 2, 3, 4 (keys 0, 1, 2);
    queries 1-5 use 1, 2, 3; query 6 uses 0, 1, 2 (keys 4, 5, 6)."""
    rpb = torch.arange(5, dtype=torch.float64)[None] + 10  # rpb[0, b] = 10 + b
    mask = nattn.reference.neighborhood_mask((7,), (3,), (1,), (1,), (False,))
    bias = nattn.reference.relative_bias(rpb, (7,), (3,), (1,), mask)[0]
    assert bias[0, :3].tolist() == [12, 13, 14]
    for i in range(1, 6):
        assert bias[i, i - 1 : i + 2].tolist() == [11, 12, 13]
    assert bias[6, 4:].tolist() == [10, 11, 12]


@pytest.mark.parametrize("shape,kernel_size,stride,dilation,is_causal", [
    ((9,), (4,), (2,), (2,), (False,)),
    ((8,), (3,), (2,), (1,), (True,)),
    ((5, 7), (2, 3), (1, 3), (2, 1), (False, True)),
    ((3, 4, 5), (3, 2, 3), (1, 2, 3), (1, 2, 1), (True, False, False)),
])
def test_reference_bias_matches_loop(shape, kernel_size, stride, dilation, is_causal):
    rpb = torch.randn((2,) + tuple(2 * k - 1 for k in kernel_size), dtype=torch.float64)
    mask = nattn.reference.neighborhood_mask(shape, kernel_size, stride, dilation, is_causal)
    dense = nattn.reference.relative_bias(rpb, shape, kernel_size, dilation, mask)
    assert torch.equal(dense, _loop_bias(rpb, shape, kernel_size, stride, dilation, is_causal))


def test_causal_axis_never_uses_later_offsets():
    """On a causal axis the key never follows the query: indices above K - 1 get no gradient."""
    c = Case(1, (11, 6), 2, 2, 4, 4, (4, 3), (1, 2), (1, 2), (True, False), 0, False)
    gen = torch.Generator().manual_seed(3)
    inputs = make_inputs(c, torch.float64, gen)
    d_rpb = run(cpu_fn, c, inputs, _grads(c, torch.float64, gen))[-1]
    assert torch.all(d_rpb[:, 4:] == 0)
    assert torch.all(d_rpb[:, :4].abs().sum((0, 2)) > 0)


# ---------------------------------------------------------------------------------------------
# Lower precisions: the error-ratio rule of DESIGN.md section 5

FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 1e-6}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("index", [0, 2, 3, 6])
def test_low_precision_error_ratio(dtype, index):
    c = EDGE_CASES[index]
    gen = torch.Generator().manual_seed(100 + index)
    inputs = make_inputs(c, dtype, gen)
    grads = _grads(c, dtype, gen)
    exact = run(nattn.reference.neighborhood_attention, c,
                [None if t is None else t.double() for t in inputs],
                [g.double() for g in grads])
    torch_low = run(nattn.reference.neighborhood_attention, c, inputs, grads)
    kernel = run(cpu_fn, c, inputs, grads)
    for n, (e, t, k) in enumerate(zip(exact, torch_low, kernel)):
        assert not torch.isnan(k).any(), n
        assert k.dtype == t.dtype, n
        ratio = 2.0 if n < 2 else 3.0
        k_err = (k.double() - e).abs().max().item()
        t_err = (t.double() - e).abs().max().item()
        assert k_err <= ratio * t_err + FLOOR[dtype] * max(1.0, e.abs().max().item()), (
            n, k_err, t_err)


# ---------------------------------------------------------------------------------------------
# Determinism, autograd machinery, errors


def test_d_rpb_same_bits_for_any_thread_count():
    """d_rpb is summed in parts fixed by the problem shape, so the bits do not depend on how
    many threads ran (nor do the other gradients); both CPU schedules are exercised."""
    cases = [Case(2, (24, 24), 4, 2, 16, 16, (5, 7), (1, 2), (2, 1), (False, True), 2, False),
             Case(1, (24, 24), 4, 1, 16, 16, (7, 7), (1, 1), (1, 1), (False, False), 0, False)]
    before = torch.get_num_threads()
    try:
        for c in cases:
            gen = torch.Generator().manual_seed(5)
            inputs = make_inputs(c, torch.float32, gen)
            grads = _grads(c, torch.float32, gen)
            results = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                results.append(run(cpu_fn, c, inputs, grads))
            for other in results[1:]:
                for n, (a, b) in enumerate(zip(results[0], other)):
                    assert torch.equal(a, b), (n, c)
    finally:
        torch.set_num_threads(before)


def test_gradcheck():
    c = Case(1, (6, 4), 2, 1, 3, 2, (3, 2), (1, 2), (2, 1), (False, True), 1, False)
    gen = torch.Generator().manual_seed(9)
    q, k, v, ak, av, rpb = [t.requires_grad_() for t in make_inputs(c, torch.float64, gen)]

    def f(q, k, v, ak, av, rpb):
        return nattn.neighborhood_attention(q, k, v, c.kernel_size, stride=c.stride,
                                            dilation=c.dilation, is_causal=c.is_causal,
                                            additional_keys=ak, additional_values=av,
                                            backend="cpu", rpb=rpb)

    # The lse output is fp32 (too coarse for finite differences); its gradient path is covered
    # by the fp64 sweep above.
    assert torch.autograd.gradcheck(f, (q, k, v, ak, av, rpb))


def _op_args(rpb_requires_grad=True):
    gen = torch.Generator().manual_seed(2)
    c = Case(1, (6, 5), 2, 1, 4, 4, (3, 2), (1, 1), (2, 1), (False, True), 0, False)
    q, k, v, _, _, rpb = make_inputs(c, torch.float64, gen)
    for t in (q, k, v):
        t.requires_grad_()
    rpb.requires_grad_(rpb_requires_grad)
    return (q, k, v, None, None, [3, 2], [1, 1], [2, 1], [False, True], 0.5, "cpu"), rpb


def test_opcheck():
    args, rpb = _op_args()
    torch.library.opcheck(torch.ops.nattn.na_forward.default, args, {"rpb": rpb})
    q, k, v = args[:3]
    out, lse = torch.ops.nattn.na_forward(*args, rpb=rpb)
    bwd = (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(), v.detach(),
           None, None, out.detach(), lse.detach()) + args[5:]
    torch.library.opcheck(torch.ops.nattn.na_backward.default, bwd, {"rpb": rpb.detach()})
    torch.library.opcheck(torch.ops.nattn.na_backward.default, bwd)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    args, rpb = _op_args()
    q, k, v = args[:3]

    def f(q, k, v, rpb):
        return nattn.na2d(q, k, v, (3, 2), dilation=(2, 1), is_causal=(False, True), scale=0.5,
                          backend="cpu", rpb=rpb)

    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        compiled = torch.compile(f, fullgraph=True, backend="eager")
        got = compiled(q, k, v, rpb)
        got_grads = torch.autograd.grad(got.sum(), (q, k, v, rpb))
        again = compiled(q, k, v, rpb)
    want = f(q, k, v, rpb)
    want_grads = torch.autograd.grad(want.sum(), (q, k, v, rpb))
    assert torch.equal(got, want) and torch.equal(again, want)
    for a, b in zip(got_grads, want_grads):
        assert torch.equal(a, b)


def test_rpb_without_grad_and_backends_agree():
    """An rpb that does not require grad still adds its bias; the reference backend through the
    op layer returns the same d_rpb as the CPU kernels."""
    c = EDGE_CASES[2]
    gen = torch.Generator().manual_seed(4)
    q, k, v, _, _, rpb = make_inputs(c, torch.float64, gen)
    plain = nattn.na2d(q, k, v, c.kernel_size, c.stride, c.dilation, c.is_causal, backend="cpu")
    biased = nattn.na2d(q, k, v, c.kernel_size, c.stride, c.dilation, c.is_causal,
                        backend="cpu", rpb=rpb)
    assert (plain - biased).abs().max() > 1e-3
    grads = _grads(c, torch.float64, gen)
    ref = run(lambda *a, **kw: nattn.neighborhood_attention(*a, backend="reference", **kw), c,
              [q, k, v, None, None, rpb], grads)
    cpu = run(cpu_fn, c, [q, k, v, None, None, rpb], grads)
    for a, b in zip(ref, cpu):
        assert (a - b).abs().max().item() < 1e-10


def test_errors():
    q = torch.randn(1, 8, 8, 2, 4)
    good = torch.randn(2, 5, 5)
    with pytest.raises(TypeError, match="rpb must be a torch.Tensor"):
        nattn.na2d(q, q, q, 3, rpb=[[0.0]])
    with pytest.raises(ValueError, match=r"rpb.shape=\(2, 5, 3\) must be .*\(2, 5, 5\)"):
        nattn.na2d(q, q, q, 3, rpb=torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"rpb.shape=\(1, 5, 5\)"):  # must be query heads
        nattn.na2d(q, q, q, 3, rpb=torch.randn(1, 5, 5))
    with pytest.raises(ValueError, match=r"rpb.shape=\(2, 25\)"):  # one axis per spatial axis
        nattn.na2d(q, q, q, 3, rpb=torch.randn(2, 25))
    with pytest.raises(ValueError, match="rpb.dtype=torch.float64 must equal query.dtype"):
        nattn.na2d(q, q, q, 3, rpb=good.double())
    with pytest.raises(TypeError, match="rpb.dtype=torch.int64 is not supported"):
        nattn.na2d(q, q, q, 3, rpb=good.long())
    # the rule follows kernel_size per axis, even kernels included
    nattn.na2d(q, q, q, (3, 2), rpb=torch.randn(2, 5, 3))
    before = good.clone()
    nattn.na2d(q, q, q, 3, rpb=good)
    assert torch.equal(good, before)  # inputs are not modified


def test_hopper_forward_declines_rpb():
    """The Hopper forward (csrc/cuda/sm90) does not fuse rpb: its host planner gives the reason,
    so the "hopper" backend runs such calls on the portable CUDA kernels."""
    q = torch.zeros(1, 16, 16, 2, 64, dtype=torch.float16)
    rpb = torch.zeros(2, 13, 13, dtype=torch.float16)
    window = _native.Window((7, 7), (1, 1), (1, 1), (False, False), 0.125)
    p, rank = _native._params(q, q, q, None, None, window)
    assert not any("rpb" in r for r in _native._C.sm90_forward_reasons(p, 90, 0))
    p, rank = _native._params(q, q, q, None, None, window, rpb=rpb)
    assert any("relative positional bias (rpb)" in r
               for r in _native._C.sm90_forward_reasons(p, 90, 0))


def test_empty_batch_gives_zero_d_rpb():
    q = torch.randn(0, 9, 2, 4, dtype=torch.float64, requires_grad=True)
    rpb = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    out = nattn.na1d(q, q, q, 3, backend="cpu", rpb=rpb)
    assert out.shape == (0, 9, 2, 4)
    (d_rpb,) = torch.autograd.grad(out.sum(), rpb)
    assert torch.equal(d_rpb, torch.zeros_like(rpb))
