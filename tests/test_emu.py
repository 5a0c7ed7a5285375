"""The functional CUDA emulator itself (csrc/emu, backend cuda-emu): that it describes the
hardware as the PTX ISA does, that its counters agree with the tile planner, that every shipped
kernel instantiation runs under it, and that it can fail.

- Fragment maps: the emulator's mma.m16n8k16 and ldmatrix lane-to-element maps (written from the
  PTX ISA) against CuTe's MMA_Traits / Copy_Traits layouts: two independent descriptions of the
  hardware must agree, lane by lane.
- Counters: the forward's mma instructions equal visited tile pairs (include/nattn/tile_plan.h)
  x the mmas one pair needs; cp.async bytes and global store bytes are exactly what the tiles
  and outputs imply (every output element is written once).
- Every instantiation that ships: fp16/bf16 x head dim 32/64/128/256 forward, 32/64/128
  backward, and the SIMT kernels in fp32 and fp64, each checked against the reference.
- Planted defects (tests/emu/defects.cpp, small test kernels, not the product's): a read before
  its cp.async wait, a missing __syncthreads, a divergent shuffle, a barrier not every thread
  reaches, over 48 KiB of dynamic shared memory without the opt-in, an mma fed a swapped
  fragment register; each caught with a clear message.
- SM90: the emulator's wgmma accumulator / A-register maps against CuTe's GMMA layouts; its
  decoding of CuTe's wgmma descriptors (every GMMA atom, K- and MN-major, every k-block) against
  CuTe's own addresses; the emulated cuTensorMapEncodeTiled against each rule the driver
  documents; TMA boxes (ranks 1-5, out of bounds, element strides, every swizzle) read back
  through CuTe's swizzle atoms; the Hopper forward's wgmma count and TMA bytes against its
  planner; planted SM90 defects (tests/emu/defects_sm90.cpp): accumulators read before
  wgmma.wait_group, a wgmma without wgmma.fence, a wgmma reading a TMA tile before its mbarrier
  wait, a TMA refilling a tile a wgmma still reads, an mbarrier phase that never completes or
  is overtaken, setmaxnreg beyond the register file or not warpgroup-uniform.

Skipped without a NATTN_EMU=1 build.
"""

import itertools
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import nattn
from nattn import _native, emu
from conftest import cutlass_include
from test_cuda import Case, check_case

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(_native._emu is None, reason=str(_native.EMU_IMPORT_ERROR))
E = _native._emu


@pytest.fixture(autouse=True)
def _poison_and_reset(monkeypatch):
    monkeypatch.setattr(_native, "poison_outputs", True)
    emu.configure()
    yield
    emu.configure()


# ---------------------------------------------------------------------------------------------
# Fragment maps: PTX ISA (emulator) against CuTe

@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("operand", ["a", "b", "c"])
def test_mma_fragments_match_cute(operand, bf16):
    ours = E.mma_fragment(operand)
    cute = E.cute_mma_fragment(operand, bf16)
    assert len(ours) == 32
    for lane in range(32):
        assert [tuple(x) for x in ours[lane]] == [tuple(x) for x in cute[lane]], (operand, lane)
    # Each element of the operand is owned by exactly one (lane, value).
    cells = {tuple(x) for lane in ours for x in lane}
    rows, cols = {"a": (16, 16), "b": (16, 8), "c": (16, 8)}[operand]
    assert cells == {(r, c) for r in range(rows) for c in range(cols)}


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("matrices", [1, 2, 4])
def test_ldmatrix_fragments_match_cute(matrices, trans):
    ours = E.ldmatrix_fragment(matrices, trans)
    cute = E.cute_ldmatrix_fragment(matrices, trans)
    for lane in range(32):
        assert [tuple(x) for x in ours[lane]] == [tuple(x) for x in cute[lane]], lane
    cells = {tuple(x) for lane in ours for x in lane}
    assert cells == {(m, r, c) for m in range(matrices) for r in range(8) for c in range(8)}


# ---------------------------------------------------------------------------------------------
# Counters against the tile planner

def _inputs(c: Case):
    gen = torch.Generator().manual_seed(3)
    def t(*shape):
        return torch.randn(*shape, generator=gen).to(c.dtype)
    q = t(c.batch, *c.shape, c.heads, c.dim)
    k, v = t(c.batch, *c.shape, c.kv_heads, c.dim), t(c.batch, *c.shape, c.kv_heads, c.dim_v)
    ak = av = None
    if c.additional:
        ak = t(c.batch, c.additional, c.kv_heads, c.dim)
        av = t(c.batch, c.additional, c.kv_heads, c.dim_v)
    return q, k, v, ak, av


COUNTER_CASES = [
    Case(1, (56, 56), 2, 2, 32, 32, (7, 7), (1, 1), (1, 1), (False, False), 0, torch.float16, 0),
    Case(2, (20, 24), 4, 2, 64, 64, (5, 9), (2, 3), (2, 1), (True, False), 37, torch.bfloat16, 0),
    Case(1, (5, 9, 12), 2, 1, 128, 128, (3, 5, 5), (1, 5, 2), (1, 1, 2), (False, True, False), 0,
         torch.float16, 0),
    Case(1, (300,), 2, 2, 256, 256, (77,), (4,), (3,), (False,), 70, torch.bfloat16, 0),
]


@pytest.mark.parametrize("c", COUNTER_CASES, ids=lambda c: f"{len(c.shape)}d-hd{c.dim}")
def test_forward_counters_match_tile_plan(c):
    q, k, v, ak, av = _inputs(c)
    window = _native.Window(c.kernel_size, c.stride, c.dilation, c.is_causal, c.dim ** -0.5)
    plan = E.cuda_plan(_native._params(q, k, v, ak, av, window, E)[0], False)
    assert plan["path"] == "tensor_core"
    emu.clear_launches()
    out, lse = nattn.neighborhood_attention(
        q, k, v, c.kernel_size, stride=c.stride, dilation=c.dilation, is_causal=c.is_causal,
        additional_keys=ak, additional_values=av, return_lse=True, backend="cuda-emu")
    (launch,) = emu.launches()
    assert "forward_kernel" in launch["kernel"]
    pad = [(1, 1, 1, 1, False)] * (3 - len(c.shape))
    axes = pad + [(n, ks, s, d, causal) for n, ks, s, d, causal in
                  zip(c.shape, c.kernel_size, c.stride, c.dilation, c.is_causal)]
    q_tiles, visited, _, _ = _native._C.tile_plan_summary(axes, plan["q_box"], plan["kv_box"])
    assert q_tiles == plan["q_tiles"]
    m, n, d = plan["block_m"], plan["block_n"], c.dim
    add_tiles = -(-c.additional // n)
    pairs = c.batch * c.heads * (visited + q_tiles * add_tiles)
    # S = Q K^T: (m/16)(n/8)(d/16) mma.m16n8k16; O += P V: (m/16)(d/8)(n/16).
    assert launch["mma"] == pairs * (m * n * d) // 1024
    # cp.async: the Q tile once per work item, then K and V per visited tile (2-byte elements).
    assert launch["cp_async_bytes"] == 2 * d * (c.batch * c.heads * q_tiles * m + pairs * 2 * n)
    # Every output element and lse entry stored exactly once.
    assert launch["global_store_bytes"] == out.numel() * 2 + lse.numel() * 4


# ---------------------------------------------------------------------------------------------
# Every shipped instantiation runs (and is right)

def _small(dtype, dim, dim_v=None):
    return Case(1, (9, 10), 2, 1, dim, dim if dim_v is None else dim_v, (3, 5), (1, 2), (2, 1),
                (False, True), 3, dtype, 8)


INSTANTIATIONS = (
    [(dt, d, True) for dt in (torch.float16, torch.bfloat16) for d in (32, 64, 128)]
    + [(dt, 256, False) for dt in (torch.float16, torch.bfloat16)]
)


@pytest.mark.parametrize("dtype,dim,backward", INSTANTIATIONS,
                         ids=lambda x: str(x).replace("torch.", ""))
def test_every_tensor_core_instantiation_runs(dtype, dim, backward):
    emu.clear_launches()
    check_case(_small(dtype, dim), seed=dim, target="cuda-emu")
    names = " ".join(launch["kernel"] for launch in emu.launches())
    element = "cutlass::half_t" if dtype == torch.float16 else "cutlass::bfloat16_t"
    assert f"forward_kernel<nattn::cuda::sm80::KernelTraits<{element}, {dim}," in names
    if backward:
        for kernel in ("dq_kernel", "dkdv_kernel"):
            assert f"{kernel}<nattn::cuda::sm80::KernelTraits<{element}, {dim}," in names
    else:  # head dim 256: the backward runs on the SIMT kernels
        assert "simt" in names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simt_kernels_run(dtype):
    emu.clear_launches()
    check_case(_small(dtype, 24, 40), seed=5, target="cuda-emu")
    names = [launch["kernel"] for launch in emu.launches()]
    assert names and all("sm80" not in n for n in names), names


def test_emulated_arch_sets_the_shared_memory_limit():
    c = _small(torch.float16, 256)
    q, k, v, ak, av = _inputs(c)
    window = _native.Window(c.kernel_size, c.stride, c.dilation, c.is_causal, 0.1)
    p = _native._params(q, k, v, ak, av, window, E)[0]
    assert E.cuda_plan(p, False)["path"] == "tensor_core"
    emu.configure(arch=90)
    assert E.cuda_plan(p, False, 90, 227 * 1024)["shared_bytes"] <= 227 * 1024
    with pytest.raises(ValueError, match="NATTN_EMU_ARCH"):
        emu.configure(arch=75)
    with pytest.raises(ValueError, match="order"):
        emu.configure(order="sideways")


def test_simt_shared_memory_limit_is_a_reason():
    """A head dim whose SIMT accumulators exceed the CTA's shared memory gets a reason from
    cuda_plan and a clear error, not a failed launch."""
    q = torch.randn(1, 6, 1, 12000)
    window = _native.Window((3,), (1,), (1,), (False,), 0.1)
    plan = E.cuda_plan(_native._params(q, q, q, None, None, window, E)[0], False)
    assert plan["path"] == "none" and "too large for the SIMT kernels" in plan["unsupported"]
    with pytest.raises(RuntimeError, match="bytes of shared memory per CTA, the device allows"):
        nattn.na1d(q, q, q, 3, backend="cuda-emu")


def test_auto_never_picks_the_emulator():
    q = torch.randn(1, 8, 2, 32)
    assert "cuda-emu" in nattn.backends.names()
    problem = nattn.backends.Problem.from_tensors(
        q, q, q, _native.Window((3,), (1,), (1,), (False,), 0.1))
    assert nattn.backends.choose(problem).name != "cuda-emu"


# ---------------------------------------------------------------------------------------------
# Planted defects

DEFECTS = {
    "ldmatrix_after_wait": "ok",
    "ldmatrix_before_wait": "reads shared memory that a cp.async is still writing",
    "plain_read_before_wait": "read the NaN pattern",
    "with_syncthreads": "ok",
    "missing_syncthreads": "a shared-memory race",
    "divergent_shuffle": "divergent warp collective in warp 0: lanes 0-15 wait at "
                         "shfl.sync.bfly, lane 16 arrives at bar.warp.sync",
    "partial_barrier": "a barrier not reached by every thread (deadlock): threads 0-63: "
                       "bar.sync 0 (128 threads expected); threads 64-127: exited",
    "partial_warp": "names lanes 16-31, which this partial warp of 16 threads does not have",
    "shared_over_48k": "65536 bytes of dynamic shared memory, over the 49152 allowed",
    "shared_over_48k_opted_in": "ok",
    "shared_over_arch_limit": "over the 166912 bytes sm_80 allows",
    "block_over_1024": "1056 threads per block (limit 1024)",
    "grid_y_over_65535": "grid (1, 65536, 1) is outside",
    "mma_fragment": "ok",
    "swapped_fragment": "of the mma result differ from A.B",
}


@pytest.fixture(scope="module")
def defects_binary(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    info = E.build_info()
    # The CuTe headers of the test environment (the build's may have been in pip's deleted
    # isolated environment); the CUDA headers and Boost are the build's.
    cutlass = cutlass_include() or info["cutlass_include"]
    if not Path(cutlass, "cute").is_dir():
        pytest.skip("needs the CUTLASS/CuTe headers (pip install '.[cuda-test]' or set "
                    "NATTN_CUTLASS_INCLUDE): the build's were in pip's deleted build environment")
    exe = tmp_path_factory.mktemp("emu") / "defects"
    cmd = [cxx, "-std=c++17", "-O1", "-DNATTN_EMU", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'include'}",
           "-isystem", cutlass, "-isystem", info["cuda_include"],
           "-isystem", str(Path(info["cuda_include"]) / "cccl")]
    if info["boost_include"] not in ("/usr/include", "/usr/local/include"):
        cmd += ["-isystem", info["boost_include"]]  # (a system directory must stay last)
    cmd += [str(ROOT / "tests/emu/defects.cpp"), str(ROOT / "csrc/emu/runtime.cpp"),
           str(ROOT / "csrc/emu/sm80_ops.cpp"), info["boost_context_library"], "-ldl",
           "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(line.split(": ", 1) for line in result.stdout.splitlines())


@pytest.mark.parametrize("case", list(DEFECTS))
def test_planted_defect_is_caught(defects_binary, case):
    outcome = defects_binary[case]
    expected = DEFECTS[case]
    if expected == "ok":
        assert outcome == "ok", outcome
    else:
        assert expected in outcome, outcome


# ---------------------------------------------------------------------------------------------
# SM90: wgmma fragments and descriptors (PTX ISA, emulator) against CuTe's GMMA layouts

@pytest.mark.parametrize("operand", ["a", "c"])
def test_wgmma_fragments_match_cute(operand):
    ours = E.wgmma_fragment(operand, 128)
    cute = E.cute_wgmma_fragment(operand)
    assert len(ours) == 128
    for t in range(128):
        assert [tuple(x) for x in ours[t]] == [tuple(x) for x in cute[t]], (operand, t)
    cells = {tuple(x) for t in ours for x in t}
    rows, cols = (64, 16) if operand == "a" else (64, 128)
    assert cells == {(r, c) for r in range(rows) for c in range(cols)}


@pytest.mark.parametrize("major", ["K", "MN"])
@pytest.mark.parametrize("swizzle", ["SW128", "SW64", "SW32", "INTER"])
def test_wgmma_descriptor_decoding_matches_cute(swizzle, major):
    """CuTe lays out a 64 x 64 fp16 tile with Layout_{major}_{swizzle}_Atom and builds the
    wgmma descriptors of its four k-blocks as A and as B operand; the emulator decodes each
    descriptor per the ISA (start, LBO, SBO, swizzle mode, K- or MN-major) into the address of
    every element, which must be where CuTe's layout puts it."""
    r = E.wgmma_descriptor_probe(swizzle, major)
    assert r["compared"] == 2 * 4 * 64 * 16
    assert r["mismatches"] == [], r["mismatches"][:4]
    mode = {"SW128": 1, "SW64": 2, "SW32": 3, "INTER": 0}[swizzle]
    assert {d >> 62 for d in r["descriptors"]} == {mode}


# ---------------------------------------------------------------------------------------------
# SM90: TMA and the emulated driver's cuTensorMapEncodeTiled

F16, INT32 = 6, 3  # CUtensorMapDataType values (cuda.h)


def test_tensor_map_encoder_checks_the_documented_rules():
    base = torch.zeros(1 << 16, dtype=torch.float16)
    a = base.data_ptr()
    ok = dict(type=F16, rank=3, address=a, dim=[64, 32, 4], strides=[128, 4096], box=[64, 8, 1],
              element_strides=[1, 1, 1], interleave=0, swizzle=3)

    def code(**kw):
        args = dict(ok, **kw)
        return E.encode_tensor_map(**args)

    assert code() == (0, "")
    assert code(dim=[64, 32, 1 << 32])[0] == 0
    bad = {
        "globalAddress must be 16-byte aligned": dict(address=a + 8),
        "tensorRank 6": dict(rank=6, dim=[1] * 6, box=[8] + [1] * 5, element_strides=[1] * 6,
                             strides=[16] * 5),
        "globalDim[1] = 0": dict(dim=[64, 0, 4]),
        "globalDim[2] = 4294967297": dict(dim=[64, 32, (1 << 32) + 1]),
        "globalStrides[0] = 120": dict(strides=[120, 4096]),
        "globalStrides[1] = 1099511627776": dict(strides=[128, 1 << 40]),
        "boxDim[1] = 257": dict(box=[64, 257, 1]),
        "boxDim[1] = 0": dict(box=[64, 0, 1]),
        "must be a multiple of 16": dict(box=[4, 8, 1], swizzle=0),
        "elementStrides[2] = 9": dict(element_strides=[1, 1, 9]),
        "exceeds the swizzle span of 64 bytes": dict(swizzle=2),
        "exceeds the swizzle span of 32 bytes": dict(swizzle=1),
        "an interleaved layout needs tensorRank >= 3": dict(rank=2, dim=[64, 32], strides=[128],
                                                            box=[64, 8], element_strides=[1, 1],
                                                            interleave=1, swizzle=0),
        "CU_TENSOR_MAP_INTERLEAVE_32B needs CU_TENSOR_MAP_SWIZZLE_32B": dict(interleave=2),
        "needs a floating-point type": dict(type=INT32, box=[32, 8, 1], oob=1),
    }
    for why, kw in bad.items():
        result, message = code(**kw)
        assert result == 1, (why, result)  # CUDA_ERROR_INVALID_VALUE
        assert why in message, (why, message)


def _box(t, coords, box, estrides):
    """The box of fp16 tensor `t` (dims innermost first) at `coords`, elements outside the
    tensor zero, as TMA defines it: ceil(box / elementStride) elements per dim (dim 0 unstrided)."""
    rank = len(box)
    counts = [box[0]] + [-(-box[i] // estrides[i]) for i in range(1, rank)]
    out = torch.zeros(list(reversed(counts)), dtype=torch.float16)
    for idx in itertools.product(*[range(n) for n in reversed(counts)]):
        c = [coords[i] + (idx[rank - 1 - i] * (estrides[i] if i else 1)) for i in range(rank)]
        if all(0 <= c[i] < t.shape[rank - 1 - i] for i in range(rank)):
            out[tuple(idx)] = t[tuple(reversed(c))]
    return out.flatten()


@pytest.mark.parametrize("swizzle", [0, 1, 2, 3])
def test_tma_load_box(swizzle):
    """Boxes of a 4-D fp16 tensor loaded by the emulated TMA: partly out of bounds (zero fill,
    negative coordinates too), element strides on outer dims, every swizzle mode; read back
    through CuTe's swizzle atom of the same mode. Completion goes through the mbarrier's
    transaction count (the probe waits on phase 0 of a barrier expecting the box's bytes)."""
    span = {0: 32, 1: 32, 2: 64, 3: 128}[swizzle]
    inner = span // 2
    t = torch.randn(5, 7, 11, inner + 8, dtype=torch.float16)  # dims: D, x, y, z (D innermost)
    t = t[..., :inner + 3]  # a view: row strides are the storage's
    dims = [inner + 3, 11, 7, 5]
    strides = [2 * t.stride(2), 2 * t.stride(1), 2 * t.stride(0)]
    box, estrides = [inner, 8, 3, 2], [1, 1, 2, 1]
    for coords in ([0, 0, 0, 0], [5, 6, 5, 4], [-3, -2, 1, -1], [0, 4, 6, 3]):
        got = E.tma_load_box(t.data_ptr(), dims, strides, box, estrides, swizzle, coords)
        want = _box(t, coords, box, estrides)
        assert torch.equal(torch.tensor(got, dtype=torch.int32),
                           want.view(torch.int16).to(torch.int32) & 0xFFFF), (coords, swizzle)


# ---------------------------------------------------------------------------------------------
# SM90: the Hopper forward's counters against its tile planner

HOPPER_COUNTER_CASES = [
    Case(1, (20, 24), 4, 2, 64, 64, (5, 9), (2, 3), (2, 1), (True, False), 0, torch.bfloat16, 0),
    Case(1, (5, 9, 12), 2, 1, 128, 128, (3, 5, 5), (1, 5, 2), (1, 1, 2), (False, True, False), 0,
         torch.float16, 0),
]


@pytest.mark.parametrize("c", HOPPER_COUNTER_CASES, ids=lambda c: f"{len(c.shape)}d-hd{c.dim}")
def test_hopper_forward_counters_match_tile_plan(c, monkeypatch):
    monkeypatch.setenv("NATTN_EMU_ARCH", "90")
    emu.configure()
    q, k, v, _, _ = _inputs(c)
    emu.clear_launches()
    out, lse = nattn.neighborhood_attention(
        q, k, v, c.kernel_size, stride=c.stride, dilation=c.dilation, is_causal=c.is_causal,
        return_lse=True, backend="cuda-emu")
    (launch,) = emu.launches()
    assert "sm90::forward_kernel" in launch["kernel"] and launch["block"] == [384, 1, 1]
    axes = [(n, ks, s, d, causal) for n, ks, s, d, causal in
            zip(c.shape, c.kernel_size, c.stride, c.dilation, c.is_causal)]
    _, _, q_tiles, visited, _, _ = _native._C.sm90_choose_tiles(axes)
    work = c.batch * c.heads
    d = c.dim
    # Per visited (Q tile, KV tile) pair, each of the 2 consumer warpgroups issues d/16
    # m64n128k16 for S = Q K^T and 128/16 m64n{d}k16 for O += P V.
    assert launch["wgmma"] == work * visited * 2 * (d // 16 + 8)
    # TMA: the 128-row Q tile once per CTA, a 128-row K and V tile per visited pair.
    assert launch["tma_bytes"] == 2 * d * 128 * work * (q_tiles + 2 * visited)
    assert launch["grid"] == [q_tiles * c.heads, c.batch, 1]
    assert launch["global_store_bytes"] == out.numel() * 2 + lse.numel() * 4
    assert launch["mma"] == 0 and launch["cp_async_bytes"] == 0


HOPPER_BACKWARD_COUNTER_CASES = HOPPER_COUNTER_CASES + [
    Case(2, (30,), 2, 2, 32, 32, (9,), (1,), (3,), (False,), 0, torch.float16, 0),
    # 130 additional tokens: 2 additional tiles
    Case(1, (9, 20), 4, 2, 64, 64, (3, 7), (1, 1), (1, 2), (False, True), 130, torch.bfloat16, 0),
]


@pytest.mark.parametrize("c", HOPPER_BACKWARD_COUNTER_CASES,
                         ids=lambda c: f"{len(c.shape)}d-hd{c.dim}")
def test_hopper_backward_counters_match_tile_plan(c, monkeypatch):
    """The Hopper backward's two kernels against the tile planner: the dQ kernel visits the
    forward's (Q tile, KV tile) pairs, the dK/dV kernel the same pairs from the key side (the
    inverse walk) for each query head, and nothing more."""
    monkeypatch.setenv("NATTN_EMU_ARCH", "90")
    emu.configure()
    q, k, v, ak, av = _inputs(c)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if c.additional:
        ak, av = (t.detach().requires_grad_() for t in (ak, av))
    out = nattn.neighborhood_attention(
        q, k, v, c.kernel_size, stride=c.stride, dilation=c.dilation, is_causal=c.is_causal,
        additional_keys=ak, additional_values=av, backend="cuda-emu")
    g_out = torch.randn_like(out)
    emu.clear_launches()
    out.backward(g_out)
    launches = [r for r in emu.launches() if "sm90::backward_kernel" in r["kernel"]]
    assert len(launches) == 2, [r["kernel"] for r in emu.launches()]
    dq_launch, dkdv_launch = launches
    assert ", false>" in dq_launch["kernel"] and ", true>" in dkdv_launch["kernel"]
    axes = [(n, ks, s, d, causal) for n, ks, s, d, causal in
            zip(c.shape, c.kernel_size, c.stride, c.dilation, c.is_causal)]
    _, _, q_tiles, visited, _, _ = _native._C.sm90_choose_tiles(axes)
    work = c.batch * c.heads
    d = c.dim
    tile_bytes = 128 * d * 2
    # Additional tokens: every Q tile also pairs with each of their tiles (dQ: after its walk;
    # dK/dV: one more CTA per additional tile walking every Q tile).
    add_tiles = (c.additional + 127) // 128
    pairs = visited + q_tiles * add_tiles
    # Per pair, each of the 2 consumer warpgroups takes the streamed tile in 2 halves of 64
    # rows: S and dP are d/16 m64n64k16 each, dQ += dS K is 64/16 m64n{d}k16, and the dK/dV
    # kernel's dV += P^T dO and dK += dS^T Q are 4 each.
    assert dq_launch["wgmma"] == work * pairs * 2 * 2 * (2 * d // 16 + 4)
    assert dkdv_launch["wgmma"] == work * pairs * 2 * 2 * (2 * d // 16 + 8)
    assert dq_launch["grid"] == [q_tiles * c.heads, c.batch, 1]
    kv_tiles = dkdv_launch["grid"][0] // c.kv_heads - add_tiles
    assert dkdv_launch["grid"] == [(kv_tiles + add_tiles) * c.kv_heads, c.batch, 1]
    # TMA: the resident pair once per CTA, the streamed pair once per pair (dK/dV: per query
    # head of the group).
    assert dq_launch["tma_bytes"] == 2 * tile_bytes * work * (q_tiles + pairs)
    assert dkdv_launch["tma_bytes"] == 2 * tile_bytes * (
        c.batch * c.kv_heads * (kv_tiles + add_tiles) + work * pairs)
    assert dq_launch["global_store_bytes"] == q.grad.numel() * 2
    add_bytes = (ak.grad.numel() + av.grad.numel()) * 2 if c.additional else 0
    assert dkdv_launch["global_store_bytes"] == (k.grad.numel() + v.grad.numel()) * 2 + add_bytes
    for launch in launches:
        assert launch["mma"] == 0 and launch["cp_async_bytes"] == 0


# ---------------------------------------------------------------------------------------------
# SM90 planted defects (tests/emu/defects_sm90.cpp)

SM90_DEFECTS = {
    "wgmma_after_wait": "ok",
    "wgmma_read_before_wait": "read the NaN pattern: accumulators read before wgmma.wait_group",
    "wgmma_without_fence": "without a wgmma.fence",
    "tma_into_busy_stage": "writes shared memory that a wgmma in flight",
    "wgmma_before_tma_wait": "wgmma reads the B operand from shared memory that a copy has not "
                             "completed",
    "mbarrier_complete": "ok",
    "mbarrier_never_completes": "deadlock, every live thread waits: threads 0-63: "
                                "mbarrier.try_wait.parity 0 on the mbarrier at shared address "
                                "0x480 (phase 0, 1 of 2 arrivals pending, transaction count 0)",
    "mbarrier_phase_overtaken": "mbarrier.try_wait.parity 0 on the mbarrier at shared address "
                                "0x480 (phase 2, 1 of 1 arrivals pending",
    "setmaxnreg_split": "ok",
    "setmaxnreg_over_register_file": "setmaxnreg.inc 240 in warpgroup",
    "setmaxnreg_not_uniform": "disagree on the register count",
}


@pytest.fixture(scope="module")
def sm90_defects_binary(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    info = E.build_info()
    cutlass = cutlass_include() or info["cutlass_include"]
    exe = tmp_path_factory.mktemp("emu90") / "defects_sm90"
    cmd = [cxx, "-std=c++17", "-O1", "-DNATTN_EMU", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'include'}",
           "-isystem", cutlass, "-isystem", info["cuda_include"],
           "-isystem", str(Path(info["cuda_include"]) / "cccl")]
    if info["boost_include"] not in ("/usr/include", "/usr/local/include"):
        cmd += ["-isystem", info["boost_include"]]
    cmd += [str(ROOT / "tests/emu/defects_sm90.cpp"), str(ROOT / "csrc/emu/runtime.cpp"),
            str(ROOT / "csrc/emu/sm90_ops.cpp"), info["boost_context_library"], "-ldl",
            "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout + build.stderr
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(line.split(": ", 1) for line in result.stdout.splitlines())


@pytest.mark.parametrize("case", list(SM90_DEFECTS))
def test_sm90_planted_defect_is_caught(sm90_defects_binary, case):
    outcome = sm90_defects_binary[case]
    expected = SM90_DEFECTS[case]
    if expected == "ok":
        assert outcome == "ok", outcome
    else:
        assert expected in outcome, outcome


@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_tma_load_box_ranks(rank):
    """1- to 5-D boxes (128-byte swizzle), out of bounds at both ends of every dim."""
    sizes = [70, 9, 5, 3, 2][:rank]
    # rows of 70 elements in storage rows of 72 (strides must be multiples of 16 bytes)
    t = torch.randn(*reversed(sizes[1:]), 72, dtype=torch.float16)[..., :70]
    strides = [2 * t.stride(rank - 1 - i) for i in range(1, rank)]
    box = [64, 8, 4, 2, 2][:rank]
    estrides = [1, 1, 2, 1, 1][:rank]
    for coords in ([0] * rank, [-5, -3, 3, 2, 1][:rank], [10, 4, -1, -1, 0][:rank]):
        got = E.tma_load_box(t.data_ptr(), sizes, strides, box, estrides, 3, coords)
        want = _box(t, coords, box, estrides)
        assert torch.equal(torch.tensor(got, dtype=torch.int32),
                           want.view(torch.int16).to(torch.int32) & 0xFFFF), coords
