"""Public functional API: ``neighborhood_attention`` and its rank-specific forms."""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, backends, ops  # noqa: F401  (ops registers torch.ops.nattn.*)
from ._native import Window

__all__ = ["neighborhood_attention", "na1d", "na2d", "na3d"]


def _call(query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
          additional_values, return_lse, backend, expected_rank, rpb):
    args = _checks.normalize(
        query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
        additional_values, expected_rank=expected_rank, rpb=rpb,
    )
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse={return_lse!r} must be a bool")
    window = Window(args.kernel_size, args.stride, args.dilation, args.is_causal, args.scale)
    problem = backends.Problem.from_tensors(query, key, value, window, args.additional_keys,
                                            rpb)
    chosen = backends.resolve(backend, problem)
    out, lse = torch.ops.nattn.na_forward(
        query, key, value, args.additional_keys, args.additional_values,
        list(args.kernel_size), list(args.stride), list(args.dilation), list(args.is_causal),
        args.scale, chosen.name, rpb=rpb,
    )
    return (out, lse) if return_lse else out


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
    backend: str = "auto",
    rpb: Optional[torch.Tensor] = None,
):
    """Neighborhood attention over a 1-D, 2-D or 3-D token layout (NA, DiNA, GNA).

    Each query attends to the keys in its window on every spatial axis (the neighborhood is the
    product of per-axis windows), with softmax over those keys (and the additional tokens):
    ``out_i = sum_j softmax_j(scale * q_i . k_j) v_j``. Per axis, with length L, kernel size K,
    stride s and dilation d: a query in dilation group ``i mod d`` sees only its group; a stride
    block of s queries shares the window of its leader; the window of K keys is centred on the
    leader and shifted inward at the borders (or, when causal, ends at the query itself). This
    is exactly NATTEN's operator (Hassani et al., "Neighborhood Attention Transformer",
    arXiv 2204.07143; "Dilated Neighborhood Attention Transformer", 2209.15001; "Generalized
    Neighborhood Attention", 2504.16922); docs/semantics.md gives the formulas and examples.
    Special cases: K = L (non-causal, s = d = 1) is self-attention; s = K is blocked attention.

    With a relative positional bias (NAT/DiNAT, NATTEN 0.17; DESIGN.md section 7) the score of
    query i and key j in its window becomes ``scale * q_i . k_j + rpb[h, b_0, ..., b_{r-1}]``
    with ``b_a = (j_a - i_a) / d_a + K_a - 1`` on each axis a (the offset in dilated steps, in
    ``[0, 2K_a - 2]`` for any stride, causal flag and border); the bias is not scaled and
    additional tokens get none.

    Args:
        query: ``[B, *spatial, H, D]``, 1 to 3 spatial axes; float16, bfloat16, float32 or
            float64. Any strides.
        key: ``[B, *spatial, H_kv, D]`` with ``H % H_kv == 0`` (GQA/MQA: query head h reads kv
            head ``h // (H // H_kv)``).
        value: ``[B, *spatial, H_kv, D_v]`` (``D_v`` may differ from ``D``).
        kernel_size: window size K per axis (int or tuple); ``1 <= K`` and
            ``K * dilation <= length`` on every axis.
        stride: s per axis, ``1 <= s <= K``. Default 1.
        dilation: d per axis, ``d >= 1``. Default 1.
        is_causal: bool per axis (or one for all). Default False.
        scale: multiplies ``q . k`` before the softmax. Default ``D ** -0.5``.
        additional_keys, additional_values: ``[B, M, H_kv, D]`` and ``[B, M, H_kv, D_v]``:
            extra tokens every query attends to, in the same softmax. Both or neither.
        return_lse: also return the log-sum-exp (natural log) of the scaled scores of each
            query, ``[B, *spatial, H]`` in float32; it is differentiable.
        backend: ``"auto"`` (the fastest backend that can run the call), or a name from
            ``nattn.backends.names()``.
        rpb: optional relative positional bias ``[H, 2*K_0 - 1, ..., 2*K_{r-1} - 1]`` (query
            heads first, one axis per spatial axis), in the query's dtype and on its device;
            any strides. Differentiable: its gradient is the sum of dS over batch and queries
            at each relative offset, computed deterministically.

    Returns:
        ``out`` ``[B, *spatial, H, D_v]`` in the input dtype, or ``(out, lse)`` with
        ``return_lse=True``. An empty batch (B = 0) gives empty results.

    Raises:
        TypeError: a non-tensor input (``rpb`` included), an unsupported dtype, a per-axis
            parameter of the wrong type (``is_causal`` must be bool), a non-numeric scale, a
            non-bool return_lse.
        ValueError: mismatched shapes, dtypes or devices; heads not divisible; a window rule
            broken (``kernel_size * dilation > length``, ``stride > kernel_size``, values < 1,
            wrong number of per-axis values); additional keys without values or of a wrong
            shape; ``rpb`` of a wrong shape, dtype or device; zero heads or head dims; an
            unknown backend or one that cannot run the call.
    """
    return _call(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                 additional_keys, additional_values, return_lse, backend, None, rpb)


def _ranked(rank: int):
    def na(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
           additional_keys=None, additional_values=None, return_lse=False, backend="auto",
           rpb=None):
        return _call(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                     additional_keys, additional_values, return_lse, backend, rank, rpb)

    na.__name__ = na.__qualname__ = f"na{rank}d"
    na.__doc__ = (
        f"{rank}-D neighborhood attention: ``neighborhood_attention`` for inputs of shape "
        f"``[B, {', '.join(f'X{i}' for i in range(rank))}, H, D]``; a query with another number "
        f"of spatial axes raises ValueError. ``rpb``, if given, is ``[H, "
        f"{', '.join(f'2*K_{i} - 1' for i in range(rank))}]``. See "
        "``nattn.neighborhood_attention`` for the arguments, semantics and errors."
    )
    return na


na1d = _ranked(1)
na2d = _ranked(2)
na3d = _ranked(3)
