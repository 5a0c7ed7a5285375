"""Argument checking and normalization for every public entry point, in one place.

Each rule raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong value)
with a message that names the argument, the value it got and the rule it broke. Nothing here
modifies the inputs.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class NAArgs:
    """Normalized arguments of one neighborhood-attention call (per-axis values as tuples)."""

    rank: int
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    is_causal: Tuple[bool, ...]
    scale: float
    additional_keys: Optional[torch.Tensor]
    additional_values: Optional[torch.Tensor]
    rpb: Optional[torch.Tensor] = None


def _is_int(x) -> bool:
    # bool is an int subclass in Python; a window of True tokens is a bug, not a size.
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def per_axis_ints(name: str, value, rank: int, spatial: Tuple[int, ...]) -> Tuple[int, ...]:
    """An int or a sequence of ``rank`` ints, each >= 1, as a tuple."""
    if _is_int(value):
        values = (int(value),) * rank
    elif isinstance(value, (tuple, list, torch.Size)):
        if len(value) != rank:
            raise ValueError(
                f"{name}={tuple(value)!r} has {len(value)} entries, but the input has {rank} "
                f"spatial axes {tuple(spatial)}: give one value per axis or a single int"
            )
        if not all(_is_int(v) for v in value):
            raise TypeError(f"{name}={tuple(value)!r} must contain ints only")
        values = tuple(int(v) for v in value)
    else:
        raise TypeError(f"{name}={value!r} must be an int or a tuple of {rank} ints")
    for axis, v in enumerate(values):
        if v < 1:
            raise ValueError(f"{name}={values!r}: entry {v} on axis {axis} must be >= 1")
    return values


def per_axis_bools(name: str, value, rank: int) -> Tuple[bool, ...]:
    if isinstance(value, bool):
        return (value,) * rank
    if isinstance(value, (tuple, list)):
        if len(value) != rank:
            raise ValueError(
                f"{name}={tuple(value)!r} has {len(value)} entries, but the input has {rank} "
                f"spatial axes: give one bool per axis or a single bool"
            )
        if not all(isinstance(v, bool) for v in value):
            raise TypeError(f"{name}={tuple(value)!r} must contain bools only (True/False)")
        return tuple(value)
    raise TypeError(f"{name}={value!r} must be a bool or a tuple of {rank} bools")


def _check_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}.dtype={t.dtype} is not supported: use float16, bfloat16, float32 or float64"
        )
    return t


def normalize(
    query,
    key,
    value,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    scale=None,
    additional_keys=None,
    additional_values=None,
    expected_rank: Optional[int] = None,
    rpb=None,
) -> NAArgs:
    """Validate one call and return its normalized arguments (see ``nattn.neighborhood_attention``).

    Raises:
        TypeError: a tensor is not a tensor or has an unsupported dtype; a per-axis parameter is
            not an int (or bool for ``is_causal``) or a tuple of them; ``scale`` is not a number.
        ValueError: any shape, device, dtype-agreement or window rule is broken (``rpb``: shape
            ``[heads, 2*K_0 - 1, ..., 2*K_{r-1} - 1]``, query's dtype and device).
    """
    q = _check_tensor("query", query)
    k = _check_tensor("key", key)
    v = _check_tensor("value", value)

    if expected_rank is not None:
        if q.dim() != expected_rank + 3:
            raise ValueError(
                f"query.shape={tuple(q.shape)} must have {expected_rank + 3} dims "
                f"[batch, {expected_rank} spatial axes, heads, head_dim] for na{expected_rank}d"
            )
    elif not 4 <= q.dim() <= 6:
        raise ValueError(
            f"query.shape={tuple(q.shape)} must have 4 to 6 dims "
            "[batch, 1-3 spatial axes, heads, head_dim]"
        )
    rank = q.dim() - 3
    for name, t in (("key", k), ("value", v)):
        if t.dim() != q.dim():
            raise ValueError(
                f"{name}.shape={tuple(t.shape)} must have as many dims as "
                f"query.shape={tuple(q.shape)} ({q.dim()})"
            )
        if t.shape[: rank + 1] != q.shape[: rank + 1]:
            raise ValueError(
                f"{name}.shape={tuple(t.shape)} must match query.shape={tuple(q.shape)} in batch "
                f"and spatial axes {tuple(q.shape[: rank + 1])}"
            )
        if t.dtype != q.dtype:
            raise ValueError(f"{name}.dtype={t.dtype} must equal query.dtype={q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}.device={t.device} must equal query.device={q.device}")
    heads, head_dim = q.shape[-2], q.shape[-1]
    kv_heads = k.shape[-2]
    if k.shape[-1] != head_dim:
        raise ValueError(
            f"key.shape={tuple(k.shape)}: head_dim {k.shape[-1]} must equal query's {head_dim}"
        )
    if v.shape[-2] != kv_heads:
        raise ValueError(
            f"value.shape={tuple(v.shape)}: {v.shape[-2]} heads must equal key's {kv_heads}"
        )
    if heads < 1 or kv_heads < 1 or head_dim < 1 or v.shape[-1] < 1:
        raise ValueError(
            f"query.shape={tuple(q.shape)}, key.shape={tuple(k.shape)}, "
            f"value.shape={tuple(v.shape)}: heads and head dims must be >= 1 "
            "(zero-size heads or head dims are rejected; an empty batch is allowed)"
        )
    if heads % kv_heads != 0:
        raise ValueError(
            f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads}) (GQA/MQA)"
        )

    spatial = tuple(q.shape[1 : rank + 1])
    for axis, length in enumerate(spatial):
        if length < 1:
            raise ValueError(f"query.shape={tuple(q.shape)}: spatial axis {axis} is empty")
    ks = per_axis_ints("kernel_size", kernel_size, rank, spatial)
    st = per_axis_ints("stride", stride, rank, spatial)
    dl = per_axis_ints("dilation", dilation, rank, spatial)
    causal = per_axis_bools("is_causal", is_causal, rank)
    for axis in range(rank):
        if ks[axis] * dl[axis] > spatial[axis]:
            raise ValueError(
                f"kernel_size={ks!r} with dilation={dl!r}: kernel_size * dilation = "
                f"{ks[axis] * dl[axis]} on axis {axis} must be <= its length {spatial[axis]}"
            )
        if st[axis] > ks[axis]:
            raise ValueError(
                f"stride={st!r}: {st[axis]} on axis {axis} must be <= kernel_size {ks[axis]}"
            )

    if scale is None:
        scale_value = head_dim**-0.5
    else:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale={scale!r} must be a real number or None")
        scale_value = float(scale)
        if not math.isfinite(scale_value):
            raise ValueError(f"scale={scale!r} must be finite")

    if (additional_keys is None) != (additional_values is None):
        given = "additional_keys" if additional_keys is not None else "additional_values"
        missing = "additional_values" if additional_keys is not None else "additional_keys"
        raise ValueError(f"{given} was given without {missing}: pass both or neither")
    if additional_keys is not None:
        ak = _check_tensor("additional_keys", additional_keys)
        av = _check_tensor("additional_values", additional_values)
        batch = q.shape[0]
        want_k = (batch, "M", kv_heads, head_dim)
        want_v = (batch, "M", kv_heads, v.shape[-1])
        for name, t, want in (("additional_keys", ak, want_k), ("additional_values", av, want_v)):
            if t.dim() != 4 or t.shape[0] != batch or tuple(t.shape[2:]) != want[2:]:
                raise ValueError(
                    f"{name}.shape={tuple(t.shape)} must be [batch, M, kv_heads, dim] = "
                    f"{want!r}"
                )
            if t.dtype != q.dtype:
                raise ValueError(f"{name}.dtype={t.dtype} must equal query.dtype={q.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name}.device={t.device} must equal query.device={q.device}")
        if ak.shape[1] != av.shape[1]:
            raise ValueError(
                f"additional_keys.shape={tuple(ak.shape)} and additional_values.shape="
                f"{tuple(av.shape)} must hold the same number of tokens M"
            )
        if ak.shape[1] == 0:
            additional_keys = additional_values = None
    if rpb is not None:
        check_rpb(rpb, q, ks)
    return NAArgs(
        rank=rank,
        kernel_size=ks,
        stride=st,
        dilation=dl,
        is_causal=causal,
        scale=scale_value,
        additional_keys=additional_keys,
        additional_values=additional_values,
        rpb=rpb,
    )


def check_rpb(rpb, query: torch.Tensor, kernel_size: Tuple[int, ...]) -> torch.Tensor:
    """Check a relative positional bias against its query (DESIGN.md section 7).

    ``rpb`` must be a tensor of shape ``[heads, 2*K_0 - 1, ..., 2*K_{r-1} - 1]`` (the query
    heads, one axis per spatial axis), with the query's dtype and device.

    Raises:
        TypeError: not a tensor, or an unsupported dtype.
        ValueError: wrong shape, a dtype other than the query's, another device.
    """
    if not isinstance(rpb, torch.Tensor):
        raise TypeError(f"rpb must be a torch.Tensor or None, got {type(rpb).__name__}")
    _check_tensor("rpb", rpb)
    want = (query.shape[-2],) + tuple(2 * k - 1 for k in kernel_size)
    if tuple(rpb.shape) != want:
        raise ValueError(
            f"rpb.shape={tuple(rpb.shape)} must be [heads, 2*K_0 - 1, ..., 2*K_r-1 - 1] = "
            f"{want} for {query.shape[-2]} query heads and kernel_size={tuple(kernel_size)}"
        )
    if rpb.dtype != query.dtype:
        raise ValueError(f"rpb.dtype={rpb.dtype} must equal query.dtype={query.dtype}")
    if rpb.device != query.device:
        raise ValueError(f"rpb.device={rpb.device} must equal query.device={query.device}")
    return rpb
