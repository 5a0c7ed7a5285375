"""Calls into the native module nattn._C: tensors in, AttentionParams (include/nattn/params.h)
filled with raw pointers and element strides, kernels launched. The only place that turns torch
tensors into pointers."""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple, Optional, Tuple

import torch

try:
    from . import _C

    IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # a source checkout without a build, or a broken install
    _C = None
    IMPORT_ERROR = f"the native module nattn._C could not be imported ({exc})"

try:  # the CUDA kernels under the functional emulator: built only with NATTN_EMU=1
    from . import _emu

    EMU_IMPORT_ERROR: Optional[str] = None
except ImportError as exc:
    _emu = None
    EMU_IMPORT_ERROR = (f"nattn was built without the emulator module nattn._emu ({exc}); "
                        "rebuild with NATTN_EMU=1 (docs/emulator.md)")


# Tests set this to fill every output with NaN before a kernel runs, so that an element a kernel
# fails to write shows up instead of passing with whatever the allocator left there.
poison_outputs = False
# Tests: make the CPU kernels use exactly torch.get_num_threads() threads, even on problems too
# small to pay for them, so that the multi-threaded schedules run on small test cases.
exact_threads = False


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    t = like.new_empty(shape, dtype=dtype)
    return t.fill_(float("nan")) if poison_outputs else t


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    e = torch.empty_like(t)
    return e.fill_(float("nan")) if poison_outputs else e


class Window(NamedTuple):
    """Per-axis window parameters and the softmax scale of one call (already validated)."""

    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    is_causal: Tuple[bool, ...]
    scale: float


def _dtype_tag(dtype: torch.dtype, lib):
    return {
        torch.float16: lib.DType.float16,
        torch.bfloat16: lib.DType.bfloat16,
        torch.float32: lib.DType.float32,
        torch.float64: lib.DType.float64,
    }[dtype]


def _library(kind: str):
    """The native module that runs ``kind``: nattn._emu for "cuda-emu", else nattn._C."""
    return _emu if kind == "cuda-emu" else _C


def _token_strides(t: torch.Tensor, rank: int) -> list:
    """[batch, x0, x1, x2, (heads, dim)...] element strides, padding axes given stride 0."""
    s = list(t.stride())
    return [s[0]] + [0] * (3 - rank) + s[1 : 1 + rank] + s[1 + rank :]


def _rpb_strides(t: torch.Tensor, rank: int) -> list:
    """[heads, b0, b1, b2] element strides of a relative-bias table, padding axes stride 0."""
    s = list(t.stride())
    return [s[0]] + [0] * (3 - rank) + s[1:]


def _params(q, k, v, ak, av, window: Window, lib=None, rpb=None):
    rank = q.dim() - 3
    lib = _C if lib is None else lib
    p = lib.AttentionParams()
    p.dtype = _dtype_tag(q.dtype, lib)
    p.batch = q.shape[0]
    p.heads = q.shape[-2]
    p.kv_heads = k.shape[-2]
    p.head_dim = q.shape[-1]
    p.value_dim = v.shape[-1]
    p.scale = window.scale
    # CPU kernels use as many threads as torch's intra-op pool (torch.set_num_threads).
    p.num_threads = torch.get_num_threads()
    p.exact_threads = exact_threads
    p.set_axes(
        [
            (q.shape[1 + a], window.kernel_size[a], window.stride[a], window.dilation[a],
             window.is_causal[a])
            for a in range(rank)
        ]
    )
    for name, t in (("q", q), ("k", k), ("v", v)):
        p.set_tensor(name, t.data_ptr(), _token_strides(t, rank))
    if ak is not None:
        p.num_additional = ak.shape[1]
        p.set_tensor("add_k", ak.data_ptr(), list(ak.stride()))
        p.set_tensor("add_v", av.data_ptr(), list(av.stride()))
    if rpb is not None:
        p.set_tensor("rpb", rpb.data_ptr(), _rpb_strides(rpb, rank))
    return p, rank


def _launch(kind: str, device: torch.device, p):
    """Context for a kernel launch: the CUDA device and its current stream, or nothing on CPU."""
    if kind in ("cuda", "hopper"):
        p.set_stream(torch.cuda.current_stream(device).cuda_stream)
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def forward(kind: str, q, k, v, ak, av, window: Window, rpb=None):
    """Fused forward on ``kind`` ("cpu", "cuda", "hopper" or "cuda-emu"): returns (out
    [B, *spatial, H, Dv] in q.dtype, lse [B, *spatial, H] fp32). "hopper" runs the sm_90a
    kernels when they accept the call (layout; no rpb) and the portable CUDA kernels otherwise;
    "cuda-emu" runs the CUDA kernels on CPU tensors under the emulator. ``rpb``: optional
    relative positional bias [H, 2K_0 - 1, ...] in q.dtype."""
    lib = _library(kind)
    p, rank = _params(q, k, v, ak, av, window, lib, rpb)
    out = _empty(q.shape[:-1] + (v.shape[-1],), q)
    lse = _empty(q.shape[:-1], q, dtype=torch.float32)
    p.set_tensor("out", out.data_ptr(), _token_strides(out, rank))
    p.set_tensor("lse", lse.data_ptr(), _token_strides(lse, rank))
    with _launch(kind, q.device, p):
        if kind == "hopper":
            if _C.cuda_hopper_forward(p):  # declined (reasons listed): the portable kernels
                _C.cuda_forward(p)
        elif kind in ("cuda", "cuda-emu"):
            lib.cuda_forward(p)
        else:
            _C.cpu_forward(p)
    return out, lse


def backward(kind: str, grad_out, grad_lse, q, k, v, ak, av, out, lse, window: Window,
             rpb=None):
    """Fused backward on ``kind``: returns (dq, dk, dv, d_additional_keys,
    d_additional_values, d_rpb); the additional-token gradients are None without additional
    tokens, d_rpb (rpb's shape and dtype, contiguous) None without rpb. Both kinds are
    atomic-free, so gradients are bit-identical from run to run."""
    lib = _library(kind)
    p, rank = _params(q, k, v, ak, av, window, lib, rpb)
    for name, t in (("out", out), ("d_out", grad_out)):
        p.set_tensor(name, t.data_ptr(), _token_strides(t, rank))
    p.set_tensor("lse", lse.data_ptr(), _token_strides(lse, rank))
    if grad_lse is not None:
        p.set_tensor("d_lse", grad_lse.data_ptr(), _token_strides(grad_lse, rank))
    # Workspace: rowsum(d_out * out) - d_lse per query row, filled by the kernel. The CUDA
    # kernels keep float64 problems' row terms in fp64, the lse recomputed (params.h).
    wide = kind != "cpu" and q.dtype == torch.float64
    delta = torch.empty(lse.shape, dtype=torch.float64 if wide else torch.float32,
                        device=lse.device)
    p.set_tensor("delta", delta.data_ptr(), _token_strides(delta, rank))
    if wide:
        lse_fp64 = torch.empty(lse.shape, dtype=torch.float64, device=lse.device)
        p.set_tensor("lse_fp64", lse_fp64.data_ptr(), _token_strides(lse_fp64, rank))
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    for name, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        p.set_tensor(name, t.data_ptr(), _token_strides(t, rank))
    dak = dav = None
    if ak is not None:
        dak, dav = _empty_like(ak), _empty_like(av)
        p.set_tensor("d_add_k", dak.data_ptr(), list(dak.stride()))
        p.set_tensor("d_add_v", dav.data_ptr(), list(dav.stride()))
    d_rpb = None
    if rpb is not None:
        d_rpb = _empty(rpb.shape, rpb)
        p.set_tensor("d_rpb", d_rpb.data_ptr(), _rpb_strides(d_rpb, rank))
    with _launch(kind, q.device, p):
        if kind == "hopper":
            if _C.cuda_hopper_backward(p):  # declined (reasons listed): the portable kernels
                _C.cuda_backward(p, True)
        elif kind in ("cuda", "cuda-emu"):
            lib.cuda_backward(p, True)
        else:
            _C.cpu_backward(p)
    return dq, dk, dv, dak, dav, d_rpb


@functools.lru_cache(maxsize=None)
def cuda_device_reasons(index: int) -> tuple:
    """Why the CUDA kernels cannot run on device ``index`` at all (cached: it cannot change
    within a process); empty when they can."""
    return tuple(_C.cuda_device_reasons(index))
