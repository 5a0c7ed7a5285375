"""CPU-side checks of the Hopper (sm_90a) forward's host logic (csrc/cuda/sm90/sm90_plan.h).

- KV-tile walk of each Q tile (which tiles, in which order, which need a mask) against brute force
  over nattn.reference.neighborhood_mask, for random small 1-D/2-D/3-D problems with strides,
  dilations (ragged groups included) and causal axes.
- TMA views: every token of a [B, x0, x1, x2, H, D] tensor (any strides, dilated axes, ragged
  groups) is addressed by exactly one in-bounds 5-D TMA coordinate of its group's view, at its
  true address; positions past a group's end fall out of bounds (zero fill).
- Tile-shape choice: 128-row power-of-two boxes; stride-aligned GNA problems get no masked tile.
- Reasons the path declines a problem.
- nvcc: the sources compile to sm_90a PTX holding wgmma.mma_async, cp.async.bulk.tensor and
  setmaxnreg, and refuse to compile for plain sm_90.

The host functions reach Python through nattn._C.sm90_* bindings; each test skips until they
exist. No GPU is needed or used.
"""

import math
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import cutlass_include

torch = pytest.importorskip("torch")
_C = pytest.importorskip("nattn._C")
from nattn import reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _binding(name):
    fn = getattr(_C, name, None)
    if fn is None:
        pytest.skip(f"nattn._C.{name} is not bound yet (see docs/hopper.md)")
    return fn


def _random_axes(rng, rank, max_len=11):
    axes = []
    for _ in range(rank):
        length = rng.randint(1, max_len)
        dilation = rng.randint(1, max(1, min(3, length)))
        kernel = rng.randint(1, length // dilation)
        stride = rng.randint(1, kernel)
        axes.append((length, kernel, stride, dilation, rng.random() < 0.3))
    return axes


def _pad(axes):
    return [(1, 1, 1, 1, False)] * (3 - len(axes)) + list(axes)


def _group_len(length, dilation, g):
    return (length - g + dilation - 1) // dilation


def _tile_tokens(axes3, group, tile, box):
    """Per axis, the axis indices of a box tile's valid positions (group positions -> index)."""
    per_axis = []
    for a, (length, _, _, d, _) in enumerate(axes3):
        n = _group_len(length, d, group[a])
        first = tile[a] * box[a]
        per_axis.append([group[a] + d * j for j in range(first, min(first + box[a], n))])
    return per_axis


def _random_box(rng, total_log2=None):
    if total_log2 is None:
        return [2 ** rng.randint(0, 2) for _ in range(3)]
    parts = [0, 0, 0]
    for _ in range(total_log2):
        parts[rng.randrange(3)] += 1
    return [2**p for p in parts]


@pytest.mark.parametrize("seed", range(40))
def test_walk_matches_bruteforce(seed):
    walk_fn = _binding("sm90_kv_walk")
    rng = random.Random(seed)
    rank = 1 + seed % 3
    axes = _random_axes(rng, rank, max_len=9 if rank == 3 else 13)
    axes3 = _pad(axes)
    shape = [a[0] for a in axes3]
    mask = reference.neighborhood_mask(
        shape, [a[1] for a in axes3], [a[2] for a in axes3], [a[3] for a in axes3],
        [a[4] for a in axes3],
    )
    strides = [shape[1] * shape[2], shape[2], 1]
    q_box = _random_box(rng)
    kv_box = _random_box(rng)

    def flat(coords):
        return sum(c * s for c, s in zip(coords, strides))

    q_tiles = 1
    for a, (length, _, _, d, _) in enumerate(axes3):
        q_tiles *= sum(math.ceil(_group_len(length, d, g) / q_box[a]) for g in range(d))
    seen_queries = set()
    for t in range(q_tiles):
        group, tile, group_len, kv = walk_fn(axes, q_box, kv_box, t)
        assert group_len == [_group_len(axes3[a][0], axes3[a][3], group[a]) for a in range(3)]
        q_axes = _tile_tokens(axes3, group, tile, q_box)
        queries = [flat((i, j, k)) for i in q_axes[0] for j in q_axes[1] for k in q_axes[2]]
        assert queries, "a Q tile holds at least one query"
        seen_queries.update(queries)
        # Brute force over every KV tile of the same groups.
        expect = {}
        n_kv = [math.ceil(group_len[a] / kv_box[a]) for a in range(3)]
        for t0 in range(n_kv[0]):
            for t1 in range(n_kv[1]):
                for t2 in range(n_kv[2]):
                    k_axes = _tile_tokens(axes3, group, (t0, t1, t2), kv_box)
                    keys = [flat((i, j, k)) for i in k_axes[0] for j in k_axes[1] for k in k_axes[2]]
                    sub = mask[queries][:, keys]
                    if not bool(sub.any()):
                        continue
                    cut = any(
                        (tt + 1) * kv_box[a] > group_len[a] for a, tt in enumerate((t0, t1, t2))
                    )
                    expect[(t0, t1, t2)] = cut or not bool(sub.all())
        got = {tuple(x[:3]): bool(x[3]) for x in kv}
        assert len(got) == len(kv), "no KV tile is visited twice"
        assert got == expect, (axes, q_box, kv_box, t)
        flags = [bool(x[3]) for x in kv]
        assert flags == sorted(flags), "full tiles first, then masked ones"
    assert len(seen_queries) == math.prod(shape), "the Q tiles cover every query once"


def _strided_layout(rng, batch, shape, heads, dim):
    """Element strides of a [B, x0, x1, x2, H, D] tensor stored in a random axis order (D last)."""
    extents = [batch, *shape, heads]
    order = list(range(5))
    rng.shuffle(order)
    strides = [0] * 6
    strides[5] = 1
    step = dim + 8 * rng.randint(0, 1)  # sometimes a padded row
    for i in reversed(order):
        strides[i] = step
        step *= extents[i]
    return strides


@pytest.mark.parametrize("seed", range(30))
def test_tma_views_address_every_token(seed):
    views_fn = _binding("sm90_tma_views")
    variant_fn = _binding("sm90_tma_variant")
    rng = random.Random(1000 + seed)
    rank = 1 + seed % 3
    axes = _random_axes(rng, rank, max_len=10)
    axes3 = _pad(axes)
    shape = [a[0] for a in axes3]
    batch, heads = rng.randint(1, 3), rng.randint(1, 3)
    dim = rng.choice([64, 128])
    strides = _strided_layout(rng, batch, shape, heads, dim)
    box = _random_box(rng, total_log2=rng.randint(0, 7))
    error, variants, dims, sbytes, boxes, coef = views_fn(
        axes, batch, heads, dim, strides, 1 << 20, box
    )
    assert error == ""
    ragged = sum(1 for a in axes3 if a[0] % a[3])
    assert variants == 2**ragged
    for v in range(8):
        assert len(dims[v]) == 5 and len(boxes[v]) == 5, "TMA allows 5 dims"
        assert boxes[v][0] * 2 == 128, "a 128-byte swizzled box row"
        assert boxes[v][1:4] == box[::-1] and boxes[v][4] == 1
        assert all(s % 16 == 0 and 0 < s < 2**40 for s in sbytes[v])
        assert all(1 <= b <= 256 for b in boxes[v])
        assert all(1 <= d < 2**32 for d in dims[v])
    elem = 2
    for b in range(batch):
        for h in range(heads):
            for x0 in range(shape[0]):
                for x1 in range(shape[1]):
                    for x2 in range(shape[2]):
                        x = (x0, x1, x2)
                        group = [x[a] % axes3[a][3] for a in range(3)]
                        pos = [x[a] // axes3[a][3] for a in range(3)]
                        v = variant_fn(axes, group)
                        view_dims = dims[v]
                        # In bounds exactly up to the group's length, per axis.
                        for a in range(3):
                            n = _group_len(shape[a], axes3[a][3], group[a])
                            assert view_dims[3 - a] == n
                            assert pos[a] < view_dims[3 - a]
                        off = b * coef[0] + h * coef[1] + sum(g * c for g, c in zip(group, coef[2:]))
                        assert 0 <= off < view_dims[4] and off < 2**31
                        for col in (0, dim - 1):
                            coords = [col, pos[2], pos[1], pos[0], off]
                            addr = coords[0] * elem + sum(
                                c * s for c, s in zip(coords[1:], sbytes[v])
                            )
                            true = elem * (
                                b * strides[0] + sum(x[a] * strides[1 + a] for a in range(3))
                                + h * strides[4] + col
                            )
                            assert addr == true


def test_tma_views_reject_what_tma_cannot_read():
    views_fn = _binding("sm90_tma_views")
    axes = [(16, 3, 1, 1, False)]
    ok = [16 * 2 * 64, 16 * 2 * 64, 16 * 2 * 64, 2 * 64, 64, 1]
    assert views_fn(axes, 2, 2, 64, ok, 1 << 20, [1, 1, 128])[0] == ""
    bad_last = list(ok)
    bad_last[5] = 2
    assert "contiguous" in views_fn(axes, 2, 2, 64, bad_last, 1 << 20, [1, 1, 128])[0]
    assert "aligned" in views_fn(axes, 2, 2, 64, ok, (1 << 20) + 2, [1, 1, 128])[0]
    odd = list(ok)
    odd[3] = 2 * 64 + 4  # token stride not a multiple of 16 bytes
    assert "16 bytes" in views_fn(axes, 2, 2, 64, odd, 1 << 20, [1, 1, 128])[0]


def test_choose_tiles_shapes_and_counts():
    choose = _binding("sm90_choose_tiles")
    summary = getattr(_C, "tile_plan_summary", None)
    rng = random.Random(7)
    problems = [
        [(56, 7, 1, 1, False), (56, 7, 1, 1, False)],
        [(32768, 4096, 1, 1, True)],
        [(30, 18, 16, 1, False), (48, 24, 8, 1, False), (80, 24, 8, 1, False)],
    ] + [_random_axes(rng, 1 + i % 3, max_len=40) for i in range(12)]
    for axes in problems:
        q_box, kv_box, q_tiles, visited, full, masked = choose(axes)
        assert math.prod(q_box) == 128 and math.prod(kv_box) == 128
        assert all(e & (e - 1) == 0 for e in q_box + kv_box)
        assert visited == full + masked and q_tiles >= 1
        if summary is not None:
            assert summary(_pad(axes), q_box, kv_box) == (q_tiles, visited, full, masked)


@pytest.mark.parametrize(
    "axes",
    [
        [(64, 16, 16, 1, False), (64, 16, 16, 1, False)],  # blocked 2-D, windows = stride blocks
        [(1024, 128, 128, 1, False)],  # blocked 1-D
        [(16, 8, 8, 1, False), (64, 16, 16, 1, False), (64, 16, 16, 1, False)],
    ],
)
def test_aligned_gna_needs_no_mask(axes):
    choose = _binding("sm90_choose_tiles")
    _, _, _, visited, full, masked = choose(axes)
    assert masked == 0 and full == visited


def test_forward_reasons():
    reasons = _binding("sm90_forward_reasons")

    def params(**kw):
        p = _C.AttentionParams()
        p.dtype = kw.get("dtype", _C.DType.bfloat16) if hasattr(_C, "DType") else p.dtype
        p.head_dim = p.value_dim = kw.get("head_dim", 128)
        p.heads = p.kv_heads = 2
        p.num_additional = kw.get("num_additional", 0)
        return p

    if not hasattr(_C, "DType"):
        pytest.skip("nattn._C.DType is not bound")
    assert reasons(params(), 90, 232448) == []
    assert any("head_dim" in r for r in reasons(params(head_dim=32), 90, 0))
    assert any("additional" in r for r in reasons(params(num_additional=4), 90, 0))
    assert any("float16 and bfloat16" in r for r in reasons(params(dtype=_C.DType.float32)))
    assert any("9.0" in r for r in reasons(params(), 80, 0))
    assert any("shared memory" in r for r in reasons(params(), 90, 100 * 1024))


def test_forward_reasons_decline_kv_stride_mismatch():
    """K and V whose batch/head strides differ (in units of their common divisor) cannot share
    the one offset coordinate the producer computes: declined before launch, with the reason
    (the portable kernels then run the call), instead of a RuntimeError inside the launch."""
    reasons = _binding("sm90_forward_reasons")
    from nattn import _native
    q = torch.randn(2, 12, 12, 2, 64, dtype=torch.float16)
    window = _native.Window((5, 5), (1, 1), (1, 1), (False, False), 0.125)
    same = _native._params(q, q, q, None, None, window, _C)[0]
    for name, t in (("out", q), ("lse", q[..., 0].float())):
        same.set_tensor(name, t.data_ptr(), _native._token_strides(t, 2))
    assert reasons(same, 90, 232448) == []
    v = q.permute(0, 3, 1, 2, 4).contiguous().permute(0, 2, 3, 1, 4)  # heads-first V
    other = _native._params(q, q, v, None, None, window, _C)[0]
    for name, t in (("out", q), ("lse", q[..., 0].float())):
        other.set_tensor(name, t.data_ptr(), _native._token_strides(t, 2))
    assert any("key and value have different" in r for r in reasons(other, 90, 232448))


def test_backward_reasons():
    """The Hopper backward's planner: what it serves (K and V in different layouts included:
    each tensor has its own TMA coordinate) and what it declines, each with its reason."""
    reasons = _binding("sm90_backward_reasons")
    from nattn import _native
    q = torch.randn(2, 12, 12, 2, 64, dtype=torch.float16)
    window = _native.Window((5, 5), (1, 1), (1, 1), (False, False), 0.125)

    def params(q, k, v, d_out=None, ak=None, rpb=None):
        p = _native._params(q, k, v, ak, ak, window, _C, rpb)[0]
        d_out = q if d_out is None else d_out
        p.set_tensor("d_out", d_out.data_ptr(), _native._token_strides(d_out, 2))
        for name, t in (("dq", q), ("dk", k), ("dv", v)):
            p.set_tensor(name, t.data_ptr(), _native._token_strides(t, 2))
        if ak is not None:
            for name in ("d_add_k", "d_add_v"):
                p.set_tensor(name, ak.data_ptr(), list(ak.stride()))
        return p

    assert reasons(params(q, q, q), 90, 232448) == []
    v = q.permute(0, 3, 1, 2, 4).contiguous().permute(0, 2, 3, 1, 4)  # heads-first V
    assert reasons(params(q, q, v), 90, 232448) == []
    joined = lambda p, cap=90, smem=232448: " | ".join(reasons(p, cap, smem))  # noqa: E731
    assert "9.0" in joined(params(q, q, q), 80)
    assert "shared memory" in joined(params(q, q, q), 90, 100 * 1024)
    ak = torch.randn(2, 3, 2, 64, dtype=torch.float16)
    assert reasons(params(q, q, q, ak=ak), 90, 232448) == []
    ak = torch.cat([ak, ak[..., :2]], -1)[..., :64]  # token rows 132 bytes apart
    assert "additional_keys" in joined(params(q, q, q, ak=ak))
    rpb = torch.zeros(2, 9, 9, dtype=torch.float16)
    assert "relative positional bias" in joined(params(q, q, q, rpb=rpb))
    assert reasons(params(*(q[..., :32].contiguous(),) * 3), 90, 232448) == []
    q16 = q[..., :16].contiguous()
    assert "head_dim 16" in joined(params(q16, q16, q16))
    qf = q.float()
    assert "float16 and bfloat16" in joined(params(qf, qf, qf))
    misaligned = torch.cat([q, q[..., :2]], -1)[..., :64]
    assert "grad_out" in joined(params(q, q, q, d_out=misaligned))


# ------------------------------------------------------------------------------------------------
# Compile checks (nvcc, no GPU).


NVCC = shutil.which("nvcc")
CUTLASS = cutlass_include()
needs_nvcc = pytest.mark.skipif(
    NVCC is None or CUTLASS is None, reason="needs nvcc and the CUTLASS/CuTe headers"
)
# The smallest instantiation: about 10 s and 1 GB of compiler memory on 2 cores.
SM90_TU = ROOT / "csrc" / "cuda" / "sm90" / "sm90_fwd_bf16_hdim64.cu"
# The smallest backward instantiation (both passes), never compiled where it was written (no
# nvcc there): this test is its first compile check on a machine that has nvcc.
SM90_BWD_TU = ROOT / "csrc" / "cuda" / "sm90" / "sm90_bwd_bf16_hdim64.cu"


def _nvcc_ptx(arch, out, tu=SM90_TU):
    return subprocess.run(
        [
            NVCC, "-std=c++17", f"-gencode=arch=compute_{arch},code=compute_{arch}",
            "--expt-relaxed-constexpr", "-O3", "--ptx", "-I", str(ROOT / "include"),
            "-I", str(ROOT / "csrc"), "-isystem", CUTLASS, str(tu), "-o", str(out),
        ],
        capture_output=True, text=True, timeout=170,
    )


@needs_nvcc
def test_sm90_ptx_has_wgmma_and_tma(tmp_path):
    res = _nvcc_ptx("90a", tmp_path / "fwd.ptx")
    assert res.returncode == 0, res.stderr[-4000:]
    ptx = (tmp_path / "fwd.ptx").read_text()
    assert "wgmma.mma_async" in ptx
    assert "cp.async.bulk.tensor" in ptx
    assert "setmaxnreg" in ptx
    assert "mbarrier" in ptx


@needs_nvcc
def test_sm90_backward_ptx_has_wgmma_and_tma(tmp_path):
    res = _nvcc_ptx("90a", tmp_path / "bwd.ptx", SM90_BWD_TU)
    assert res.returncode == 0, res.stderr[-4000:]
    ptx = (tmp_path / "bwd.ptx").read_text()
    assert "wgmma.mma_async" in ptx
    assert "cp.async.bulk.tensor" in ptx
    assert "setmaxnreg" in ptx
    assert "mbarrier" in ptx


@needs_nvcc
def test_sm90_refuses_plain_sm90(tmp_path):
    res = _nvcc_ptx("90", tmp_path / "fwd.ptx")
    assert res.returncode != 0
    assert "needs sm_90a" in res.stderr


LAYOUT_CHECK = r"""
#include <cstdio>
#include "cuda/sm90/sm90_fwd_kernel.cuh"
using namespace cute;
template <class T> int check() {
  constexpr int kN = T::kN, kD = T::kHeadDim;
  int bad = 0;
  for (int t = 0; t < 256; ++t) {
    auto qk = typename T::MmaQK{}.get_thread_slice(t);
    auto pv = typename T::MmaPV{}.get_thread_slice(t);
    auto s = qk.partition_C(make_identity_tensor(Shape<Int<T::kM>, Int<kN>>{}));
    auto p = pv.partition_A(make_identity_tensor(Shape<Int<T::kM>, Int<kN>>{}));
    auto o = pv.partition_C(make_identity_tensor(Shape<Int<T::kM>, Int<kD>>{}));
    auto s2 = qk.partition_C(make_identity_tensor(Shape<Int<T::kM>, Int<kN>>{}));
    for (int r = 0; r < 2; ++r) {
      const int row = get<0>(s(make_coord(0, r, 0), 0, 0));
      for (int c = 0; c < kN / 8; ++c)
        for (int v = 0; v < 2; ++v) {
          bad += get<0>(s(make_coord(v, r, c), 0, 0)) != row;
          bad += get<1>(s(make_coord(v, r, c), 0, 0)) != get<1>(s(make_coord(0, r, c), 0, 0)) + v;
        }
      for (int c = 0; c < kD / 8; ++c)
        for (int v = 0; v < 2; ++v) {
          bad += get<0>(o(make_coord(v, r, c), 0, 0)) != row;
          bad += get<1>(o(make_coord(v, r, c), 0, 0)) != get<1>(o(make_coord(0, r, c), 0, 0)) + v;
        }
      // The 4 threads of a quad (t ^ 1, t ^ 2) share the row: quad_max / quad_sum.
      for (int x = 1; x < 4; x <<= 1) {
        auto q = typename T::MmaQK{}.get_thread_slice(t ^ x)
                     .partition_C(make_identity_tensor(Shape<Int<T::kM>, Int<kN>>{}));
        bad += get<0>(q(make_coord(0, r, 0), 0, 0)) != row;
      }
    }
    for (int kb = 0; kb < kN / 16; ++kb)
      for (int v2 = 0; v2 < 2; ++v2)
        for (int r = 0; r < 2; ++r)
          for (int v = 0; v < 2; ++v)
            bad += !(p(make_coord(v, r, v2), 0, kb) == s2(make_coord(v, r, 2 * kb + v2), 0, 0));
    bad += t / 128 != get<0>(s(0)) / 64;  // warpgroup w owns rows 64w .. 64w + 63
  }
  return bad;
}
int main() {
  const int bad = check<nattn::cuda::sm90::ForwardTraits<cute::bfloat16_t, 64>>() +
                  check<nattn::cuda::sm90::ForwardTraits<cute::half_t, 128>>();
  std::printf("mismatches %d\n", bad);
  return bad != 0;
}
"""


@needs_nvcc
def test_sm90_fragment_layouts(tmp_path):
    """The kernel's register bookkeeping matches CuTe's wgmma layouts, thread by thread: the two
    row halves of the score and output fragments, the quad that shares a row, the warpgroup's
    rows, and the renumbering of the fp32 score accumulator into P's A-operand fragment."""
    src = tmp_path / "layouts.cu"
    src.write_text(LAYOUT_CHECK)
    exe = tmp_path / "layouts"
    res = subprocess.run(
        [
            NVCC, "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a",
            "--expt-relaxed-constexpr", "-I", str(ROOT / "include"), "-I", str(ROOT / "csrc"),
            "-isystem", CUTLASS, str(src), "-o", str(exe),
        ],
        capture_output=True, text=True, timeout=170,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
