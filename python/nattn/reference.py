"""Reference neighborhood attention: a readable pure-PyTorch oracle.

Written from the operator's definition (docs/semantics.md; DESIGN.md section 2), independently
of the kernels and of ``include/nattn/window.h``: it builds the dense boolean mask of which query
attends to which key, then runs masked softmax attention. Its forward and backward are plain
PyTorch autograd.

Cost: O(N^2) memory and time for N tokens (the mask and the score matrix are materialized), so
it is meant for tests and small problems. It runs on any device and in any floating dtype,
float64 included.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = [
    "in_window",
    "unravel",
    "neighborhood_mask",
    "relative_bias",
    "neighborhood_attention",
    "neighborhood_attention_backward",
]


def in_window(
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    length: int,
    kernel_size: int,
    stride: int,
    dilation: int,
    is_causal: bool,
) -> torch.Tensor:
    """Whether key ``key_index`` lies in the window of query ``query_index`` on one axis.

    Elementwise over broadcast integer tensors, with no data-dependent control flow, so it also
    serves as (part of) a FlexAttention ``mask_mod``.

    One axis of ``length`` tokens, query index i:
      1. dilation group g = i mod d and position j = i div d; the group has
         ceil((length - g) / d) tokens, and attention never leaves the group;
      2. the stride block of j starts at b = s * (j div s); its leader is the block's centre
         ``b + s div 2`` (non-causal) or its last query ``b + s - 1`` (causal), capped at the
         group's last position;
      3. non-causal: the window is the K positions starting at
         ``clamp(leader - K div 2, 0, group_len - K)``; causal: positions from
         ``max(leader - K + 1, 0)`` up to j itself.

    Returns:
        bool tensor of the broadcast shape.
    """
    d = dilation
    g = query_index % d
    j = query_index // d
    u = key_index // d
    group_len = (length - g + d - 1) // d
    block = (j // stride) * stride
    offset = stride - 1 if is_causal else stride // 2
    leader = torch.minimum(block + offset, group_len - 1)
    if is_causal:
        start = torch.clamp(leader - kernel_size + 1, min=0)
        end = j + 1
    else:
        start = torch.maximum(
            torch.minimum(leader - kernel_size // 2, group_len - kernel_size),
            torch.zeros_like(leader),
        )
        end = start + kernel_size
    return (key_index % d == g) & (u >= start) & (u < end)


def unravel(flat_index: torch.Tensor, shape: Sequence[int]) -> list:
    """Row-major coordinates of flat token indices in a layout of ``shape`` (one tensor per axis)."""
    coords = []
    rest = flat_index
    for extent in reversed(shape):
        coords.append(rest % extent)
        rest = rest // extent
    return coords[::-1]


def neighborhood_mask(
    spatial_shape: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    is_causal: Sequence[bool],
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Dense mask ``[N, N]`` (N = prod(spatial_shape), row-major tokens): True where query row
    attends to key column. A query attends to a key iff the key is in its window on every axis.
    """
    n = math.prod(spatial_shape)
    idx = torch.arange(n, device=device)
    q_coords = unravel(idx, spatial_shape)
    mask = torch.ones(n, n, dtype=torch.bool, device=device)
    for axis, length in enumerate(spatial_shape):
        mask &= in_window(
            q_coords[axis][:, None],
            q_coords[axis][None, :],
            length,
            kernel_size[axis],
            stride[axis],
            dilation[axis],
            bool(is_causal[axis]),
        )
    return mask


def relative_bias(
    rpb: torch.Tensor,
    spatial_shape: Sequence[int],
    kernel_size: Sequence[int],
    dilation: Sequence[int],
    mask: torch.Tensor,
) -> torch.Tensor:
    """Dense relative positional bias ``[H, N, N]`` (DESIGN.md section 7, NATTEN 0.17).

    Query i and key j (row-major token indices) on axis a with kernel size K_a and dilation d_a
    use the bias index ``(j_a - i_a) / d_a + K_a - 1``; the bias is ``rpb[h, b_0, ..., b_{r-1}]``
    with ``rpb`` of shape ``[H, 2K_0 - 1, ..., 2K_{r-1} - 1]``. Entries outside ``mask`` (the
    neighborhood) are 0: they are never scored.
    """
    flat = _bias_index(spatial_shape, kernel_size, dilation, mask)
    table = rpb.reshape(rpb.shape[0], -1)
    return torch.where(mask, table[:, flat], torch.zeros((), dtype=rpb.dtype, device=rpb.device))


def _bias_index(spatial_shape, kernel_size, dilation, mask) -> torch.Tensor:
    """[N, N] flat index into rpb[h].reshape(-1) of each (query, key) pair (0 outside mask)."""
    n = math.prod(spatial_shape)
    coords = unravel(torch.arange(n, device=mask.device), spatial_shape)
    flat = torch.zeros(n, n, dtype=torch.long, device=mask.device)
    for axis in range(len(spatial_shape)):
        offset = coords[axis][None, :] - coords[axis][:, None]  # key - query, on the window
        index = torch.div(offset, dilation[axis], rounding_mode="trunc") + kernel_size[axis] - 1
        flat = flat * (2 * kernel_size[axis] - 1) + torch.where(mask, index, 0)
    return flat


def _per_axis(value, rank: int, name: str) -> tuple:
    if isinstance(value, (bool, int)):
        return (value,) * rank
    value = tuple(value)
    if len(value) != rank:
        raise ValueError(f"{name}={value!r} must have {rank} entries, one per spatial axis")
    return value


def neighborhood_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    scale: Optional[float] = None,
    additional_keys: Optional[torch.Tensor] = None,
    additional_values: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    rpb: Optional[torch.Tensor] = None,
):
    """Neighborhood attention by dense masked softmax (the test oracle).

    Args:
        query: ``[B, *spatial, H, D]``.
        key: ``[B, *spatial, H_kv, D]``, ``H % H_kv == 0`` (query head h reads kv head
            ``h // (H // H_kv)``).
        value: ``[B, *spatial, H_kv, D_v]``.
        kernel_size, stride, dilation, is_causal: per spatial axis (tuple) or one value for all.
        scale: multiplies ``q . k``; default ``D ** -0.5``.
        additional_keys / additional_values: ``[B, M, H_kv, D]`` / ``[B, M, H_kv, D_v]`` tokens
            every query attends to, in the same softmax.
        return_lse: also return the natural-log log-sum-exp of the scaled scores.
        rpb: optional relative positional bias ``[H, 2K_0 - 1, ..., 2K_{r-1} - 1]``, added
            (unscaled) to the scaled score of every neighborhood key (``relative_bias``);
            additional tokens get none. Differentiable through plain autograd.

    Returns:
        ``out`` ``[B, *spatial, H, D_v]`` in the input dtype, and with ``return_lse`` also
        ``lse`` ``[B, *spatial, H]`` in float32.

    Memory: O(B * H * N^2) for N tokens. This function does not validate its arguments beyond
    what it needs; the public API (``nattn.neighborhood_attention``) does.
    """
    _, _, v, scores, shape, mask = _dense_scores(
        query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
        additional_values, rpb,
    )
    lse = torch.logsumexp(scores.float() if scores.dtype != torch.float64 else scores, dim=-1)
    # A NaN score makes softmax NaN across its whole row, masked entries included: keep those 0.
    probs = torch.where(mask, torch.softmax(scores, dim=-1), 0)
    out = _heads_last(_masked_matmul(probs, v, mask), shape)
    if not return_lse:
        return out
    return out, _heads_last(lse.to(torch.float32)[..., None], shape)[..., 0]


def _masked_matmul(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``a @ b`` summed only where ``mask`` (broadcast like ``a``, [..., n, t]) holds: the
    neighborhood's own terms. ``a`` is 0 outside the mask, but a dense product would still
    multiply that 0 by every row of ``b`` (0 * NaN = NaN), so a non-finite entry of ``b`` would
    reach rows whose window does not contain it. The finite part of ``b`` goes through one dense
    product; the rows of ``b`` with a non-finite entry (rare) are added term by term, masked."""
    bad = ~torch.isfinite(b)
    if not bool(bad.any()):
        return torch.matmul(a, b)
    out = torch.matmul(a, b.masked_fill(bad, 0))
    rows = bad.any(-1)  # [..., t]
    while rows.dim() > 1:
        rows = rows.any(0)
    idx = rows.nonzero()[:, 0]
    a_bad = a.index_select(-1, idx)  # [..., n, j]
    m_bad = mask.expand(a.shape).index_select(-1, idx)
    b_bad = b.index_select(-2, idx).masked_fill(~bad.index_select(-2, idx), 0)  # [..., j, c]
    terms = a_bad.unsqueeze(-1) * b_bad.unsqueeze(-3)  # [..., n, j, c]
    terms = terms.masked_fill(~m_bad.unsqueeze(-1), 0)
    return out + terms.sum(-2)


def _heads_last(x: torch.Tensor, shape) -> torch.Tensor:
    """[B, H, N, C] -> [B, *spatial, H, C]."""
    return x.transpose(1, 2).reshape(shape[0], *shape[1:-1], x.shape[1], x.shape[-1])


def _dense_scores(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                  additional_keys, additional_values, rpb=None):
    """Queries [B, H, N, D], keys [B, H, N(+M), D] and values [B, H, N(+M), D_v] (kv heads
    repeated per query head, additional tokens appended), the masked scaled scores
    [B, H, N, N(+M)] (-inf outside the neighborhood; plus the relative bias when rpb is given),
    query's shape without its head dim, and the mask [N, N(+M)] (True inside the window)."""
    rank = query.dim() - 3
    spatial = tuple(query.shape[1:-2])
    batch, heads, head_dim = query.shape[0], query.shape[-2], query.shape[-1]
    kv_heads, value_dim = key.shape[-2], value.shape[-1]
    n = math.prod(spatial)
    if scale is None:
        scale = head_dim**-0.5
    kernel_size = _per_axis(kernel_size, rank, "kernel_size")
    dilation = _per_axis(dilation, rank, "dilation")
    mask = neighborhood_mask(
        spatial,
        kernel_size,
        _per_axis(stride, rank, "stride"),
        dilation,
        _per_axis(is_causal, rank, "is_causal"),
        device=query.device,
    )
    bias = None
    if rpb is not None:
        bias = relative_bias(rpb, spatial, kernel_size, dilation, mask)
    group = heads // kv_heads
    q = query.reshape(batch, n, heads, head_dim).transpose(1, 2)
    k = key.reshape(batch, n, kv_heads, head_dim).transpose(1, 2)
    v = value.reshape(batch, n, kv_heads, value_dim).transpose(1, 2)
    if additional_keys is not None:
        m = additional_keys.shape[1]
        k = torch.cat([k, additional_keys.transpose(1, 2)], dim=2)
        v = torch.cat([v, additional_values.transpose(1, 2)], dim=2)
        mask = torch.cat([mask, torch.ones(n, m, dtype=torch.bool, device=mask.device)], dim=1)
        if bias is not None:  # additional tokens get no bias
            bias = torch.cat([bias, bias.new_zeros(heads, n, m)], dim=2)
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    scores = scores.masked_fill(~mask, float("-inf"))
    return q, k, v, scores, tuple(query.shape[:-1]), mask


def neighborhood_attention_backward(
    grad_out: torch.Tensor,
    grad_lse: Optional[torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    scale: Optional[float] = None,
    additional_keys: Optional[torch.Tensor] = None,
    additional_values: Optional[torch.Tensor] = None,
    rpb: Optional[torch.Tensor] = None,
):
    """Gradients of ``neighborhood_attention`` written out densely (same O(N^2) memory).

    With P = softmax(S), S = scale * Q K^T + B (masked; B the relative bias, 0 without rpb),
    O = P V and lse = logsumexp(S): dV = P^T dO, dP = dO V^T,
    dS = P * (dP - rowsum(dO * O) + d_lse), dQ = scale * dS K, dK = scale * dS^T Q, and
    d_rpb[h, b] = sum of dS over batch and the (query, key) pairs at relative offset b.
    Key/value gradients are summed over the query heads sharing a kv head.

    Returns:
        ``(dq, dk, dv, d_additional_keys, d_additional_values)`` shaped like the inputs (the last
        two are None without additional tokens), and ``d_rpb`` (rpb's shape) appended as a
        sixth entry when ``rpb`` is given.
    """
    if scale is None:
        scale = query.shape[-1] ** -0.5
    q, k, v, scores, shape, mask = _dense_scores(
        query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
        additional_values, rpb,
    )
    batch, heads = query.shape[0], query.shape[-2]
    kv_heads = key.shape[-2]
    n = scores.shape[-2]
    probs = torch.where(mask, torch.softmax(scores, dim=-1), 0)  # as in the forward
    d_out = grad_out.reshape(batch, n, heads, -1).transpose(1, 2).to(probs.dtype)
    # Every product sums only the neighborhood's terms (_masked_matmul) and dS is selected, not
    # multiplied by P = 0, outside the window: a non-finite input reaches exactly the gradients
    # whose path contains it.
    out = _masked_matmul(probs, v, mask)
    row = (d_out * out).sum(-1, keepdim=True)
    if grad_lse is not None:
        row = row - grad_lse.reshape(batch, n, heads).transpose(1, 2)[..., None].to(row.dtype)
    d_scores = torch.where(mask, probs * (torch.matmul(d_out, v.transpose(-1, -2)) - row), 0)
    dq = _masked_matmul(d_scores, k, mask) * scale
    dk_all = _masked_matmul(d_scores.transpose(-1, -2), q, mask.transpose(-1, -2)) * scale
    dv_all = _masked_matmul(probs.transpose(-1, -2), d_out, mask.transpose(-1, -2))

    def per_kv_head(x):  # [B, H, T, C] -> [B, H_kv, T, C], summed over each kv head's group
        return x.reshape(batch, kv_heads, heads // kv_heads, x.shape[2], x.shape[3]).sum(2)

    dk_all, dv_all = per_kv_head(dk_all), per_kv_head(dv_all)
    kv_shape = tuple(key.shape[:-2])
    dq = _heads_last(dq, shape).to(query.dtype)
    dk = _heads_last(dk_all[:, :, :n], kv_shape + (kv_heads,)).to(key.dtype)
    dv = _heads_last(dv_all[:, :, :n], kv_shape + (kv_heads,)).to(value.dtype)
    dak = dav = None
    if additional_keys is not None:
        dak = dk_all[:, :, n:].transpose(1, 2).to(key.dtype)
        dav = dv_all[:, :, n:].transpose(1, 2).to(value.dtype)
    if rpb is None:
        return dq, dk, dv, dak, dav
    d_rpb = _bias_grad(d_scores[..., :n], rpb, tuple(query.shape[1:-2]), kernel_size, stride,
                       dilation, is_causal)
    return dq, dk, dv, dak, dav, d_rpb


def _bias_grad(d_scores, rpb, spatial, kernel_size, stride, dilation, is_causal):
    """d_rpb from dS [B, H, N, N] (neighborhood keys only): the adjoint of ``relative_bias``,
    dS summed over the batch and scattered onto each pair's bias entry."""
    rank = len(spatial)
    kernel_size = _per_axis(kernel_size, rank, "kernel_size")
    dilation = _per_axis(dilation, rank, "dilation")
    mask = neighborhood_mask(spatial, kernel_size, _per_axis(stride, rank, "stride"), dilation,
                             _per_axis(is_causal, rank, "is_causal"), device=rpb.device)
    flat = _bias_index(spatial, kernel_size, dilation, mask)[mask]
    terms = d_scores.sum(0)[:, mask]  # [H, pairs]
    grad = terms.new_zeros(rpb.shape[0], rpb[0].numel()).index_add_(1, flat, terms)
    return grad.reshape(rpb.shape).to(rpb.dtype)
