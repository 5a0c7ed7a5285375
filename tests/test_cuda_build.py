"""Compile checks of the SM80 tensor-core kernels that need nvcc but no GPU.

- The kernels compile to PTX for sm_80 and sm_90a, and the PTX holds the instructions the design
  relies on: mma.sync m16n8k16 (tensor cores), ldmatrix (plain and .trans) and cp.async.
- The register renumbering that feeds a score tile back into the next GEMM as its A operand
  (sm80_kernel_common.cuh: scores_as_a) and the per-thread row slots (ThreadRows) agree with
  CuTe's own fragment layouts, checked on the host for every thread.

One fp16/bf16 instantiation of each kernel is compiled (about a minute per target on 2 cores);
skipped when nvcc or the CUTLASS/CuTe headers are missing.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import cutlass_include

ROOT = Path(__file__).resolve().parents[1]


NVCC = shutil.which("nvcc")
CUTLASS = cutlass_include()
pytestmark = pytest.mark.skipif(
    NVCC is None or CUTLASS is None, reason="needs nvcc and the CUTLASS/CuTe headers"
)


def _flags():
    return ["-std=c++17", "--expt-relaxed-constexpr", "-O3", f"-I{ROOT / 'include'}",
            f"-I{ROOT / 'csrc'}", "-isystem", CUTLASS]


KERNELS = """
#include "cuda/sm80/sm80_bwd_launch.cuh"
#include "cuda/sm80/sm80_fwd_launch.cuh"
namespace nattn::cuda::sm80 {
template std::string forward<DType::kBFloat16, 64>(const AttentionParams&);
template std::string backward<DType::kFloat16, 64>(const AttentionParams&);
}
"""


def test_ptx_has_tensor_core_instructions(tmp_path):
    src = tmp_path / "kernels.cu"
    src.write_text(KERNELS)
    jobs = {}
    for arch in ("sm_80", "sm_90a"):
        ptx = tmp_path / f"kernels_{arch}.ptx"
        cmd = [NVCC, *_flags(), f"-arch={arch}", "-ptx", str(src), "-o", str(ptx)]
        jobs[arch] = (ptx, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True))
    for arch, (ptx, proc) in jobs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{arch}:\n{log}"
        text = ptx.read_text()
        entries = [line for line in text.splitlines() if line.startswith(".visible .entry")]
        assert any("forward_kernel" in e for e in entries), arch
        assert any("dq_kernel" in e for e in entries) and any("dkdv_kernel" in e
                                                              for e in entries), arch
        assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in text, arch
        assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in text, arch
        assert "ldmatrix.sync.aligned.x4.m8n8.shared.b16" in text, arch
        assert "ldmatrix.sync.aligned.x4.trans.m8n8.shared.b16" in text, arch
        assert "cp.async.cg.shared.global" in text, arch
        assert "cp.async.wait_group" in text or "cp.async.wait_all" in text, arch


FRAGMENTS = r"""
#include <cstdio>
#include "cuda/sm80/sm80_kernel_common.cuh"
using namespace cute;
using namespace nattn::cuda::sm80;

template <class Traits>
int check() {
  constexpr int kM = Traits::kBlockM, kN = Traits::kBlockN, kD = Traits::kHeadDim;
  typename Traits::TiledMma mma;
  int bad = 0;
  for (int t = 0; t < Traits::kThreads; ++t) {
    auto thr = mma.get_slice(t);
    auto c = thr.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));
    auto a = thr.partition_A(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));
    auto o = thr.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kD>>{}));
    auto shape_a = partition_shape_A(mma, Shape<Int<kM>, Int<kN>>{});
    if (size(shape_a) != size(a) || size<2>(shape_a) != size<2>(a)) ++bad;
    // scores_as_a: A(v, m, k) = C(v % 4, m, 2k + v / 4), as (row, column) pairs.
    for (int m = 0; m < size<1>(a); ++m)
      for (int k = 0; k < size<2>(a); ++k)
        for (int v = 0; v < 8; ++v)
          if (a(v, m, k) != c(v % 4, m, 2 * k + v / 4)) ++bad;
    // ThreadRows: value v of m-tile m is in row slot 2m + v/2, in the score and output tiles.
    using Rows = ThreadRows<Traits>;
    int row[Rows::kSlots];
    for (int s = 0; s < Rows::kSlots; ++s) row[s] = get<0>(c(2 * (s % 2), s / 2, 0));
    for (int m = 0; m < size<1>(c); ++m)
      for (int n = 0; n < size<2>(c); ++n)
        for (int v = 0; v < 4; ++v) {
          if (get<0>(c(v, m, n)) != row[2 * m + v / 2]) ++bad;
          if (v % 2 == 1 && get<1>(c(v, m, n)) != get<1>(c(v - 1, m, n)) + 1) ++bad;
        }
    for (int m = 0; m < size<1>(o); ++m)
      for (int n = 0; n < size<2>(o); ++n)
        for (int v = 0; v < 4; ++v)
          if (get<0>(o(v, m, n)) != row[2 * m + v / 2]) ++bad;
  }
  return bad;
}

int main() {
  int bad = check<KernelTraits<half_t, 32, 64, 64>>() + check<KernelTraits<half_t, 128, 64, 64>>() +
            check<KernelTraits<bfloat16_t, 256, 64, 32>>();
  std::printf("mismatches %d\n", bad);
  return bad == 0 ? 0 : 1;
}
"""


def test_fragment_layouts_on_host(tmp_path):
    src = tmp_path / "fragments.cu"
    src.write_text(FRAGMENTS)
    exe = tmp_path / "fragments"
    build = subprocess.run([NVCC, *_flags(), "-arch=sm_80", str(src), "-o", str(exe)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mismatches 0" in result.stdout
