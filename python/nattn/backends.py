"""Backends: who computes a call, registered in one place.

Each backend declares what it supports through ``not_supported_reasons(problem)`` (an empty list
means it can run the problem). ``backend="auto"`` takes the first registered backend, in priority
order, that can run the problem; a named backend that cannot raises a ``ValueError`` listing its
reasons, and when nothing can run a problem the error lists every backend and why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from . import _native, reference
from ._native import Window


@dataclass(frozen=True)
class Problem:
    """What a backend needs to know to say whether it can run a call."""

    batch: int
    spatial_shape: Tuple[int, ...]
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    is_causal: Tuple[bool, ...]
    num_additional: int
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool
    has_rpb: bool = False  # a relative positional bias (DESIGN.md section 7) is added

    @property
    def rank(self) -> int:
        return len(self.spatial_shape)

    @staticmethod
    def from_tensors(query, key, value, window: Window, additional_keys=None,
                     rpb=None) -> "Problem":
        tensors = (query, key, value) + (() if additional_keys is None else (additional_keys,))
        tensors += () if rpb is None else (rpb,)
        return Problem(
            batch=query.shape[0],
            spatial_shape=tuple(query.shape[1:-2]),
            heads=query.shape[-2],
            kv_heads=key.shape[-2],
            head_dim=query.shape[-1],
            value_dim=value.shape[-1],
            kernel_size=window.kernel_size,
            stride=window.stride,
            dilation=window.dilation,
            is_causal=window.is_causal,
            num_additional=0 if additional_keys is None else additional_keys.shape[1],
            dtype=query.dtype,
            device=query.device,
            requires_grad=torch.is_grad_enabled() and any(t.requires_grad for t in tensors),
            has_rpb=rpb is not None,
        )


class Backend:
    """Interface of a backend. ``forward`` returns ``(out, lse)``; ``backward`` returns
    ``(dq, dk, dv, d_additional_keys, d_additional_values, d_rpb)`` (the additional-token
    gradients None without additional tokens, d_rpb None without rpb). Tensors follow
    ``nattn.neighborhood_attention``'s layout; ``rpb`` is the optional relative positional bias
    ``[H, 2K_0 - 1, ...]``."""

    name: str = ""
    description: str = ""
    # Whether backend="auto" may pick it (False for verification-only backends).
    auto: bool = True

    def not_supported_reasons(self, problem: Problem) -> List[str]:
        raise NotImplementedError

    def forward(self, q, k, v, ak, av, window: Window, rpb=None):
        raise NotImplementedError

    def backward(self, grad_out, grad_lse, q, k, v, ak, av, out, lse, window: Window,
                 rpb=None):
        raise NotImplementedError


class ReferenceBackend(Backend):
    name = "reference"
    description = "pure-PyTorch dense masked softmax (nattn.reference); O(N^2) memory, any device"

    def not_supported_reasons(self, problem: Problem) -> List[str]:
        return []

    def forward(self, q, k, v, ak, av, window: Window, rpb=None):
        out, lse = reference.neighborhood_attention(
            q, k, v, window.kernel_size, window.stride, window.dilation, window.is_causal,
            window.scale, ak, av, return_lse=True, rpb=rpb,
        )
        return out.contiguous(), lse.contiguous()

    def backward(self, grad_out, grad_lse, q, k, v, ak, av, out, lse, window: Window,
                 rpb=None):
        grads = reference.neighborhood_attention_backward(
            grad_out, grad_lse, q, k, v, window.kernel_size, window.stride, window.dilation,
            window.is_causal, window.scale, ak, av, rpb=rpb,
        )
        return grads if rpb is not None else grads + (None,)


class CpuBackend(Backend):
    name = "cpu"
    description = ("fused CPU kernels (csrc/cpu): online softmax, own thread pool, "
                   "deterministic backward (no atomics, same bits for any thread count)")

    def not_supported_reasons(self, problem: Problem) -> List[str]:
        reasons = []
        if _native.IMPORT_ERROR is not None:
            reasons.append(_native.IMPORT_ERROR)
        if problem.device.type != "cpu":
            reasons.append(f"runs on CPU tensors only, got device {problem.device}")
        return reasons

    def forward(self, q, k, v, ak, av, window: Window, rpb=None):
        return _native.forward("cpu", q, k, v, ak, av, window, rpb)

    def backward(self, grad_out, grad_lse, q, k, v, ak, av, out, lse, window: Window,
                 rpb=None):
        return _native.backward("cpu", grad_out, grad_lse, q, k, v, ak, av, out, lse, window,
                                rpb)


class CudaBackend(Backend):
    name = "cuda"
    description = (
        "CUDA kernels (csrc/cuda): SM80+ tensor cores (mma.sync) for fp16/bf16 at head dims "
        "32-256, a SIMT path for everything else; deterministic backward (no atomics)"
    )
    kind = "cuda"

    def not_supported_reasons(self, problem: Problem) -> List[str]:
        if _native.IMPORT_ERROR is not None:
            return [_native.IMPORT_ERROR]
        if not getattr(_native._C, "with_cuda", False):
            return ["nattn._C was built without the CUDA part (at build time: no nvcc, or no "
                    "NVIDIA driver and no NATTN_CUDA=1)"]
        if problem.device.type != "cuda":
            return [f"runs on CUDA tensors only, got device {problem.device}"]
        if not torch.cuda.is_available():
            return ["torch reports no usable CUDA device"]
        index = problem.device.index
        if index is None:
            index = torch.cuda.current_device()
        return list(_native.cuda_device_reasons(index))

    def forward(self, q, k, v, ak, av, window: Window, rpb=None):
        return _native.forward(self.kind, q, k, v, ak, av, window, rpb)

    def backward(self, grad_out, grad_lse, q, k, v, ak, av, out, lse, window: Window,
                 rpb=None):
        return _native.backward(self.kind, grad_out, grad_lse, q, k, v, ak, av, out, lse, window,
                                rpb)


# Until tests/test_cuda.py has passed on an H100/H200 with the Hopper kernels, they are opt-in.
HOPPER_OPT_IN = "NATTN_EXPERIMENTAL_HOPPER"


class HopperBackend(CudaBackend):
    name = "hopper"
    description = (
        "Hopper forward and backward (csrc/cuda/sm90): warp-specialized wgmma + TMA on "
        "multi-dimensional tiles, fp16/bf16, head dims 64/128 (backward also 32; what they "
        "decline runs on the portable CUDA kernels). "
        f"Not yet validated on a GPU: opt in with {HOPPER_OPT_IN}=1"
    )
    kind = "hopper"

    def not_supported_reasons(self, problem: Problem) -> List[str]:
        reasons = super().not_supported_reasons(problem)
        if reasons:
            return reasons
        if os.environ.get(HOPPER_OPT_IN) != "1":
            reasons.append(f"experimental until validated on a GPU: set {HOPPER_OPT_IN}=1")
        if torch.cuda.get_device_capability(problem.device) != (9, 0):
            reasons.append("needs compute capability 9.0 (H100/H200)")
        if problem.dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"dtype {problem.dtype} is not float16/bfloat16")
        # head_dim 32: the Hopper backward serves it, the forward declines it per call (the
        # portable forward then runs, as for any call the kernels' planner declines).
        if problem.head_dim not in (32, 64, 128) or problem.value_dim != problem.head_dim:
            reasons.append(
                f"head_dim={problem.head_dim}, value_dim={problem.value_dim}: kernels exist for "
                "head_dim = value_dim in (32 (backward), 64, 128)"
            )
        if problem.num_additional:
            reasons.append("additional keys/values are not fused in the Hopper kernels yet")
        # Layout rules (contiguous head dim, 16-byte aligned strides) are checked per call by
        # the kernels' own planner; a call that breaks them runs on the portable kernels.
        return reasons


class EmulatedCudaBackend(Backend):
    name = "cuda-emu"
    description = (
        "the CUDA kernels of csrc/cuda (SM80 tensor cores, SIMT) run on CPU tensors under "
        "nattn's functional emulator (csrc/emu), dispatched as on a GPU of compute capability "
        "NATTN_EMU_ARCH (default 80); for verification only, slow, never chosen by 'auto'; "
        "needs a build with NATTN_EMU=1"
    )
    auto = False

    def not_supported_reasons(self, problem: Problem) -> List[str]:
        if _native.EMU_IMPORT_ERROR is not None:
            return [_native.EMU_IMPORT_ERROR]
        if problem.device.type != "cpu":
            return [f"runs on CPU tensors only (it emulates the GPU), got device {problem.device}"]
        from . import emu

        emu.configure_from_environment()
        return []

    def forward(self, q, k, v, ak, av, window: Window, rpb=None):
        return _native.forward("cuda-emu", q, k, v, ak, av, window, rpb)

    def backward(self, grad_out, grad_lse, q, k, v, ak, av, out, lse, window: Window,
                 rpb=None):
        return _native.backward("cuda-emu", grad_out, grad_lse, q, k, v, ak, av, out, lse,
                                window, rpb)


# Priority order: the first that can run a problem is what "auto" picks. The reference comes
# last of those: it is always able, and always the slowest. cuda-emu is never picked.
_REGISTRY: Dict[str, Backend] = {}


def register(backend: Backend) -> None:
    """Add a backend (last in priority) or replace one of the same name."""
    _REGISTRY[backend.name] = backend


register(HopperBackend())
register(CudaBackend())
register(CpuBackend())
register(ReferenceBackend())
register(EmulatedCudaBackend())


def names(benchmarked_only: bool = False) -> List[str]:
    """Registered backend names, in the priority order ``auto`` uses. ``benchmarked_only``
    leaves out the verification-only backends (``cuda-emu``), which the benchmark and
    ``profile --backend all`` do not time."""
    return [n for n, b in _REGISTRY.items() if b.auto or not benchmarked_only]


def get(name: str) -> Backend:
    """The backend called ``name``; ``ValueError`` naming the known backends otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"backend={name!r} must be a str")
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r} is unknown: choose 'auto' or one of {names()}")
    return _REGISTRY[name]


def choose(problem: Problem) -> Backend:
    """The backend ``auto`` picks for ``problem``; ``ValueError`` listing every reason if none."""
    reasons = {}
    for backend in _REGISTRY.values():
        if not backend.auto:
            continue
        why = backend.not_supported_reasons(problem)
        if not why:
            return backend
        reasons[backend.name] = why
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in reasons.items())
    raise ValueError(f"no backend can run this problem ({detail})")


def resolve(name: str, problem: Problem) -> Backend:
    """``choose(problem)`` for "auto", else the named backend if it can run the problem."""
    if name == "auto":
        return choose(problem)
    backend = get(name)
    why = backend.not_supported_reasons(problem)
    if why:
        raise ValueError(f"backend={name!r} cannot run this problem: {'; '.join(why)}")
    return backend


def describe(problem: Optional[Problem] = None) -> List[Tuple[str, str, List[str]]]:
    """(name, description, reasons it cannot run ``problem``) for every registered backend."""
    return [
        (b.name, b.description, [] if problem is None else b.not_supported_reasons(problem))
        for b in _REGISTRY.values()
    ]
