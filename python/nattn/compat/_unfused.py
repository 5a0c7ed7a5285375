"""NATTEN's unfused neighborhood-attention ops (``qk`` with relative positional bias, ``av``),
rank-generic, heads-first ``[B, H, *spatial, D]``, on torch index/matmul ops with autograd.

How: the window of every query comes from ``nattn._C.axis_windows`` (include/nattn/window.h,
the one definition of the neighborhood). Per axis it gives (first key, key count); slot t of a
query is key ``first + t * dilation``, slots past the count (causal axes) are masked. The
multi-dimensional slot order is row-major over the per-axis slots (last axis fastest), as in
NATTEN. Keys and values are gathered with advanced indexing, which reads any strides (no copy
of the inputs) and runs on every device with autograd (its backward is an index_put with
accumulation); the dot products are batched matmuls. Memory: the gathered keys/values are
``B * H * N * prod(K) * D`` elements, the same order as the attention tensor NATTEN's unfused
ops return. A native kernel would avoid that buffer; these ops exist for compatibility and as
an independent check of the fused kernels, so the gather is the simpler, portable choice.

The relative positional bias index of query i and key j on an axis is
``(j - i) / dilation + K - 1`` (DESIGN.md section 7); additional tokens get no bias.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch

from .. import _checks, _native

__all__ = ["qk", "av"]


def _axis_tables(length: int, kernel: int, dilation: int, causal: bool):
    """(key index [L, K], valid [L, K], bias index [L, K]) of one axis, as CPU int64/bool."""
    if _native._C is None:
        raise RuntimeError(
            f"nattn's unfused NATTEN ops need the native module for the window tables: "
            f"{_native.IMPORT_ERROR}"
        )
    rows = _native._C.axis_windows(length, kernel, 1, dilation, causal)
    first = torch.tensor([r[0] for r in rows], dtype=torch.int64)
    count = torch.tensor([r[1] for r in rows], dtype=torch.int64)
    slot = torch.arange(kernel, dtype=torch.int64)
    query = torch.arange(length, dtype=torch.int64)[:, None]
    valid = slot[None, :] < count[:, None]
    # A masked slot (causal) points at the query itself: a real key, so the gather stays in
    # bounds; its score is replaced by -inf and its weight by 0.
    index = torch.where(valid, first[:, None] + dilation * slot[None, :], query)
    bias = torch.div(index - query, dilation, rounding_mode="floor") + kernel - 1
    return index, valid, bias


@functools.lru_cache(maxsize=256)
def _tables(spatial: Tuple[int, ...], kernel: Tuple[int, ...], dilation: Tuple[int, ...],
            causal: Tuple[bool, ...], device: torch.device):
    """Per-axis index and bias tensors broadcastable to ``[*spatial, *kernel]``, and the slot
    mask ``[*spatial, prod(kernel)]`` (None when no axis is causal), on ``device``."""
    rank = len(spatial)
    keys, biases, valid = [], [], None
    for a in range(rank):
        index, ok, bias = _axis_tables(spatial[a], kernel[a], dilation[a], causal[a])
        shape = [1] * (2 * rank)
        shape[a], shape[rank + a] = spatial[a], kernel[a]
        keys.append(index.view(shape).to(device))
        biases.append(bias.view(shape).to(device))
        if causal[a]:
            ok = ok.view(shape)
            valid = ok if valid is None else valid & ok
    if valid is not None:
        valid = valid.expand(*spatial, *kernel).reshape(*spatial, math.prod(kernel)).to(device)
    return tuple(keys), tuple(biases), valid


def _window_args(name_rank, spatial, kernel_size, dilation, is_causal):
    rank = len(spatial)
    ks = _checks.per_axis_ints("kernel_size", kernel_size, rank, spatial)
    ds = _checks.per_axis_ints("dilation", dilation, rank, spatial)
    cs = _checks.per_axis_bools("is_causal", False if is_causal is None else is_causal, rank)
    for a in range(rank):
        why = _native._C.axis_params_error(spatial[a], ks[a], 1, ds[a]) if _native._C else None
        if why:
            raise ValueError(
                f"{name_rank}: kernel_size={ks}, dilation={ds} on spatial shape {tuple(spatial)}: "
                f"axis {a}: {why}"
            )
    return ks, ds, cs


def _check_heads_first(op: str, name: str, t, rank: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank + 3:
        raise ValueError(
            f"{op}: {name}.shape={tuple(t.shape)} must be heads-first [B, H, "
            f"{', '.join(f'X{i}' for i in range(rank))}, D] ({rank + 3} dims)"
        )
    if not t.dtype.is_floating_point:
        raise TypeError(f"{op}: {name}.dtype={t.dtype} must be a floating dtype")


def _check_extra(op: str, name: str, t, like: torch.Tensor, last: Optional[int]) -> int:
    """Additional tokens ``[B, H, M, D]`` (heads-first, like NATTEN 0.17); returns M."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dim() != 4 or t.shape[0] != like.shape[0] or t.shape[1] != like.shape[1] or (
        last is not None and t.shape[-1] != last
    ):
        want = f"[{like.shape[0]}, {like.shape[1]}, M, {last if last is not None else 'D'}]"
        raise ValueError(f"{op}: {name}.shape={tuple(t.shape)} must be {want}")
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {like.device}")
    return t.shape[2]


def _gather(t: torch.Tensor, keys, rank: int) -> torch.Tensor:
    """``t[b, h, window slots of every query, :]`` as ``[B, H, *spatial, prod(K), D]``."""
    g = t[(slice(None), slice(None)) + keys]  # [B, H, *spatial, *K, D]
    return g.flatten(2 + rank, 1 + 2 * rank)


def qk(op: str, rank: int, query, key, kernel_size, dilation, additional_keys=None,
       is_causal=False, rpb=None) -> torch.Tensor:
    """``attn[b, h, *i, t] = q_i . k_{j_t(i)} + rpb[h, (j_t - i) / d + K - 1]`` (no scale, no
    softmax), then ``q_i . additional_keys[b, h, m]`` for the additional tokens. Masked causal
    slots are -inf."""
    _check_heads_first(op, "query", query, rank)
    _check_heads_first(op, "key", key, rank)
    if key.shape != query.shape:
        raise ValueError(
            f"{op}: key.shape={tuple(key.shape)} must equal query.shape={tuple(query.shape)}"
        )
    if key.dtype != query.dtype or key.device != query.device:
        raise ValueError(
            f"{op}: query ({query.dtype}, {query.device}) and key ({key.dtype}, {key.device}) "
            "must share dtype and device"
        )
    spatial = tuple(query.shape[2:-1])
    ks, ds, cs = _window_args(op, spatial, kernel_size, dilation, is_causal)
    keys, biases, valid = _tables(spatial, ks, ds, cs, query.device)
    attn = torch.matmul(_gather(key, keys, rank), query.unsqueeze(-1)).squeeze(-1)
    if rpb is not None:
        if not isinstance(rpb, torch.Tensor):
            raise TypeError(f"{op}: rpb must be a torch.Tensor or None, got {type(rpb).__name__}")
        # NATTEN casts the bias to the inputs' dtype; the shape and device rules are the fused
        # op's (checked on a heads-last view of the query, no copy).
        rpb = _checks.check_rpb(rpb.to(query.dtype), query.movedim(1, -2), ks)
        bias = rpb[(slice(None),) + biases].flatten(1 + rank, 2 * rank)  # [H, *spatial, K]
        attn = attn + bias
    if valid is not None:
        attn = attn.masked_fill(~valid, float("-inf"))
    if additional_keys is not None:
        _check_extra(op, "additional_keys", additional_keys, query, query.shape[-1])
        extra = additional_keys.to(query.dtype).transpose(-1, -2)  # [B, H, D, M]
        extra = extra.view(extra.shape[:2] + (1,) * rank + extra.shape[2:])
        attn = torch.cat([attn, torch.matmul(query.unsqueeze(-2), extra).squeeze(-2)], dim=-1)
    return attn


def av(op: str, rank: int, attn, value, kernel_size, dilation, additional_values=None,
       is_causal=False) -> torch.Tensor:
    """``out_i = sum_t attn[i, t] v_{j_t(i)} + sum_m attn[i, K + m] additional_values[m]``;
    masked causal slots contribute nothing, whatever ``attn`` holds there."""
    _check_heads_first(op, "value", value, rank)
    _check_heads_first(op, "attn", attn, rank)
    spatial = tuple(value.shape[2:-1])
    ks, ds, cs = _window_args(op, spatial, kernel_size, dilation, is_causal)
    slots = math.prod(ks)
    extra = 0
    if additional_values is not None:
        extra = _check_extra(op, "additional_values", additional_values, value, value.shape[-1])
    want = tuple(value.shape[:-1]) + (slots + extra,)
    if tuple(attn.shape) != want:
        raise ValueError(
            f"{op}: attn.shape={tuple(attn.shape)} must be {want} ([B, H, *spatial, prod(K)"
            f"{' + additional tokens' if extra else ''}] for kernel_size={ks})"
        )
    if attn.device != value.device:
        raise ValueError(f"{op}: attn is on {attn.device}, value on {value.device}")
    keys, _, valid = _tables(spatial, ks, ds, cs, value.device)
    attn = attn.to(value.dtype)
    weights = attn[..., :slots]
    if valid is not None:
        weights = weights.masked_fill(~valid, 0)
    out = torch.matmul(weights.unsqueeze(-2), _gather(value, keys, rank)).squeeze(-2)
    if extra:
        tokens = additional_values.to(value.dtype)
        tokens = tokens.view(tokens.shape[:2] + (1,) * rank + tokens.shape[2:])
        out = out + torch.matmul(attn[..., slots:].unsqueeze(-2), tokens).squeeze(-2)
    return out
