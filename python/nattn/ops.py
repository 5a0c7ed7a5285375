"""The torch op layer: ``torch.ops.nattn.na_forward`` and ``torch.ops.nattn.na_backward``.

Both are ``torch.library.custom_op``s with fake (meta) implementations, so ``torch.compile``
traces through them without graph breaks, and ``register_autograd`` connects the backward. The
backend is resolved before the op is called (``nattn.functional``), so the op receives a
concrete backend name.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from ._native import Window


def _window(kernel_size, stride, dilation, is_causal, scale) -> Window:
    return Window(tuple(kernel_size), tuple(stride), tuple(dilation), tuple(is_causal), scale)


def _empty_outputs(query: Tensor, value: Tensor) -> Tuple[Tensor, Tensor]:
    out = query.new_empty(query.shape[:-1] + (value.shape[-1],))
    lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("nattn::na_forward", mutates_args=())
def na_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    additional_keys: Optional[Tensor],
    additional_values: Optional[Tensor],
    kernel_size: List[int],
    stride: List[int],
    dilation: List[int],
    is_causal: List[bool],
    scale: float,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """Neighborhood attention forward: ``(out [B, *spatial, H, Dv], lse [B, *spatial, H] fp32)``."""
    if query.shape[0] == 0:
        return _empty_outputs(query, value)
    window = _window(kernel_size, stride, dilation, is_causal, scale)
    return backends.get(backend).forward(
        query, key, value, additional_keys, additional_values, window
    )


@na_forward.register_fake
def _(query, key, value, additional_keys, additional_values, kernel_size, stride, dilation,
      is_causal, scale, backend):
    return _empty_outputs(query, value)


@torch.library.custom_op("nattn::na_backward", mutates_args=())
def na_backward(
    grad_out: Tensor,
    grad_lse: Optional[Tensor],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    additional_keys: Optional[Tensor],
    additional_values: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    kernel_size: List[int],
    stride: List[int],
    dilation: List[int],
    is_causal: List[bool],
    scale: float,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv, d_additional_keys, d_additional_values)``; the last two have
    M = 0 tokens when there are no additional tokens."""
    if query.shape[0] == 0:
        dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        dak, dav = _additional_grads_like(query, key, value, additional_keys, additional_values)
        return dq, dk, dv, dak, dav
    window = _window(kernel_size, stride, dilation, is_causal, scale)
    dq, dk, dv, dak, dav = backends.get(backend).backward(
        grad_out, grad_lse, query, key, value, additional_keys, additional_values, out, lse,
        window,
    )
    if dak is None:
        dak, dav = _additional_grads_like(query, key, value, None, None)
    else:
        dak, dav = _strided_like(dak, additional_keys), _strided_like(dav, additional_values)
    return _strided_like(dq, query), _strided_like(dk, key), _strided_like(dv, value), dak, dav


def _strided_like(grad: Tensor, like: Tensor) -> Tensor:
    """``grad`` with the strides ``torch.empty_like(like)`` has (what the fake impl promises);
    kernels that allocate with empty_like pass through without a copy."""
    target = torch.empty_like(like)
    if grad.stride() == target.stride():
        return grad
    return target.copy_(grad)


def _additional_grads_like(query, key, value, additional_keys, additional_values):
    if additional_keys is not None:
        return torch.zeros_like(additional_keys), torch.zeros_like(additional_values)
    batch, kv_heads = query.shape[0], key.shape[-2]
    return (
        key.new_empty((batch, 0, kv_heads, key.shape[-1])),
        value.new_empty((batch, 0, kv_heads, value.shape[-1])),
    )


@na_backward.register_fake
def _(grad_out, grad_lse, query, key, value, additional_keys, additional_values, out, lse,
      kernel_size, stride, dilation, is_causal, scale, backend):
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    if additional_keys is not None:
        return dq, dk, dv, torch.empty_like(additional_keys), torch.empty_like(additional_values)
    return (dq, dk, dv) + _additional_grads_like(query, key, value, None, None)


_NONTENSOR_ARGS = ("kernel_size", "stride", "dilation", "is_causal", "scale", "backend")


def _setup_context(ctx, inputs, output):
    query, key, value, additional_keys, additional_values = inputs[:5]
    ctx.window_args = inputs[5:]
    ctx.has_additional = additional_keys is not None
    out, lse = output
    ctx.save_for_backward(query, key, value, additional_keys, additional_values, out, lse)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, additional_keys, additional_values, out, lse = ctx.saved_tensors
    dq, dk, dv, dak, dav = torch.ops.nattn.na_backward(
        grad_out, grad_lse, query, key, value, additional_keys, additional_values, out, lse,
        *ctx.window_args,
    )
    if not ctx.has_additional:
        dak = dav = None
    return (dq, dk, dv, dak, dav) + (None,) * len(_NONTENSOR_ARGS)


torch.library.register_autograd("nattn::na_forward", _backward, setup_context=_setup_context)
