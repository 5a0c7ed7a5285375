"""Build script: setuptools drives CMake (Ninja) to build the one native module, nattn._C.

Environment variables:
  NATTN_CUDA=0|1      force the CUDA part off / on (default: on when nvcc is found)
  NATTN_CUDA_ARCH     CUDA targets, e.g. "80;90a" (default); setting it turns the CUDA part on
  NATTN_BUILD_JOBS    parallel compile jobs (default: CPU count)
  NATTN_EMU=1         also build nattn._emu, the CUDA kernels under the functional emulator
                      (backend cuda-emu; needs the CUDA headers and Boost.Context, no GPU)
  NATTN_CUDA_INCLUDE  CUDA headers for the emulator build (default: the CUDA toolkit's)
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cutlass_include() -> str:
    """CUTLASS/CuTe headers shipped by the nvidia-cutlass wheel (a build requirement)."""
    try:
        import cutlass_library
    except ImportError:
        return ""
    path = Path(cutlass_library.__file__).parent / "source" / "include"
    return str(path) if (path / "cute").is_dir() else ""


def _cuda_mode() -> str:
    flag = os.environ.get("NATTN_CUDA", "").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return "OFF"
    if flag in ("1", "on", "true", "yes") or os.environ.get("NATTN_CUDA_ARCH"):
        return "ON"
    return "AUTO"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11

        args = [
            f"-S{ROOT}",
            f"-B{build_dir}",
            "-GNinja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DNATTN_CUDA={_cuda_mode()}",
            f"-DNATTN_CUTLASS_INCLUDE={_cutlass_include()}",
        ]
        if os.environ.get("NATTN_EMU", "").strip().lower() in ("1", "on", "true", "yes"):
            args.append("-DNATTN_EMU=ON")
        if os.environ.get("NATTN_CUDA_INCLUDE"):
            args.append(f"-DNATTN_CUDA_INCLUDE={os.environ['NATTN_CUDA_INCLUDE']}")
        if os.environ.get("NATTN_CUDA_ARCH"):
            args.append(f"-DNATTN_CUDA_ARCH={os.environ['NATTN_CUDA_ARCH']}")
        if shutil.which("nvcc") is None and Path("/usr/local/cuda/bin/nvcc").exists():
            args.append("-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc")
        jobs = os.environ.get("NATTN_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(
    ext_modules=[CMakeExtension("nattn._C")],
    cmdclass={"build_ext": CMakeBuild},
)
