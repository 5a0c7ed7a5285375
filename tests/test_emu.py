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

Skipped without a NATTN_EMU=1 build.
"""

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
