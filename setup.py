"""Build script: setuptools drives CMake (Ninja) to build the native modules nattn._C (and, on
request, nattn._emu).

Environment variables:
  NATTN_CUDA=0|1      CUDA part off / on. Default: on only when nvcc is found AND an NVIDIA
                      driver is present (/proc/driver/nvidia/version or libcuda), so a CPU-only
                      machine never spends minutes compiling kernels it cannot run.
                      NATTN_CUDA=1 compiles them anyway (CI, wheel builds).
  NATTN_CUDA_ARCH     CUDA targets, e.g. "80;90a" (the default); setting it turns the CUDA part on
  NATTN_PORTABLE_ARCH targets of the portable kernels (SM80 tensor-core, SIMT) alone; default:
                      NATTN_CUDA_ARCH. CI sets "80" to halve their compile time (a build for
                      Hopper GPUs needs 90a in it)
  NATTN_BUILD_JOBS    parallel compile jobs (default: CPU count)
  NATTN_EMU=1         also build nattn._emu, the CUDA kernels under the functional emulator
                      (backend cuda-emu; needs the CUDA headers and Boost.Context, no GPU)
  NATTN_CUDA_INCLUDE  CUDA headers for the emulator build (default: the CUDA toolkit's)

Build trees live outside the package, one per build environment: build/cmake/<key>, where the
key hashes the interpreter, cmake, ninja, pybind11 and CuTe paths and the options. pip's isolated
builds install cmake, ninja and pybind11 into a temporary environment that it deletes
afterwards; a build tree configured in one of those can never be reused (its CMakeCache names
the deleted tools), so such trees are pruned, and every environment gets its own. A
non-isolated build (`pip install --no-build-isolation .`) keeps its tree and rebuilds
incrementally.

What the build does is printed first (pip shows it with -v), and recorded with the commit in
nattn/_build_info.json next to the module (read by nattn.cli.common.build_info()).
"""

import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))
from nattn_build_choice import cuda_choice as _cuda_choice  # noqa: E402
from nattn_build_choice import emu_requested  # noqa: E402
from nattn_build_choice import nvcc as _nvcc  # noqa: E402


def _cutlass_include() -> str:
    """CUTLASS/CuTe headers shipped by the nvidia-cutlass wheel (a build requirement)."""
    try:
        import cutlass_library
    except ImportError:
        return ""
    path = Path(cutlass_library.__file__).parent / "source" / "include"
    return str(path) if (path / "cute").is_dir() else ""


def _count(*patterns: str) -> int:
    return sum(len(list(ROOT.glob(p))) for p in patterns)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _commit() -> str:
    head = _git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    return head + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def _say(msg: str) -> None:
    print(f"nattn build: {msg}", flush=True)


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _prune_stale(parent: Path) -> None:
    """Remove build trees whose recorded tools are gone (a finished isolated build's)."""
    if not parent.is_dir():
        return
    for tree in parent.iterdir():
        stamp = tree / "nattn_env.json"
        try:
            tools = json.loads(stamp.read_text())["tools"]
        except (OSError, ValueError, KeyError):
            tools = None
        if tools is None or not all(Path(t).exists() for t in tools if t):
            shutil.rmtree(tree, ignore_errors=True)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        import pybind11

        cuda, why = _cuda_choice()
        emu = emu_requested()
        arch = os.environ.get("NATTN_CUDA_ARCH", "80;90a")
        portable_arch = os.environ.get("NATTN_PORTABLE_ARCH", "") or arch
        cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
        if not cmake or not ninja:
            raise SystemExit("nattn build: cmake and ninja are needed (pip installs both as "
                             "build requirements; with --no-build-isolation install them: "
                             "pip install cmake ninja)")
        if (cuda == "ON" or emu) and not _cutlass_include():
            raise SystemExit("nattn build: the CUDA kernels and the emulator need the CuTe "
                             "headers: pip install nvidia-cutlass==4.2.0.0 (an isolated build "
                             "installs it itself)")
        args = [
            f"-S{ROOT}",
            "-GNinja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DNATTN_CUDA={cuda}",
            f"-DNATTN_CUTLASS_INCLUDE={_cutlass_include()}",
            f"-DNATTN_EMU={'ON' if emu else 'OFF'}",
        ]
        if os.environ.get("NATTN_CUDA_INCLUDE"):
            args.append(f"-DNATTN_CUDA_INCLUDE={os.environ['NATTN_CUDA_INCLUDE']}")
        if cuda == "ON":
            args.append(f"-DNATTN_CUDA_ARCH={arch}")
            args.append(f"-DNATTN_PORTABLE_ARCH={portable_arch}")
            if not shutil.which("nvcc") and _nvcc():
                args.append(f"-DCMAKE_CUDA_COMPILER={_nvcc()}")
        tools = [sys.executable, cmake, ninja, pybind11.get_cmake_dir(), _cutlass_include()]
        key = hashlib.sha1("\n".join(tools + args).encode()).hexdigest()[:12]
        parent = ROOT / "build" / "cmake"
        _prune_stale(parent)
        build_dir = parent / key
        build_dir.mkdir(parents=True, exist_ok=True)
        (build_dir / "nattn_env.json").write_text(json.dumps({"tools": tools, "args": args}))

        jobs = os.environ.get("NATTN_BUILD_JOBS", str(os.cpu_count() or 1))
        cpp = _count("csrc/bindings*.cpp", "csrc/cpu/*.cpp")
        plan = [f"nattn._C ({cpp} C++ files)"]
        if cuda == "ON":
            cu = _count("csrc/cuda/common/*.cu", "csrc/cuda/sm80/*.cu")
            sm90 = _count("csrc/cuda/sm90/*.cu") if "90a" in arch.split(";") else 0
            plan.append(f"CUDA kernels ({cu} .cu files for sm_{portable_arch.replace(';', ', sm_')}"
                        f" + {sm90} for sm_90a; about 10 min on 2 cores, 2 min on 16)")
        if emu:
            plan.append("nattn._emu (the CUDA kernels as C++ under the emulator, NATTN_EMU=1)")
        _say("builds " + "; ".join(plan) + f" with {jobs} jobs")
        _say(f"CUDA part {cuda}: {why}")
        _say(f"build tree {build_dir}")
        subprocess.run([cmake, f"-B{build_dir}", *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)
        info = {
            "version": self.distribution.get_version(),
            "commit": _commit(),
            "built": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cuda": cuda == "ON",
            "cuda_arch": arch if cuda == "ON" else "",
            "portable_arch": portable_arch if cuda == "ON" else "",
            "cuda_choice": why,
            "emu": emu,
            "python": sys.version.split()[0],
        }
        (out_dir / "_build_info.json").write_text(json.dumps(info, indent=1) + "\n")
        _say(f"done: {json.dumps(info)}")


setup(
    ext_modules=[CMakeExtension("nattn._C")],
    cmdclass={"build_ext": CMakeBuild},
)
