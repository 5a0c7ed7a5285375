"""Backends: who computes a call, registered in one place.

Each backend declares what it supports through ``not_supported_reasons(problem)`` (an empty list
means it can run the problem). ``backend="auto"`` takes the first registered backend, in priority
order, that can run the problem; a named backend that cannot raises a ``ValueError`` listing its
reasons, and when nothing can run a problem the error lists every backend and why.
"""

from __future__ import annotations

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

    @property
    def rank(self) -> int:
        return len(self.spatial_shape)

    @staticmethod
    def from_tensors(query, key, value, window: Window, additional_keys=None) -> "Problem":
        tensors = (query, key, value) + (() if additional_keys is None else (additional_keys,))
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
        )


class Backend:
    """Interface of a backend. ``forward`` returns ``(out, lse)``; ``backward`` returns
    ``(dq, dk, dv, d_additional_keys, d_additional_values)`` (the last two None without
    additional tokens). Tensors follow ``nattn.neighborhood_attention``'s layout."""

    name: str = ""
    description: str = ""

    def not_supported_reasons(self, problem: Problem) -> List[str]:
        raise NotImplementedError

    def forward(self, q, k, v, ak, av, window: Window):
        raise NotImplementedError

    def backward(self, grad_out, grad_lse, q, k, v, ak, av, out, lse, window: Window):
        raise NotImplementedError


class ReferenceBackend(Backend):
    name = "reference"
    description = "pure-PyTorch dense masked softmax (nattn.reference); O(N^2) memory, any device"

    def not_supported_reasons(self, problem: Problem) -> List[str]:
        return []

    def forward(self, q, k, v, ak, av, window: Window):
        out, lse = reference.neighborhood_attention(
            q, k, v, window.kernel_size, window.stride, window.dilation, window.is_causal,
            window.scale, ak, av, return_lse=True,
        )
        return out.contiguous(), lse.contiguous()

    def backward(self, grad_out, grad_lse, q, k, v, ak, av, out, lse, window: Window):
        return reference.neighborhood_attention_backward(
            grad_out, grad_lse, q, k, v, window.kernel_size, window.stride, window.dilation,
            window.is_causal, window.scale, ak, av,
        )


class CpuBackend(Backend):
    name = "cpu"
    description = "fused CPU kernels (csrc/cpu): online softmax, OpenMP, deterministic backward"

    def not_supported_reasons(self, problem: Problem) -> List[str]:
        reasons = []
        if _native.IMPORT_ERROR is not None:
            reasons.append(_native.IMPORT_ERROR)
        if problem.device.type != "cpu":
            reasons.append(f"runs on CPU tensors only, got device {problem.device}")
        return reasons

    def forward(self, q, k, v, ak, av, window: Window):
        return _native.cpu_forward(q, k, v, ak, av, window)

    def backward(self, grad_out, grad_lse, q, k, v, ak, av, out, lse, window: Window):
        return _native.cpu_backward(grad_out, grad_lse, q, k, v, ak, av, out, lse, window)


# Priority order: the first that can run a problem is what "auto" picks. The reference comes
# last: it is always able, and always the slowest.
_REGISTRY: Dict[str, Backend] = {}


def register(backend: Backend) -> None:
    """Add a backend (last in priority) or replace one of the same name."""
    _REGISTRY[backend.name] = backend


register(CpuBackend())
register(ReferenceBackend())


def names() -> List[str]:
    """Registered backend names, in the priority order ``auto`` uses."""
    return list(_REGISTRY)


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
