"""The CUDA backend (csrc/cuda): SM80 tensor-core kernels and the SIMT fallback.

Two kinds of tests:
- dispatch and tile planning (host code of the CUDA build, no device needed): which kernels a
  call goes to and why, and the backward's inverse tile ranges against brute force. They need a
  nattn._C built with the CUDA part and are skipped otherwise.
- kernel tests, run twice: on a GPU (``gpu`` ids, skipped without a device) and on CPU tensors
  under the functional emulator (``emu`` ids, backend cuda-emu, skipped without a NATTN_EMU=1
  build; docs/emulator.md). Forward, lse and every gradient against nattn.reference with the
  error-ratio rule of DESIGN.md section 5 on a seeded sweep of over 100 configurations across
  ranks, windows, GQA, additional tokens and dtypes; inputs carved out of NaN-filled storage (an
  out-of-bounds read shows as NaN); outputs poisoned before every call; a bit-identical backward
  over repeated runs; the device build of window.h against the host. Under the emulator every
  call also runs a second time in a seeded random order of CTAs and fibers, with the grid capped
  so that the grid-stride loops iterate, and must give the same bits (the race check).
"""

import random
from dataclasses import dataclass
from typing import Tuple

import pytest
import torch

import nattn
from conftest import run_attention as run
from nattn import _native, emu

_C = _native._C
with_cuda_build = pytest.mark.skipif(
    _C is None or not getattr(_C, "with_cuda", False), reason="nattn._C built without CUDA"
)
gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or _C is None or not getattr(_C, "with_cuda", False),
    reason="needs a CUDA device and a CUDA build of nattn._C",
)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_native, "poison_outputs", True)


# ---------------------------------------------------------------------------------------------
# Dispatch (host only)

A100 = dict(capability=80, max_smem=163 * 1024)
RTX3090 = dict(capability=86, max_smem=99 * 1024)


def _plan(shape=(16, 16), heads=2, kv_heads=2, dim=64, dim_v=None, dtype=torch.float16,
          kernel_size=None, backward=False, device=A100, additional=0, view=None):
    """cuda_plan for a problem whose tensors live on the CPU (only pointers and strides are
    read). `view` turns the contiguous query into another layout."""
    dim_v = dim if dim_v is None else dim_v
    rank = len(shape)
    q = torch.randn(1, *shape, heads, dim, dtype=dtype)
    if view is not None:
        q = view(q)
    k = torch.randn(1, *shape, kv_heads, dim, dtype=dtype)
    v = torch.randn(1, *shape, kv_heads, dim_v, dtype=dtype)
    ak = av = None
    if additional:
        ak = torch.randn(1, additional, kv_heads, dim, dtype=dtype)
        av = torch.randn(1, additional, kv_heads, dim_v, dtype=dtype)
    ks = kernel_size or tuple(min(7, n) for n in shape)
    window = _native.Window(ks, (1,) * rank, (1,) * rank, (False,) * rank, dim ** -0.5)
    p, _ = _native._params(q, k, v, ak, av, window)
    if backward:
        p.set_tensor("d_out", q.data_ptr(), _native._token_strides(q, rank))
    return _C.cuda_plan(p, backward, **device)


@with_cuda_build
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [32, 64, 128, 256])
def test_tensor_core_table(dtype, dim):
    fwd = _plan(dim=dim, dtype=dtype)
    assert fwd["path"] == "tensor_core" and fwd["reasons"] == []
    bwd = _plan(dim=dim, dtype=dtype, backward=True)
    if dim == 256:
        assert bwd["path"] == "simt"
        assert any("head_dim 256" in r for r in bwd["reasons"])
    else:
        assert bwd["path"] == "tensor_core"


@with_cuda_build
def test_fallback_reasons():
    def reasons(**kw):
        plan = _plan(**kw)
        assert plan["path"] == "simt"
        return " | ".join(plan["reasons"])

    assert "dtype float32" in reasons(dtype=torch.float32)
    assert "dtype float64" in reasons(dtype=torch.float64)
    assert "value_dim 32 != head_dim 64" in reasons(dim_v=32)
    assert "head_dim 48" in reasons(dim=48)
    assert "compute capability 7.5" in reasons(device=dict(capability=75, max_smem=64 * 1024))
    # head_dim 256 needs 96 KiB; a device allowing 64 KiB cannot take it.
    assert "shared memory" in reasons(dim=256, device=dict(capability=80, max_smem=64 * 1024))
    # A heads-first tensor seen through a transpose of the last two dims: last dim not contiguous.
    last_dim_strided = lambda q: q.transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa: E731
    assert "last dim has stride" in reasons(view=last_dim_strided)
    # Rows 2 elements (4 bytes) apart: not 16-byte aligned.
    misaligned = lambda q: torch.cat([q, q[..., :2]], -1)[..., :64]  # noqa: E731
    assert "16 bytes" in reasons(view=misaligned)
    # The same slicing with 8 extra elements keeps rows 16-byte aligned: tensor cores.
    padded = lambda q: torch.cat([q, q[..., :8]], -1)[..., :64]  # noqa: E731
    assert _plan(view=padded)["path"] == "tensor_core"


@with_cuda_build
def test_head_dim_256_fits_sm86():
    assert _plan(dim=256, device=RTX3090)["path"] == "tensor_core"
    assert _plan(dim=128, backward=True, device=RTX3090)["path"] == "tensor_core"


@with_cuda_build
@pytest.mark.parametrize(
    "shape,kernel_size",
    [((56, 56), (7, 7)), ((4096,), (129,)), ((8, 30, 40), (3, 9, 9)), ((3, 5), (3, 5)),
     ((1000,), (1000,)), ((2, 2, 2), (1, 1, 1))],
)
def test_box_tiles(shape, kernel_size):
    for backward in (False, True):
        plan = _plan(shape=shape, kernel_size=kernel_size, backward=backward)
        q_box, kv_box = plan["q_box"], plan["kv_box"]
        prod = lambda xs: xs[0] * xs[1] * xs[2]  # noqa: E731
        assert prod(q_box) == plan["block_m"] and prod(kv_box) == plan["block_n"]
        assert all(x & (x - 1) == 0 for x in q_box + kv_box)  # powers of two
        assert plan["q_tiles"] >= 1 and plan["kv_tiles"] >= 1
    # The example: 8 x 8 query tiles for a 7 x 7 window on a 56 x 56 layout.
    if shape == (56, 56):
        assert _plan(shape=shape, kernel_size=kernel_size)["q_box"] == [1, 8, 8]


# ---------------------------------------------------------------------------------------------
# Kernels: correctness sweeps, on a GPU and under the emulator

emulated = pytest.mark.skipif(_native._emu is None, reason=str(_native.EMU_IMPORT_ERROR))
TARGETS = [pytest.param("cuda", marks=gpu, id="gpu"),
           pytest.param("cuda-emu", marks=emulated, id="emu")]


def _device(target):
    return "cuda" if target == "cuda" else "cpu"


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
    dtype: torch.dtype
    pad: int  # extra NaN elements per row of the storage the inputs are carved from


def _axis(rng, length):
    d = rng.randint(1, max(1, length // 3)) if rng.random() < 0.3 else 1
    k = rng.randint(1, length // d)
    s = rng.randint(1, k) if rng.random() < 0.4 else 1
    return k, s, d


def random_case(rng: random.Random) -> Case:
    rank = rng.choice([1, 2, 2, 3])
    max_len = {1: 300, 2: 24, 3: 9}[rank]
    shape = tuple(rng.randint(1, max_len) for _ in range(rank))
    axes = [_axis(rng, n) for n in shape]
    kv_heads = rng.choice([1, 2])
    dtype = rng.choice([torch.float16, torch.bfloat16, torch.float16, torch.bfloat16,
                        torch.float32])
    dim = rng.choice([32, 64, 64, 128]) if rng.random() < 0.85 else rng.choice([16, 40, 256])
    dim_v = dim if rng.random() < 0.85 else rng.choice([16, 32])
    return Case(
        batch=rng.choice([1, 2]),
        shape=shape,
        heads=kv_heads * rng.choice([1, 2]),
        kv_heads=kv_heads,
        dim=dim,
        dim_v=dim_v,
        kernel_size=tuple(a[0] for a in axes),
        stride=tuple(a[1] for a in axes),
        dilation=tuple(a[2] for a in axes),
        is_causal=tuple(rng.random() < 0.3 for _ in range(rank)),
        additional=rng.choice([0, 0, 0, 1, 5, 70]),
        dtype=dtype,
        pad=rng.choice([0, 8, 3]),
    )


EDGE_CASES = [
    # 56 x 56 NAT stage (8 x 8 tiles, full and masked stages)
    Case(1, (56, 56), 2, 2, 32, 32, (7, 7), (1, 1), (1, 1), (False, False), 0, torch.float16, 0),
    # DiNAT dilation 8 on 56 x 56
    Case(1, (56, 56), 2, 2, 32, 32, (7, 7), (1, 1), (8, 8), (False, False), 0, torch.bfloat16, 8),
    # blocked, strided, causal 3-D
    Case(1, (6, 16, 16), 2, 1, 64, 64, (3, 8, 8), (1, 8, 4), (1, 1, 1), (True, False, False), 0,
         torch.float16, 0),
    # 1-D sliding-window causal with GQA and additional tokens
    Case(2, (777,), 4, 1, 128, 128, (129,), (1,), (1,), (True,), 3, torch.bfloat16, 8),
    # self-attention (K = L) and head_dim 256 (forward tensor cores, backward fallback)
    Case(1, (200,), 2, 2, 256, 256, (200,), (1,), (1,), (False,), 0, torch.float16, 0),
    # value_dim != head_dim (fallback) and 1-token axes
    Case(1, (1, 9), 2, 2, 64, 32, (1, 5), (1, 2), (1, 1), (False, True), 2, torch.float16, 0),
    # float64 on the fallback
    Case(1, (10, 11), 2, 2, 16, 8, (3, 4), (1, 2), (2, 1), (False, False), 1, torch.float64, 0),
]


def carve(shape, dtype, pad, gen, device):
    """A tensor of `shape` with fresh random values, viewed out of NaN-filled storage that is
    `pad` elements wider in the last dim, so that any read past a row shows up as NaN."""
    storage = torch.full((*shape[:-1], shape[-1] + pad), float("nan"), dtype=dtype, device=device)
    view = storage[..., : shape[-1]]
    view.copy_(torch.randn(shape, generator=gen, dtype=torch.float32, device=device).to(dtype))
    return view


def make_inputs(c: Case, gen, device):
    q = carve((c.batch, *c.shape, c.heads, c.dim), c.dtype, c.pad, gen, device)
    k = carve((c.batch, *c.shape, c.kv_heads, c.dim), c.dtype, c.pad, gen, device)
    v = carve((c.batch, *c.shape, c.kv_heads, c.dim_v), c.dtype, c.pad, gen, device)
    ak = av = None
    if c.additional:
        ak = carve((c.batch, c.additional, c.kv_heads, c.dim), c.dtype, c.pad, gen, device)
        av = carve((c.batch, c.additional, c.kv_heads, c.dim_v), c.dtype, c.pad, gen, device)
    return [q, k, v, ak, av]


def kernel_fn(target):
    def fn(*args, **kwargs):
        return nattn.neighborhood_attention(*args, backend=target, **kwargs)
    return fn


def run_kernels(target, c, inputs, grads, seed=0):
    """[out, lse, *grads] from the kernels of `target`. Under the emulator: run in index order,
    then again in a random order of CTAs and fibers (seeded) with the grid capped at 3 CTAs, and
    require the same bits: a result that depends on the schedule is a race."""
    if target != "cuda-emu":
        return run(kernel_fn(target), c, inputs, grads)
    emu.configure(order="forward")
    first = run(kernel_fn(target), c, inputs, grads)
    emu.configure(order="random", seed=seed, grid_cap=3)
    try:
        second = run(kernel_fn(target), c, inputs, grads)
    finally:
        emu.configure(order="forward")
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), (
            f"{name}: the emulated kernels give different bits in another order of CTAs and "
            f"fibers (a race: shared memory read before the barrier or wait that orders it) {c}")
    return first


NAMES = ["out", "lse", "dq", "dk", "dv", "d_add_k", "d_add_v"]
FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float32: 2e-5, torch.float64: 1e-10}


def check_case(c: Case, seed: int, target: str):
    device = _device(target)
    gen = torch.Generator(device=device).manual_seed(seed)
    low = make_inputs(c, gen, device)
    shape = (c.batch, *c.shape, c.heads)
    g_out = torch.randn(*shape, c.dim_v, generator=gen, device=device).to(c.dtype)
    g_lse = torch.randn(*shape, generator=gen, device=device) * 0.5
    # The exact reference: fp64 on the CPU, fp32 on a GPU (DESIGN.md section 5).
    exact_dtype = torch.float64 if c.dtype == torch.float64 or device == "cpu" else torch.float32
    exact_in = [None if t is None else t.to(exact_dtype) for t in low]
    exact = run(nattn.reference.neighborhood_attention, c, exact_in,
                (g_out.to(exact_dtype), g_lse.to(exact_dtype)))
    torch_low = run(nattn.reference.neighborhood_attention, c, low, (g_out, g_lse))
    kernel = run_kernels(target, c, low, (g_out, g_lse), seed)
    for n, (e, t, k) in enumerate(zip(exact, torch_low, kernel)):
        name = NAMES[n]
        assert not torch.isnan(k).any(), (name, c)
        assert k.shape == e.shape and k.dtype == t.dtype, (name, c)
        ratio = 2.0 if n < 2 else 3.0
        k_err = (k.to(exact_dtype) - e).abs().max().item()
        t_err = (t.to(exact_dtype) - e).abs().max().item()
        scale = max(1.0, e.abs().max().item())
        assert k_err <= ratio * t_err + FLOOR[c.dtype] * scale, (name, k_err, t_err, c)


def _sweep():
    rng = random.Random(20260507)
    return EDGE_CASES + [random_case(rng) for _ in range(110)]


SWEEP = _sweep()


def test_sweep_size():
    assert len(SWEEP) >= 100


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("index", range(len(SWEEP)))
def test_sweep_against_reference(target, index):
    check_case(SWEEP[index], seed=index, target=target)


def _kernel_params(c: Case, target):
    device = _device(target)
    q = torch.empty(c.batch, *c.shape, c.heads, c.dim, dtype=c.dtype, device=device)
    k = torch.empty(c.batch, *c.shape, c.kv_heads, c.dim, dtype=c.dtype, device=device)
    v = torch.empty(c.batch, *c.shape, c.kv_heads, c.dim_v, dtype=c.dtype, device=device)
    window = _native.Window(c.kernel_size, c.stride, c.dilation, c.is_causal, 0.1)
    return _native._params(q, k, v, None, None, window, _native._library(target))[0]


@pytest.mark.parametrize("target", TARGETS)
def test_tensor_core_path_is_taken(target):
    """The sweep is only meaningful if the fast path actually runs: check the plan on this
    (or the emulated) device for the edge cases meant for tensor cores."""
    for c in EDGE_CASES[:4]:
        lib = _native._library(target)
        assert lib.cuda_plan(_kernel_params(c, target), False)["path"] == "tensor_core", c


@pytest.mark.parametrize("target", TARGETS)
def test_backward_bit_identical_over_repeated_runs(target):
    c = Case(2, (20, 20), 4, 2, 64, 64, (7, 5), (1, 2), (2, 1), (False, True), 3,
             torch.float16, 0)
    device = _device(target)
    gen = torch.Generator(device=device).manual_seed(0)
    inputs = make_inputs(c, gen, device)
    shape = (c.batch, *c.shape, c.heads)
    grads = (torch.randn(*shape, c.dim_v, generator=gen, device=device).half(),
             torch.randn(*shape, generator=gen, device=device))
    first = run_kernels(target, c, inputs, grads)
    for i in range(20 if target == "cuda" else 2):
        again = run_kernels(target, c, inputs, grads, seed=i + 1)
        for name, a, b in zip(NAMES, first, again):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("target", TARGETS)
def test_many_batch_heads(target):
    """batch x heads x tiles beyond a 65535 grid dimension on a GPU (the grid is 1-D and CTAs
    loop); under the emulator, as many work items as the CPU carries, over a capped grid."""
    batch = 4096 if target == "cuda" else 96
    c = Case(batch, (16,), 24, 24, 32, 32, (5,), (1,), (1,), (False,), 0, torch.float16, 0)
    device = _device(target)
    gen = torch.Generator(device=device).manual_seed(1)
    q, k, v, _, _ = make_inputs(c, gen, device)
    if target == "cuda-emu":
        emu.configure(grid_cap=1000)
    try:
        out = kernel_fn(target)(q, k, v, c.kernel_size)
    finally:
        if target == "cuda-emu":
            emu.configure()
    want = nattn.reference.neighborhood_attention(q.float(), k.float(), v.float(), c.kernel_size)
    assert (out.float() - want).abs().max().item() < 1e-2


@pytest.mark.parametrize("target", TARGETS)
def test_device_window_math_matches_host(target):
    lib = _native._library(target)
    rng = random.Random(11)
    for _ in range(300):
        length = rng.randint(1, 80)
        d = rng.randint(1, max(1, length // 2)) if rng.random() < 0.4 else 1
        k = rng.randint(1, length // d)
        s = rng.randint(1, k)
        causal = rng.random() < 0.4
        host = [x for row in _C.axis_windows(length, k, s, d, causal) for x in row]
        assert lib.cuda_axis_windows(length, k, s, d, causal) == host


# ---------------------------------------------------------------------------------------------
# Relative positional bias (rpb, DESIGN.md section 7): tensor-core and SIMT paths, d_rpb from the
# deterministic d_rpb kernel; the same error-ratio rule and race check as the sweep.

RPB_CASES = [
    # tensor cores: NAT-like 2-D window (full and masked tiles)
    Case(1, (16, 16), 2, 2, 32, 32, (7, 7), (1, 1), (1, 1), (False, False), 0, torch.float16, 0),
    # tensor cores: GQA, additional tokens (no bias), even kernel, stride, dilation, causal axis
    Case(1, (20, 18), 2, 1, 64, 64, (4, 5), (2, 1), (2, 3), (True, False), 3, torch.bfloat16, 8),
    # tensor cores: 3-D with K = 1 and an even kernel
    Case(1, (5, 6, 7), 2, 2, 32, 32, (1, 2, 3), (1, 2, 1), (1, 1, 2), (False, True, False), 0,
         torch.float16, 0),
    # tensor cores: 1-D GNA stride, head_dim 128
    Case(1, (64,), 2, 2, 128, 128, (17,), (4,), (1,), (False,), 0, torch.bfloat16, 0),
    # tensor cores: batch 2, two query heads per kv head, additional tokens
    Case(2, (12, 10), 4, 2, 64, 64, (5, 4), (1, 2), (2, 1), (False, True), 5, torch.float16, 3),
    # SIMT: fp32 1-D causal sliding window, value_dim != head_dim
    Case(2, (37,), 2, 1, 16, 8, (9,), (1,), (1,), (True,), 2, torch.float32, 3),
    # SIMT: fp64
    Case(1, (9, 10), 2, 2, 16, 16, (4, 3), (2, 1), (2, 1), (False, True), 1, torch.float64, 0),
]
RPB_NAMES = NAMES[:5] + ["d_rpb"]


def _run_rpb(fn, c, inputs, rpb, grads):
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs + [rpb]]
    q, k, v, ak, av, r = leaves
    out, lse = fn(q, k, v, c.kernel_size, stride=c.stride, dilation=c.dilation,
                  is_causal=c.is_causal, additional_keys=ak, additional_values=av,
                  return_lse=True, rpb=r)
    loss = (out * grads[0]).sum() + (lse * grads[1]).sum()
    return [out, lse] + list(torch.autograd.grad(loss, [q, k, v, r]))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("index", range(len(RPB_CASES)))
def test_rpb_against_reference(target, index):
    c = RPB_CASES[index]
    device = _device(target)
    gen = torch.Generator(device=device).manual_seed(1000 + index)
    low = make_inputs(c, gen, device)
    rpb_shape = (c.heads,) + tuple(2 * k - 1 for k in c.kernel_size)
    rpb = torch.randn(rpb_shape, generator=gen, device=device).to(c.dtype)
    shape = (c.batch, *c.shape, c.heads)
    g_out = torch.randn(*shape, c.dim_v, generator=gen, device=device).to(c.dtype)
    g_lse = torch.randn(*shape, generator=gen, device=device) * 0.5
    exact_dtype = torch.float64 if c.dtype == torch.float64 or device == "cpu" else torch.float32
    exact = _run_rpb(nattn.reference.neighborhood_attention, c,
                     [None if t is None else t.to(exact_dtype) for t in low],
                     rpb.to(exact_dtype), (g_out.to(exact_dtype), g_lse.to(exact_dtype)))
    torch_low = _run_rpb(nattn.reference.neighborhood_attention, c, low, rpb, (g_out, g_lse))
    if target == "cuda-emu":
        emu.configure(order="forward")
    kernel = _run_rpb(kernel_fn(target), c, low, rpb, (g_out, g_lse))
    if target == "cuda-emu":
        emu.configure(order="random", seed=index, grid_cap=3)
        try:
            again = _run_rpb(kernel_fn(target), c, low, rpb, (g_out, g_lse))
        finally:
            emu.configure(order="forward")
        for name, a, b in zip(RPB_NAMES, kernel, again):
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), (name, "race", c)
    for n, (e, t, k) in enumerate(zip(exact, torch_low, kernel)):
        name = RPB_NAMES[n]
        assert not torch.isnan(k).any(), (name, c)
        assert k.shape == e.shape and k.dtype == t.dtype, (name, c)
        ratio = 2.0 if n < 2 else 3.0
        k_err = (k.to(exact_dtype) - e).abs().max().item()
        t_err = (t.to(exact_dtype) - e).abs().max().item()
        scale = max(1.0, e.abs().max().item())
        assert k_err <= ratio * t_err + FLOOR[c.dtype] * scale, (name, k_err, t_err, c)


@pytest.mark.parametrize("target", TARGETS)
def test_rpb_takes_the_tensor_core_path(target):
    """The tensor-core cases above really run on tensor cores (rpb does not send them to SIMT)."""
    lib = _native._library(target)
    for c in RPB_CASES[:3]:
        p = _kernel_params(c, target)
        rpb = torch.zeros((c.heads,) + tuple(2 * k - 1 for k in c.kernel_size), dtype=c.dtype)
        p.set_tensor("rpb", rpb.data_ptr(), _native._rpb_strides(rpb, len(c.shape)))
        assert lib.cuda_plan(p, False)["path"] == "tensor_core", c
        d_out = torch.empty(c.batch, *c.shape, c.heads, c.dim_v, dtype=c.dtype)
        p.set_tensor("d_out", d_out.data_ptr(), _native._token_strides(d_out, len(c.shape)))
        assert lib.cuda_plan(p, True)["path"] == "tensor_core", c


# ---------------------------------------------------------------------------------------------
# Hopper (sm_90a) forward under the emulator (NATTN_EMU_ARCH=90: cuda-emu dispatches as an
# H100 would, to the wgmma + TMA forward where it applies). The configurations are the sweep's
# own that the Hopper kernel takes (fp16/bf16, head_dim = value_dim in {64, 128}, no additional
# tokens, 16-byte-aligned rows), with the same error rule and the same two-schedule race check;
# the rest of the sweep declines to the SM80 kernels, which the emu sweep above already covers.
# The Hopper backward (dQ and dK/dV kernels) takes the same configurations: its part below runs
# forward and backward with the gradients' 3x error-ratio rule.

def hopper_eligible(c: Case) -> bool:
    return (c.dtype in (torch.float16, torch.bfloat16) and c.dim == c.dim_v
            and c.dim in (64, 128) and c.additional == 0 and c.pad in (0, 8))


HOPPER_EDGE_CASES = [
    # 2-D ragged dilation (d does not divide L) on both axes, head_dim 128
    Case(1, (23, 19), 2, 1, 128, 128, (5, 5), (1, 2), (2, 3), (False, True), 0,
         torch.bfloat16, 8),
    # blocked 3-D GNA (stride = kernel): every tile pair full
    Case(1, (8, 16, 16), 2, 2, 64, 64, (4, 8, 8), (4, 8, 8), (1, 1, 1), (False, False, False), 0,
         torch.float16, 0),
    # self-attention (K = L), one query tile with a single KV tile and causal masking
    Case(2, (100,), 2, 2, 128, 128, (100,), (1,), (1,), (True,), 0, torch.float16, 0),
    # 1-D longer than the tiles, GQA 4:1, causal
    Case(1, (777,), 4, 1, 64, 64, (129,), (1,), (1,), (True,), 0, torch.bfloat16, 0),
]
HOPPER_SWEEP = HOPPER_EDGE_CASES + [c for c in SWEEP if hopper_eligible(c)][:14]


def hopper_backward_eligible(c: Case) -> bool:
    return (c.dtype in (torch.float16, torch.bfloat16) and c.dim == c.dim_v
            and c.dim in (32, 64, 128) and c.pad in (0, 8))


# The backward also takes head_dim 32 and additional tokens (the forward of those runs on the
# SM80 kernels): the Hopper configurations, two head_dim 32 edge cases, the sweep's head_dim 32
# ones it takes (the 56 x 56 NAT and DiNAT stages of EDGE_CASES among them) and the sweep's ones
# with additional tokens (1-D sliding-window causal GQA 4:1 of EDGE_CASES first).
HOPPER_BACKWARD_SWEEP = HOPPER_SWEEP + [
    # 3-D: ragged dilation on two axes, a causal axis, blocked stride on the last, GQA 2:1
    Case(1, (6, 10, 12), 2, 1, 32, 32, (3, 5, 5), (1, 2, 5), (2, 1, 2), (True, False, False), 0,
         torch.bfloat16, 0),
    # 1-D strided causal over several tiles, GQA 4:1, two batches
    Case(2, (300,), 4, 1, 32, 32, (65,), (4,), (1,), (True,), 0, torch.float16, 8),
] + [c for c in SWEEP if hopper_backward_eligible(c) and c.dim == 32 and not c.additional][:6] + [
    c for c in SWEEP if hopper_backward_eligible(c) and c.additional][:6]


def _hopper_launches():
    return [r for r in emu.launches() if "sm90::forward_kernel" in r["kernel"]]


def _hopper_backward_launches():
    return [r for r in emu.launches() if "sm90::backward_kernel" in r["kernel"]]


def check_forward(c: Case, seed: int, target: str, expect_hopper: bool):
    """Forward (out, lse) of `c` under the emulator in two schedules, against the fp64
    reference with the error-ratio rule; the Hopper kernel must (or must not) have run."""
    gen = torch.Generator().manual_seed(seed)
    low = make_inputs(c, gen, "cpu")
    exact = [t if t is None else t.to(torch.float64) for t in low]

    def forward(fn, inputs):
        q, k, v, ak, av = inputs
        return fn(q, k, v, c.kernel_size, stride=c.stride, dilation=c.dilation,
                  is_causal=c.is_causal, additional_keys=ak, additional_values=av,
                  return_lse=True)

    with torch.no_grad():
        e = forward(nattn.reference.neighborhood_attention, exact)
        t = forward(nattn.reference.neighborhood_attention, low)
        emu.clear_launches()
        emu.configure(order="forward")
        first = forward(kernel_fn(target), low)
        ran = bool(_hopper_launches())
        emu.configure(order="random", seed=seed, grid_cap=3)
        second = forward(kernel_fn(target), low)
        emu.configure(order="forward")
    assert ran == expect_hopper, (c, [r["kernel"] for r in emu.launches()])
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), (name, "schedule-dependent", c)
    for n, (ek, tk, kk) in enumerate(zip(e, t, first)):
        assert not torch.isnan(kk).any(), (NAMES[n], c)
        k_err = (kk.double() - ek).abs().max().item()
        t_err = (tk.double() - ek).abs().max().item()
        scale = max(1.0, ek.abs().max().item())
        assert k_err <= 2.0 * t_err + FLOOR[c.dtype] * scale, (NAMES[n], k_err, t_err, c)


@pytest.fixture
def hopper_emu(monkeypatch):
    if _native._emu is None:
        pytest.skip(str(_native.EMU_IMPORT_ERROR))
    monkeypatch.setenv("NATTN_EMU_ARCH", "90")
    emu.configure()
    yield
    monkeypatch.delenv("NATTN_EMU_ARCH")
    emu.configure()


def test_hopper_sweep_size():
    assert len(HOPPER_SWEEP) >= 16
    assert {c.dim for c in HOPPER_SWEEP} == {64, 128}
    assert {c.dtype for c in HOPPER_SWEEP} == {torch.float16, torch.bfloat16}
    assert {len(c.shape) for c in HOPPER_SWEEP} == {1, 2, 3}


@pytest.mark.parametrize("index", range(len(HOPPER_SWEEP)))
def test_hopper_forward_sweep_emulated(hopper_emu, index):
    check_forward(HOPPER_SWEEP[index], seed=index, target="cuda-emu", expect_hopper=True)


def test_hopper_forward_heads_first_views(hopper_emu):
    """Q, K, V as heads-first views ([B, H, *S, D] storage seen as [B, *S, H, D]): TMA reads
    them where they lie (the batch and head strides fold into the offset dim), no copy."""
    gen = torch.Generator().manual_seed(11)

    def heads_first(heads):
        t = torch.randn(2, heads, 9, 14, 64, generator=gen).to(torch.bfloat16)
        return t.permute(0, 2, 3, 1, 4)

    q, k, v = heads_first(4), heads_first(2), heads_first(2)
    assert not q.is_contiguous()
    kw = dict(kernel_size=(5, 7), dilation=(1, 2), is_causal=(True, False), return_lse=True)
    emu.clear_launches()
    with torch.no_grad():
        out, lse = nattn.neighborhood_attention(q, k, v, backend="cuda-emu", **kw)
        assert _hopper_launches(), [r["kernel"] for r in emu.launches()]
        e = nattn.reference.neighborhood_attention(q.double(), k.double(), v.double(), **kw)
        t = nattn.reference.neighborhood_attention(q, k, v, **kw)
    for name, ek, tk, kk in zip(NAMES, e, t, (out, lse)):
        k_err = (kk.double() - ek).abs().max().item()
        t_err = (tk.double() - ek).abs().max().item()
        assert k_err <= 2.0 * t_err + FLOOR[torch.bfloat16] * max(1.0, ek.abs().max().item()), (
            name, k_err, t_err)


def test_hopper_declines_to_portable_kernels(hopper_emu):
    """K and V with different batch/head strides (one TMA coordinate cannot address both), and
    a tensor map the driver refuses: each is declined with its reason before launch, and the
    call runs on the SM80 kernels instead of failing."""
    c = Case(2, (12, 12), 2, 2, 64, 64, (5, 5), (1, 1), (1, 1), (False, False), 0,
             torch.float16, 0)
    gen = torch.Generator().manual_seed(1)
    q, k, v, _, _ = make_inputs(c, gen, "cpu")
    # V heads-first in memory: [B, H, *S, D] viewed as [B, *S, H, D].
    v = v.permute(0, 3, 1, 2, 4).contiguous().permute(0, 2, 3, 1, 4)
    window = _native.Window(c.kernel_size, c.stride, c.dilation, c.is_causal, 0.125)
    p = _native._params(q, k, v, None, None, window, _native._emu)[0]
    reasons = _native._emu.cuda_hopper_forward_reasons(p)
    assert any("key and value have different" in r for r in reasons), reasons
    emu.clear_launches()
    out = nattn.neighborhood_attention(q, k, v, c.kernel_size, backend="cuda-emu")
    assert not _hopper_launches() and emu.launches()
    ref = nattn.reference.neighborhood_attention(q.double(), k.double(), v.double(),
                                                 c.kernel_size)
    assert (out.double() - ref).abs().max().item() < 1e-2

    q, k, v, _, _ = make_inputs(c, gen, "cpu")
    p = _native._params(q, k, v, None, None, window, _native._emu)[0]
    out, lse = torch.empty_like(q), torch.empty(q.shape[:-1])
    p.set_tensor("out", out.data_ptr(), _native._token_strides(out, 2))
    p.set_tensor("lse", lse.data_ptr(), _native._token_strides(lse, 2))
    assert _native._emu.cuda_hopper_forward_reasons(p) == []
    _native._emu.set_encode_fault(True)
    try:
        reasons = _native._emu.cuda_hopper_forward_reasons(p)
        assert any("cuTensorMapEncodeTiled rejected the query map" in r for r in reasons), reasons
        emu.clear_launches()
        out = nattn.neighborhood_attention(q, k, v, c.kernel_size, backend="cuda-emu")
        assert not _hopper_launches() and emu.launches()
    finally:
        _native._emu.set_encode_fault(False)
    ref = nattn.reference.neighborhood_attention(q.double(), k.double(), v.double(),
                                                 c.kernel_size)
    assert (out.double() - ref).abs().max().item() < 1e-2


def test_hopper_backward_sweep_size():
    assert {c.dim for c in HOPPER_BACKWARD_SWEEP} == {32, 64, 128}
    assert len(HOPPER_BACKWARD_SWEEP) >= len(HOPPER_SWEEP) + 12
    assert sum(1 for c in HOPPER_BACKWARD_SWEEP if c.additional) >= 5


@pytest.mark.parametrize("index", range(len(HOPPER_BACKWARD_SWEEP)))
def test_hopper_backward_sweep_emulated(hopper_emu, index):
    """Forward and backward of each Hopper configuration under the emulator, as an H100 would
    serve them: out / lse (2x) and dq, dk, dv (3x) against the fp64 reference with the error-ratio
    rule, in two schedules (index order; a seeded random order of CTAs and fibers) that must give
    the same bits. Both Hopper backward kernels (dQ, dK/dV) must have run, and nothing of the
    SM80 backward."""
    c = HOPPER_BACKWARD_SWEEP[index]
    emu.clear_launches()
    check_case(c, seed=index, target="cuda-emu")
    kernels = [r["kernel"] for r in emu.launches()]
    bwd = _hopper_backward_launches()
    assert len(bwd) == 4, (c, kernels)  # dQ and dK/dV, in each of the two schedules
    assert not any("sm80::" in k and ("dq_kernel" in k or "dkdv_kernel" in k)
                   for k in kernels), (c, kernels)


def test_hopper_backward_bit_identical_over_repeated_runs(hopper_emu):
    """GQA 2:1, dilation and a causal axis: the Hopper gradients are the same bits over runs in
    different schedules (no atomics: each gradient row is written once by its owner CTA)."""
    c = Case(2, (20, 20), 4, 2, 64, 64, (7, 5), (1, 2), (2, 1), (False, True), 0,
             torch.float16, 0)
    gen = torch.Generator().manual_seed(0)
    inputs = make_inputs(c, gen, "cpu")
    shape = (c.batch, *c.shape, c.heads)
    grads = (torch.randn(*shape, c.dim_v, generator=gen).half(),
             torch.randn(*shape, generator=gen))
    emu.clear_launches()
    first = run_kernels("cuda-emu", c, inputs, grads)
    assert _hopper_backward_launches()
    for i in range(2):
        again = run_kernels("cuda-emu", c, inputs, grads, seed=i + 1)
        for name, a, b in zip(NAMES, first, again):
            assert torch.equal(a, b), name


def test_hopper_backward_heads_first_views(hopper_emu):
    """Q, K, V and grad_out as heads-first views, V in another layout than K (the forward
    declines that pair, the backward addresses each tensor with its own TMA coordinate): the
    Hopper backward reads them where they lie, gradients under the 3x rule."""
    gen = torch.Generator().manual_seed(12)

    def heads_first(heads, dtype=torch.bfloat16):
        t = torch.randn(2, heads, 9, 14, 64, generator=gen).to(dtype)
        return t.permute(0, 2, 3, 1, 4)

    q, k = heads_first(4), heads_first(2)
    v = torch.randn(2, 9, 14, 2, 64, generator=gen).to(torch.bfloat16)  # heads-last
    g_out = heads_first(4)
    assert not q.is_contiguous() and not g_out.is_contiguous()
    c = Case(2, (9, 14), 4, 2, 64, 64, (5, 7), (1, 2), (1, 2), (True, False), 0,
             torch.bfloat16, 0)
    g_lse = torch.zeros(2, 9, 14, 4)
    emu.clear_launches()
    kern = run(kernel_fn("cuda-emu"), c, [q, k, v, None, None], (g_out, g_lse))
    assert len(_hopper_backward_launches()) == 2, [r["kernel"] for r in emu.launches()]
    exact = run(nattn.reference.neighborhood_attention, c,
                [q.double(), k.double(), v.double(), None, None],
                (g_out.double(), g_lse.double()))
    low = run(nattn.reference.neighborhood_attention, c, [q, k, v, None, None], (g_out, g_lse))
    for n, (e, t, kk) in enumerate(zip(exact, low, kern)):
        k_err = (kk.double() - e).abs().max().item()
        t_err = (t.double() - e).abs().max().item()
        ratio = 2.0 if n < 2 else 3.0
        assert k_err <= ratio * t_err + FLOOR[torch.bfloat16] * max(1.0, e.abs().max().item()), (
            NAMES[n], k_err, t_err)


def test_hopper_backward_declines_to_portable_kernels(hopper_emu):
    """What the Hopper backward cannot serve is declined with a reason before anything runs
    (the delta pass included) and runs on the SM80 / SIMT backward: additional tokens whose rows
    are not 16-byte aligned, rpb, head_dim 16, such a grad_out; gradients still right."""
    c = Case(1, (12, 12), 2, 2, 64, 64, (5, 5), (1, 1), (1, 1), (False, False), 3,
             torch.float16, 0)
    gen = torch.Generator().manual_seed(2)
    q, k, v, ak, av = make_inputs(c, gen, "cpu")
    window = _native.Window(c.kernel_size, c.stride, c.dilation, c.is_causal, 0.125)

    def reasons(q, k, v, ak=None, av=None, d_out=None, rpb=None):
        p = _native._params(q, k, v, ak, av, window, _native._emu, rpb)[0]
        d_out = torch.empty_like(q) if d_out is None else d_out
        p.set_tensor("d_out", d_out.data_ptr(), _native._token_strides(d_out, 2))
        grads = [torch.empty_like(t) for t in (q, k, v)]
        for name, t in zip(("dq", "dk", "dv"), grads):
            p.set_tensor(name, t.data_ptr(), _native._token_strides(t, 2))
        if ak is not None:
            grads += [torch.empty(ak.shape, dtype=ak.dtype), torch.empty(av.shape, dtype=av.dtype)]
            for name, t in zip(("d_add_k", "d_add_v"), grads[3:]):
                p.set_tensor(name, t.data_ptr(), list(t.stride()))
        return " | ".join(_native._emu.cuda_hopper_backward_reasons(p))

    assert reasons(q, k, v) == ""
    assert reasons(q, k, v, ak, av) == ""
    ak = torch.cat([ak, ak[..., :2]], -1)[..., :64]  # rows 132 bytes apart
    assert "additional_keys" in reasons(q, k, v, ak, av)
    rpb = torch.zeros(2, 9, 9, dtype=torch.float16)
    assert "relative positional bias" in reasons(q, k, v, rpb=rpb)
    q16, k16, v16 = (t[..., :16].contiguous() for t in (q, k, v))
    assert "head_dim 16" in reasons(q16, k16, v16)
    misaligned = torch.cat([q, q[..., :2]], -1)[..., :64]
    assert "grad_out" in reasons(q, k, v, d_out=misaligned)

    g_out = torch.randn(1, 12, 12, 2, 64, generator=gen).half()
    for inputs in ([q, k, v, ak, av], [q16, k16, v16, None, None]):
        emu.clear_launches()
        kern = run(kernel_fn("cuda-emu"), c, inputs, (g_out[..., :inputs[0].shape[-1]],
                                                      torch.zeros(1, 12, 12, 2)))
        assert not _hopper_backward_launches() and emu.launches()
        exact = run(nattn.reference.neighborhood_attention, c,
                    [None if t is None else t.double() for t in inputs],
                    (g_out[..., :inputs[0].shape[-1]].double(),
                     torch.zeros(1, 12, 12, 2, dtype=torch.float64)))
        for name, e, kk in zip(NAMES, exact, kern):
            assert (kk.double() - e).abs().max().item() < 2e-2 * max(1.0, e.abs().max().item()), name


hopper_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or _C is None or not getattr(_C, "with_cuda", False)
    or torch.cuda.get_device_capability() != (9, 0),
    reason="needs an H100/H200 (compute capability 9.0) and a CUDA build of nattn._C",
)


@hopper_gpu
@pytest.mark.parametrize("index", range(len(HOPPER_SWEEP)))
def test_hopper_forward_sweep_gpu(monkeypatch, index):
    """The same Hopper configurations on a real H100/H200 through the opt-in `hopper` backend
    (scripts/gpu_check.sh runs this file): the Hopper kernel must take each call, and out / lse
    follow the error-ratio rule against the fp32 reference on the GPU."""
    monkeypatch.setenv("NATTN_EXPERIMENTAL_HOPPER", "1")
    c = HOPPER_SWEEP[index]
    gen = torch.Generator(device="cuda").manual_seed(index)
    low = make_inputs(c, gen, "cuda")
    q, k, v, _, _ = low
    window = _native.Window(c.kernel_size, c.stride, c.dilation, c.is_causal, c.dim ** -0.5)
    p = _native._params(q, k, v, None, None, window, _C)[0]
    out, lse = torch.empty_like(q), torch.empty(q.shape[:-1], device="cuda")
    p.set_tensor("out", out.data_ptr(), _native._token_strides(out, len(c.shape)))
    p.set_tensor("lse", lse.data_ptr(), _native._token_strides(lse, len(c.shape)))
    assert _C.cuda_hopper_forward_reasons(p) == [], c

    def forward(fn, inputs):
        q, k, v, _, _ = inputs
        return fn(q, k, v, c.kernel_size, stride=c.stride, dilation=c.dilation,
                  is_causal=c.is_causal, return_lse=True)

    with torch.no_grad():
        e = forward(nattn.reference.neighborhood_attention,
                    [t if t is None else t.float() for t in low])
        t = forward(nattn.reference.neighborhood_attention, low)
        kern = forward(kernel_fn("hopper"), low)
    for n, (ek, tk, kk) in enumerate(zip(e, t, kern)):
        assert not torch.isnan(kk).any(), (NAMES[n], c)
        k_err = (kk.float() - ek).abs().max().item()
        t_err = (tk.float() - ek).abs().max().item()
        scale = max(1.0, ek.abs().max().item())
        assert k_err <= 2.0 * t_err + FLOOR[c.dtype] * scale, (NAMES[n], k_err, t_err, c)


@hopper_gpu
@pytest.mark.parametrize("index", range(len(HOPPER_BACKWARD_SWEEP)))
def test_hopper_backward_sweep_gpu(monkeypatch, index):
    """The Hopper backward on a real H100/H200 through the opt-in `hopper` backend
    (scripts/gpu_check.sh runs this file): it must take each call, and every output and gradient
    follows the error-ratio rule (3x for gradients) against the fp32 reference on the GPU; a
    second run gives the same bits."""
    monkeypatch.setenv("NATTN_EXPERIMENTAL_HOPPER", "1")
    c = HOPPER_BACKWARD_SWEEP[index]
    gen = torch.Generator(device="cuda").manual_seed(index)
    low = make_inputs(c, gen, "cuda")
    q, k, v, _, _ = low
    shape = (c.batch, *c.shape, c.heads)
    g_out = torch.randn(*shape, c.dim_v, generator=gen, device="cuda").to(c.dtype)
    g_lse = torch.randn(*shape, generator=gen, device="cuda") * 0.5
    window = _native.Window(c.kernel_size, c.stride, c.dilation, c.is_causal, c.dim ** -0.5)
    p = _native._params(q, k, v, None, None, window, _C)[0]
    p.set_tensor("d_out", g_out.data_ptr(), _native._token_strides(g_out, len(c.shape)))
    grads = [torch.empty_like(t) for t in (q, k, v)]
    for name, t in zip(("dq", "dk", "dv"), grads):
        p.set_tensor(name, t.data_ptr(), _native._token_strides(t, len(c.shape)))
    assert _C.cuda_hopper_backward_reasons(p) == [], c
    exact = run(nattn.reference.neighborhood_attention, c,
                [t if t is None else t.float() for t in low], (g_out.float(), g_lse))
    torch_low = run(nattn.reference.neighborhood_attention, c, low, (g_out, g_lse))
    kern = run(kernel_fn("hopper"), c, low, (g_out, g_lse))
    again = run(kernel_fn("hopper"), c, low, (g_out, g_lse))
    for n, (ek, tk, kk, k2) in enumerate(zip(exact, torch_low, kern, again)):
        assert not torch.isnan(kk).any(), (NAMES[n], c)
        assert torch.equal(kk, k2), (NAMES[n], "not bit-identical", c)
        k_err = (kk.float() - ek).abs().max().item()
        t_err = (tk.float() - ek).abs().max().item()
        ratio = 2.0 if n < 2 else 3.0
        scale = max(1.0, ek.abs().max().item())
        assert k_err <= ratio * t_err + FLOOR[c.dtype] * scale, (NAMES[n], k_err, t_err, c)
