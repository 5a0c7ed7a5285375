"""Public API: semantics against SDPA where NA equals self-attention, argument errors, the op
layer (opcheck, torch.compile, autograd), backend selection."""

import pytest
import torch
import torch.nn.functional as F

import nattn
from nattn import backends


def qkv(shape, heads=2, kv_heads=None, dim=8, dim_v=None, dtype=torch.float64, grad=False):
    kv_heads = kv_heads or heads
    q = torch.randn(2, *shape, heads, dim, dtype=dtype, requires_grad=grad)
    k = torch.randn(2, *shape, kv_heads, dim, dtype=dtype, requires_grad=grad)
    v = torch.randn(2, *shape, kv_heads, dim_v or dim, dtype=dtype, requires_grad=grad)
    return q, k, v


def sdpa(q, k, v, is_causal=False):
    """Dense attention over flattened tokens, heads-last in and out."""
    b, h = q.shape[0], q.shape[-2]
    rep = h // k.shape[-2]
    flat = lambda t: t.reshape(b, -1, t.shape[-2], t.shape[-1]).transpose(1, 2)
    kf = flat(k).repeat_interleave(rep, dim=1)
    vf = flat(v).repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(flat(q), kf, vf, is_causal=is_causal)
    return o.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])


BACKENDS = ["cpu", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(11,), (5, 6), (3, 4, 5)])
def test_full_window_is_self_attention(shape, backend):
    q, k, v = qkv(shape, heads=4, kv_heads=2, dim_v=6)
    out = nattn.neighborhood_attention(q, k, v, kernel_size=shape, backend=backend)
    torch.testing.assert_close(out, sdpa(q, k, v), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_causal_window_1d_is_causal_self_attention(backend):
    q, k, v = qkv((13,))
    out = nattn.na1d(q, k, v, kernel_size=13, is_causal=True, backend=backend)
    torch.testing.assert_close(out, sdpa(q, k, v, is_causal=True), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_matches_logsumexp_of_scaled_scores(backend):
    q, k, v = qkv((9,), heads=1)
    _, lse = nattn.na1d(q, k, v, kernel_size=9, scale=0.3, return_lse=True, backend=backend)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * 0.3
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).transpose(1, 2).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend):
    q, k, v = qkv((6, 5), heads=2, kv_heads=1, dim=4, dim_v=3, grad=True)
    ak = torch.randn(2, 2, 1, 4, dtype=torch.float64, requires_grad=True)
    av = torch.randn(2, 2, 1, 3, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, ak, av):
        # lse is float32 by contract, too coarse for finite differences: its gradient is
        # checked against autograd in test_lse_gradient_matches_autograd_of_reference.
        return nattn.na2d(q, k, v, (3, 2), stride=(2, 1), dilation=(2, 1),
                          is_causal=(False, True), additional_keys=ak, additional_values=av,
                          backend=backend)

    assert torch.autograd.gradcheck(fn, (q, k, v, ak, av))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_gradient_matches_autograd_of_reference(backend):
    q, k, v = qkv((7, 4), heads=2, kv_heads=1, dim=4, grad=True)
    kw = dict(kernel_size=(3, 3), stride=(1, 2), dilation=(2, 1), is_causal=(True, False))
    weights = torch.randn(2, 7, 4, 2, dtype=torch.float64)
    out, lse = nattn.na2d(q, k, v, **kw, return_lse=True, backend=backend)
    got = torch.autograd.grad(out.sum() + (lse * weights).sum(), (q, k, v))
    out, lse = nattn.reference.neighborhood_attention(q, k, v, **kw, return_lse=True)
    want = torch.autograd.grad(out.sum() + (lse * weights).sum(), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, k, v = qkv((7,), heads=2, kv_heads=1, grad=True)
    args = (q, k, v, None, None, [3], [1], [2], [False], 0.5, backend)
    torch.library.opcheck(torch.ops.nattn.na_forward.default, args)
    ak = torch.randn(2, 3, 1, 8, dtype=torch.float64, requires_grad=True)
    av = torch.randn(2, 3, 1, 8, dtype=torch.float64, requires_grad=True)
    args = (q, k, v, ak, av, [4], [2], [1], [True], 0.5, backend)
    torch.library.opcheck(torch.ops.nattn.na_forward.default, args)


def test_torch_compile_fullgraph_no_recompiles():
    torch._dynamo.reset()
    q, k, v = qkv((8, 8), dtype=torch.float32, grad=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v):
        return nattn.na2d(q, k, v, kernel_size=3, dilation=2).sum()

    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for _ in range(3):
            q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
            f(q2, k2, v2).backward()
    eager = nattn.na2d(q, k, v, kernel_size=3, dilation=2).sum()
    eager.backward()
    torch.testing.assert_close(q2.grad, q.grad)
    torch.testing.assert_close(f(q, k, v), eager)


def test_inputs_are_not_modified():
    q, k, v = qkv((6, 6), grad=True)
    copies = [t.detach().clone() for t in (q, k, v)]
    out = nattn.na2d(q, k, v, 3)
    out.square().sum().backward()
    for t, c in zip((q, k, v), copies):
        assert torch.equal(t.detach(), c)


def test_empty_batch_gives_empty_result():
    q = torch.randn(0, 5, 2, 4)
    out, lse = nattn.na1d(q, q, q, 3, return_lse=True)
    assert out.shape == (0, 5, 2, 4) and lse.shape == (0, 5, 2)


def test_non_contiguous_inputs_match_contiguous():
    base = torch.randn(2, 3, 7, 6, 8, dtype=torch.float64)  # heads-first storage
    q = base.permute(0, 2, 3, 1, 4)  # [B, X, Y, H, D] view
    ref = nattn.na2d(q.contiguous(), q.contiguous(), q.contiguous(), 3, backend="reference")
    for backend in BACKENDS:
        torch.testing.assert_close(nattn.na2d(q, q, q, 3, backend=backend), ref)


def test_backend_registry():
    assert backends.names(benchmarked_only=True)[-1] == "reference"
    assert backends.names()[-1] == "cuda-emu"  # verification only, never picked by "auto"
    q, k, v = qkv((5,))
    with pytest.raises(ValueError, match="backend='nope' is unknown"):
        nattn.na1d(q, k, v, 3, backend="nope")
    problem = backends.Problem(1, (5,), 1, 1, 8, 8, (3,), (1,), (1,), (False,), 0,
                               torch.float32, torch.device("cuda"), False)
    with pytest.raises(ValueError, match="backend='cpu' cannot run.*CPU tensors only"):
        backends.resolve("cpu", problem)
    assert backends.choose(problem).name != "cpu"
    cpu_problem = backends.Problem(1, (5,), 1, 1, 8, 8, (3,), (1,), (1,), (False,), 0,
                                   torch.float32, torch.device("cpu"), False)
    assert backends.choose(cpu_problem).name == "cpu"


# One test per bad input: (kwargs changes, exception, message pattern).
def _bad_cases():
    q, k, v = qkv((6, 6), dtype=torch.float32)
    ak = torch.randn(2, 3, 2, 8)
    return [
        ("rank", dict(query=q[0, 0], key=k[0, 0], value=v[0, 0]), ValueError, "must have 4 to 6 dims"),
        ("rank_na1d", dict(fn=nattn.na1d), ValueError, "must have 4 dims.*na1d"),
        ("key_dims", dict(key=k[:, 0]), ValueError, r"key.shape=.*as many dims"),
        ("spatial", dict(value=v[:, :5]), ValueError, r"value.shape=.*match query.shape"),
        ("batch", dict(key=k[:1]), ValueError, "batch and spatial"),
        ("heads_divisible", dict(key=torch.randn(2, 6, 6, 3, 8), value=torch.randn(2, 6, 6, 3, 8)),
         ValueError, r"query heads \(2\) must be a multiple of key/value heads \(3\)"),
        ("head_dim", dict(key=torch.randn(2, 6, 6, 2, 4)), ValueError, "head_dim 4 must equal"),
        ("value_heads", dict(value=torch.randn(2, 6, 6, 1, 8)), ValueError, "heads must equal"),
        ("dtype_mismatch", dict(key=k.double()), ValueError, r"key.dtype=torch.float64 must"),
        ("device_mismatch", dict(key=k.to("meta")), ValueError, "key.device=meta"),
        ("unsupported_dtype", dict(query=q.int(), key=k.int(), value=v.int()), TypeError,
         "query.dtype=torch.int32 is not supported"),
        ("not_tensor", dict(query=[1.0]), TypeError, "query must be a torch.Tensor"),
        ("window_too_big", dict(kernel_size=4, dilation=2), ValueError,
         r"kernel_size \* dilation = 8 on axis 0 must be <= its length 6"),
        ("stride_gt_kernel", dict(stride=(1, 4)), ValueError,
         "stride=.*4 on axis 1 must be <= kernel_size 3"),
        ("non_positive", dict(kernel_size=(0, 3)), ValueError, "kernel_size=.*must be >= 1"),
        ("negative_dilation", dict(dilation=-1), ValueError, "dilation=.*must be >= 1"),
        ("wrong_length", dict(kernel_size=(3, 3, 3)), ValueError,
         "kernel_size=.*has 3 entries.*2 spatial axes"),
        ("float_kernel", dict(kernel_size=3.0), TypeError, "kernel_size=3.0 must be an int"),
        ("bool_kernel", dict(kernel_size=True), TypeError, "kernel_size=True must be an int"),
        ("non_bool_causal", dict(is_causal=1), TypeError, "is_causal=1 must be a bool"),
        ("non_bool_causal_tuple", dict(is_causal=(True, 0)), TypeError, "bools only"),
        ("scale_type", dict(scale="big"), TypeError, "scale='big' must be a real number"),
        ("scale_nan", dict(scale=float("nan")), ValueError, "scale=nan must be finite"),
        ("keys_without_values", dict(additional_keys=ak), ValueError,
         "additional_keys was given without additional_values"),
        ("values_without_keys", dict(additional_values=ak), ValueError,
         "additional_values was given without additional_keys"),
        ("additional_shape", dict(additional_keys=ak, additional_values=ak[:, :, :1]),
         ValueError, r"additional_values.shape=\(2, 3, 1, 8\) must be"),
        ("additional_count", dict(additional_keys=ak, additional_values=ak[:, :2]), ValueError,
         "same number of tokens M"),
        ("zero_heads", dict(query=q[..., :0, :], key=k[..., :0, :], value=v[..., :0, :]),
         ValueError, "heads and head dims must be >= 1"),
        ("zero_length", dict(query=q[:, :0], key=k[:, :0], value=v[:, :0]), ValueError,
         "spatial axis 0 is empty"),
        ("return_lse", dict(return_lse=1), TypeError, "return_lse=1 must be a bool"),
        ("backend_type", dict(backend=3), TypeError, "backend=3 must be a str"),
    ], (q, k, v)


_CASES, _QKV = _bad_cases()


@pytest.mark.parametrize("name,change,exc,pattern", _CASES, ids=[c[0] for c in _CASES])
def test_bad_input_raises_clear_error(name, change, exc, pattern):
    q, k, v = _QKV
    kwargs = dict(query=q, key=k, value=v, kernel_size=3)
    change = dict(change)
    fn = change.pop("fn", nattn.neighborhood_attention)
    kwargs.update(change)
    with pytest.raises(exc, match=pattern):
        fn(**kwargs)


def test_double_backward_is_a_clear_error():
    """Second-order gradients are not supported: NotImplementedError naming nattn, raised when
    the first-order graph is differentiated (create_graph=True itself works)."""
    q = torch.randn(1, 6, 7, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 6, 7, 2, 8, dtype=torch.float64, requires_grad=True)
    out = nattn.na2d(q, k, k, kernel_size=3)
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="nattn: double backward"):
        dq.sum().backward()
