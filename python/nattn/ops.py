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
    rpb: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Neighborhood attention forward: ``(out [B, *spatial, H, Dv], lse [B, *spatial, H] fp32)``;
    ``rpb`` is the optional relative positional bias ``[H, 2K_0 - 1, ...]`` (query's dtype)."""
    if query.shape[0] == 0:
        return _empty_outputs(query, value)
    window = _window(kernel_size, stride, dilation, is_causal, scale)
    return backends.get(backend).forward(
        query, key, value, additional_keys, additional_values, window, rpb
    )


@na_forward.register_fake
def _(query, key, value, additional_keys, additional_values, kernel_size, stride, dilation,
      is_causal, scale, backend, rpb=None):
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
    rpb: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv, d_additional_keys, d_additional_values, d_rpb)``; the
    additional-token gradients have M = 0 tokens when there are no additional tokens, and
    ``d_rpb`` (the sum of dS over batch and queries at each relative offset) has shape
    ``[0]`` when there is no ``rpb``."""
    if query.shape[0] == 0:
        dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        dak, dav = _additional_grads_like(query, key, value, additional_keys, additional_values)
        return dq, dk, dv, dak, dav, _rpb_grad_like(query, rpb, zero=True)
    window = _window(kernel_size, stride, dilation, is_causal, scale)
    dq, dk, dv, dak, dav, d_rpb = backends.get(backend).backward(
        grad_out, grad_lse, query, key, value, additional_keys, additional_values, out, lse,
        window, rpb,
    )
    if dak is None:
        dak, dav = _additional_grads_like(query, key, value, None, None)
    else:
        dak, dav = _strided_like(dak, additional_keys), _strided_like(dav, additional_values)
    d_rpb = _rpb_grad_like(query, None) if rpb is None else _strided_like(d_rpb, rpb)
    return (_strided_like(dq, query), _strided_like(dk, key), _strided_like(dv, value), dak, dav,
            d_rpb)


def _rpb_grad_like(query: Tensor, rpb: Optional[Tensor], zero: bool = False) -> Tensor:
    """d_rpb when it is not computed: empty ``[0]`` without rpb, zeros like rpb with it."""
    if rpb is None:
        return query.new_empty((0,))
    return torch.zeros_like(rpb) if zero else torch.empty_like(rpb)


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
      kernel_size, stride, dilation, is_causal, scale, backend, rpb=None):
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    d_rpb = _rpb_grad_like(query, rpb)
    if additional_keys is not None:
        return (dq, dk, dv, torch.empty_like(additional_keys),
                torch.empty_like(additional_values), d_rpb)
    return (dq, dk, dv) + _additional_grads_like(query, key, value, None, None) + (d_rpb,)


_NONTENSOR_ARGS = ("kernel_size", "stride", "dilation", "is_causal", "scale", "backend")


def _setup_context(ctx, inputs, output):
    query, key, value, additional_keys, additional_values = inputs[:5]
    n_window = len(_NONTENSOR_ARGS)
    ctx.window_args = inputs[5 : 5 + n_window]
    rpb = inputs[5 + n_window] if len(inputs) > 5 + n_window else None
    ctx.has_additional = additional_keys is not None
    ctx.has_rpb = rpb is not None
    out, lse = output
    ctx.save_for_backward(query, key, value, additional_keys, additional_values, out, lse, rpb)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, additional_keys, additional_values, out, lse, rpb = ctx.saved_tensors
    dq, dk, dv, dak, dav, d_rpb = torch.ops.nattn.na_backward(
        grad_out, grad_lse, query, key, value, additional_keys, additional_values, out, lse,
        *ctx.window_args, rpb=rpb,
    )
    if not ctx.has_additional:
        dak = dav = None
    if not ctx.has_rpb:
        d_rpb = None
    return (dq, dk, dv, dak, dav) + (None,) * len(_NONTENSOR_ARGS) + (d_rpb,)


torch.library.register_autograd("nattn::na_forward", _backward, setup_context=_setup_context)


def _no_double_backward_setup(ctx, inputs, output):
    pass


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "nattn: double backward (second-order gradients through neighborhood attention) is not "
        "supported; torch.ops.nattn.na_backward has no derivative. First-order gradients work, "
        "including with create_graph=True as long as the graph is not differentiated again.")


# Second-order gradients: a clear error instead of torch's generic "no autograd formula".
torch.library.register_autograd("nattn::na_backward", _no_double_backward,
                                setup_context=_no_double_backward_setup)
