"""What a nattn build compiles, decided from the environment (shared by setup.py and the build
backend, tools/nattn_build_backend.py)."""

import ctypes.util
import os
import shutil
from pathlib import Path

TRUE = ("1", "on", "true", "yes")
FALSE = ("0", "off", "false", "no")


def nvcc() -> str:
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else ""


def driver() -> str:
    """Where an NVIDIA driver was seen, or "" (no GPU driver on this machine)."""
    if Path("/proc/driver/nvidia/version").exists():
        return "/proc/driver/nvidia/version"
    return ctypes.util.find_library("cuda") or ""


def emu_requested() -> bool:
    return os.environ.get("NATTN_EMU", "").strip().lower() in TRUE


def cuda_choice():
    """("ON" | "OFF", why): NATTN_CUDA=0/1 decides; NATTN_CUDA_ARCH turns it on; otherwise on
    only when nvcc is found and an NVIDIA driver is present."""
    flag = os.environ.get("NATTN_CUDA", "").strip().lower()
    if flag in FALSE:
        return "OFF", "NATTN_CUDA=0"
    if flag in TRUE:
        return "ON", "NATTN_CUDA=1"
    if flag:
        raise SystemExit(f"nattn build: NATTN_CUDA={flag!r}: use 0 or 1")
    if os.environ.get("NATTN_CUDA_ARCH"):
        return "ON", "NATTN_CUDA_ARCH is set"
    found, drv = nvcc(), driver()
    if not found:
        return "OFF", "no nvcc found (NATTN_CUDA=1 with a CUDA toolkit compiles the kernels)"
    if not drv:
        return "OFF", (f"nvcc found ({found}) but no NVIDIA driver on this machine; "
                       "NATTN_CUDA=1 compiles the CUDA kernels anyway")
    return "ON", f"nvcc ({found}) and an NVIDIA driver ({drv}) found; NATTN_CUDA=0 skips them"
