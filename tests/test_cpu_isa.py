"""The CPU kernels at every instruction-set level the machine has.

The block kernels are compiled for baseline x86-64, AVX2 (x86-64-v3) and AVX-512 (x86-64-v4),
and the bf16 lane forward for AVX-512 with AVX512-BF16 (avx512bf16); a process runs the best
level its CPU has unless NATTN_CPU_ISA names a lower one. The level is
chosen once per process, so each lower level reruns tests/test_cpu.py (the fp64 sweep, gradcheck,
fp32/fp16/bf16 error ratios, large scores, bit-identical backward schedules) in a subprocess
with NATTN_CPU_ISA set; the default level is what the rest of the suite runs.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

C = pytest.importorskip("nattn._C")

LEVELS = ["baseline", "avx2", "avx512", "avx512bf16"]
HERE = Path(__file__).resolve().parent


def _env(isa):
    env = dict(os.environ)
    env["NATTN_CPU_ISA"] = isa
    return env


def _best_level() -> str:
    env = dict(os.environ)
    env.pop("NATTN_CPU_ISA", None)
    out = subprocess.run([sys.executable, "-c", "import nattn._C as C; print(C.cpu_isa())"],
                         env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_default_level_is_the_best_or_the_requested_one():
    requested = os.environ.get("NATTN_CPU_ISA")
    assert C.cpu_isa() == (requested or _best_level())
    assert C.cpu_isa() in LEVELS


@pytest.mark.parametrize("isa", LEVELS[:-1])
def test_cpu_kernels_at_lower_level(isa):
    best = _best_level()
    if LEVELS.index(isa) >= LEVELS.index(best):
        pytest.skip(f"the default run covers {best}; {isa} is not below it")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(HERE / "test_cpu.py"), __file__,
         "-q", "-p", "no:cacheprovider", "-k", "not lower_level"],
        env=_env(isa), capture_output=True, text=True, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


@pytest.mark.parametrize("value, message", [
    ("sse9", "is not one of baseline, avx2, avx512, avx512bf16"),
])
def test_bad_isa_request_is_a_clear_error(value, message):
    code = ("import torch, nattn\n"
            "q = torch.randn(1, 8, 1, 4)\n"
            "try:\n"
            "    nattn.na1d(q, q, q, 3)\n"
            "except RuntimeError as e:\n"
            "    print('RuntimeError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=_env(value), capture_output=True,
                         text=True, check=True).stdout
    assert "RuntimeError: NATTN_CPU_ISA='sse9'" in out and message in out
