"""NATTEN's attention modules on nattn, in both generations' forms, with NATTEN's parameter
names and shapes (so NATTEN checkpoints load with ``strict=True``):

- 0.20+ (``NeighborhoodAttention1D/2D/3D`` here, ``natten.modules``):
  ``(embed_dim, num_heads, kernel_size, stride=1, dilation=1, is_causal=False, qkv_bias=True,
  qk_scale=None, proj_drop=0.0)``; parameters ``qkv`` (Linear C -> 3C) and ``proj`` (C -> C).
- 0.17 and earlier (``LegacyNeighborhoodAttention1D/2D/3D``, exposed as
  ``nattn.compat.natten.legacy.NeighborhoodAttention*D``): ``(dim, num_heads, kernel_size,
  dilation=1, bias=True, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0)`` as in
  NATTEN <= 0.15 (``bias`` is the relative positional bias), with 0.17's
  ``rel_pos_bias`` and ``is_causal`` as keywords; parameters ``qkv``, ``rpb``
  ``[num_heads, 2K-1 per axis]`` (None without bias) and ``proj``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.init import trunc_normal_

from ... import _checks
from ... import modules as _nm
from . import _args, context, functional

__all__ = [
    "NeighborhoodAttentionGeneric", "NeighborhoodAttention1D", "NeighborhoodAttention2D",
    "NeighborhoodAttention3D", "LegacyNeighborhoodAttention", "LegacyNeighborhoodAttention1D",
    "LegacyNeighborhoodAttention2D", "LegacyNeighborhoodAttention3D",
]


class NeighborhoodAttentionGeneric(_nm.NeighborhoodAttention):
    """NATTEN 0.20+'s ``NeighborhoodAttentionGeneric(na_dim, embed_dim, num_heads, kernel_size,
    stride=1, dilation=1, is_causal=False, qkv_bias=True, qk_scale=None, proj_drop=0.0)``:
    ``nattn.NeighborhoodAttention`` with NATTEN's argument order, ``qk_scale`` (falsy: the
    default ``head_dim ** -0.5``, as in NATTEN), output dropout ``proj_drop``, and
    ``is_causal=None`` meaning False. ``x [B, *spatial, embed_dim]`` -> same shape.

    Raises: ValueError (``embed_dim`` not a multiple of ``num_heads``, ``na_dim`` not 1-3,
    window rules at call time), TypeError for arguments of the wrong kind.
    """

    def __init__(self, na_dim: int, embed_dim: int, num_heads: int, kernel_size, stride=1,
                 dilation=1, is_causal=False, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, proj_drop: float = 0.0) -> None:
        super().__init__(embed_dim, num_heads, kernel_size, rank=na_dim, stride=stride,
                         dilation=dilation, is_causal=_args.causal(is_causal),
                         qkv_bias=qkv_bias, scale=qk_scale or None)
        self.na_dim = na_dim
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(super().forward(x))


def _ranked(rank: int):
    class _NA(NeighborhoodAttentionGeneric):
        def __init__(self, embed_dim: int, num_heads: int, kernel_size, stride=1, dilation=1,
                     is_causal=False, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                     proj_drop: float = 0.0) -> None:
            super().__init__(rank, embed_dim, num_heads, kernel_size, stride, dilation,
                             is_causal, qkv_bias, qk_scale, proj_drop)

    _NA.__name__ = _NA.__qualname__ = f"NeighborhoodAttention{rank}D"
    _NA.__doc__ = (f"NATTEN 0.20+'s ``NeighborhoodAttention{rank}D(embed_dim, num_heads, "
                   "kernel_size, stride=1, dilation=1, is_causal=False, qkv_bias=True, "
                   "qk_scale=None, proj_drop=0.0)``; see ``NeighborhoodAttentionGeneric``.")
    return _NA


NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D = (
    _ranked(1), _ranked(2), _ranked(3))


class LegacyNeighborhoodAttention(nn.Module):
    """NATTEN <= 0.17's neighborhood-attention module with relative positional bias (the
    module of NAT, arXiv 2204.07143, and DiNAT, 2209.15001), over ``rank`` spatial axes.

    ``x [B, *spatial, dim]`` -> qkv -> per head ``softmax(scale * q . k + rpb) v`` over each
    query's window -> proj -> dropout. Inputs shorter than ``kernel_size * dilation`` on an axis
    are zero-padded at the end of that axis and the output cropped, as NATTEN <= 0.15 did.

    Two paths compute the same function: the fused op (``nattn.neighborhood_attention`` with
    ``rpb``), the default, and NATTEN's unfused ``na*d_qk`` -> softmax -> dropout -> ``na*d_av``,
    taken when ``context.use_fused_na(False)`` was called, or while training with
    ``attn_drop > 0`` (the fused op has no attention dropout, so the unfused path keeps it).

    Args (positional order of NATTEN <= 0.15):
        dim: channels; divisible by ``num_heads``.
        num_heads, kernel_size (int or per axis), dilation (int or per axis).
        bias: learn a relative positional bias ``rpb [num_heads, 2K-1 per axis]``
            (truncated normal, std 0.02). Default True, as in NATTEN <= 0.15.
        qkv_bias: bias of the qkv projection. qk_scale: softmax scale (falsy: head_dim**-0.5).
        attn_drop, proj_drop: dropout on the attention weights / the output.
        is_causal: keyword (0.17), bool or per axis; None: False. RPB composes with it here
            (NATTEN rejected the combination).
        rel_pos_bias: keyword (0.17's name of ``bias``); overrides ``bias`` when given.
        use_experimental_ops: accepted (0.17) and ignored: nattn's ops compile.

    Raises: ValueError (``dim`` not a multiple of ``num_heads``, bad window arguments),
    TypeError for arguments of the wrong kind.
    """

    def __init__(self, dim: int, num_heads: int, kernel_size, dilation=1, bias: bool = True,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, *, is_causal=False, rel_pos_bias: Optional[bool] = None,
                 use_experimental_ops: bool = False, rank: int = 2) -> None:
        super().__init__()
        if rank not in (1, 2, 3):
            raise ValueError(f"rank={rank!r} must be 1, 2 or 3")
        if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
        self.rank = rank
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.kernel_size = _checks.per_axis_ints("kernel_size", kernel_size, rank, ())
        self.dilation = _checks.per_axis_ints("dilation", 1 if dilation is None else dilation,
                                              rank, ())
        self.is_causal = _checks.per_axis_bools("is_causal", _args.causal(is_causal), rank)
        self.window_size = tuple(k * d for k, d in zip(self.kernel_size, self.dilation))
        with_bias = bias if rel_pos_bias is None else rel_pos_bias
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if with_bias:
            self.rpb = nn.Parameter(
                torch.zeros(num_heads, *(2 * k - 1 for k in self.kernel_size)))
            trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        else:
            self.register_parameter("rpb", None)
        self.attn_drop_rate = attn_drop
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.use_experimental_ops = use_experimental_ops

    def _fused(self) -> bool:
        return context.is_fused_na_enabled() and not (self.training and self.attn_drop_rate > 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        if x.dim() != r + 2 or x.shape[-1] != self.num_heads * self.head_dim:
            raise ValueError(
                f"x.shape={tuple(x.shape)} must be [batch, {r} spatial axes, "
                f"{self.num_heads * self.head_dim}]"
            )
        spatial = tuple(x.shape[1:-1])
        pad = [max(0, w - n) for w, n in zip(self.window_size, spatial)]
        if any(pad):
            # F.pad lists (before, after) pairs from the last axis backwards; channels unpadded.
            spec = [0, 0]
            for p in reversed(pad):
                spec += [0, p]
            x = nn.functional.pad(x, spec)
        B, padded, C = x.shape[0], tuple(x.shape[1:-1]), x.shape[-1]
        qkv = self.qkv(x).reshape(B, *padded, 3, self.num_heads, self.head_dim)
        if self._fused():
            q, k, v = qkv.unbind(-3)  # heads-last views, no copy
            extra = {} if self.rpb is None else {"rpb": self.rpb.to(q.dtype)}
            out = functional.neighborhood_attention_generic(
                q, k, v, self.kernel_size, 1, self.dilation, self.is_causal, self.scale,
                _rank=r, **extra,
            )
        else:
            # [3, B, H, *spatial, D]: NATTEN's heads-first layout, as a view.
            q, k, v = qkv.permute(r + 1, 0, r + 2, *range(1, r + 1), r + 3).unbind(0)
            qk, av = getattr(functional, f"na{r}d_qk"), getattr(functional, f"na{r}d_av")
            attn = qk(q * self.scale, k, self.kernel_size, self.dilation,
                      is_causal=self.is_causal, rpb=self.rpb)
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = av(attn, v, self.kernel_size, self.dilation, is_causal=self.is_causal)
            out = out.permute(0, *range(2, r + 2), 1, r + 2)  # heads-last
        out = out.reshape(B, *padded, C)
        if any(pad):
            out = out[(slice(None),) + tuple(slice(0, n) for n in spatial)]
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_heads={self.num_heads}, "
                f"kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"is_causal={self.is_causal}, rel_pos_bias={self.rpb is not None}")


def _legacy_ranked(rank: int):
    class _NA(LegacyNeighborhoodAttention):
        def __init__(self, dim: int, num_heads: int, kernel_size, dilation=1, bias: bool = True,
                     qkv_bias: bool = True, qk_scale: Optional[float] = None,
                     attn_drop: float = 0.0, proj_drop: float = 0.0, *, is_causal=False,
                     rel_pos_bias: Optional[bool] = None,
                     use_experimental_ops: bool = False) -> None:
            super().__init__(dim, num_heads, kernel_size, dilation, bias, qkv_bias, qk_scale,
                             attn_drop, proj_drop, is_causal=is_causal,
                             rel_pos_bias=rel_pos_bias,
                             use_experimental_ops=use_experimental_ops, rank=rank)

    _NA.__name__ = _NA.__qualname__ = f"NeighborhoodAttention{rank}D"
    _NA.__doc__ = (f"NATTEN <= 0.17's ``NeighborhoodAttention{rank}D(dim, num_heads, "
                   "kernel_size, dilation=1, bias=True, qkv_bias=True, qk_scale=None, "
                   "attn_drop=0.0, proj_drop=0.0, *, is_causal=False, rel_pos_bias=None)``; see "
                   "``LegacyNeighborhoodAttention``.")
    return _NA


LegacyNeighborhoodAttention1D, LegacyNeighborhoodAttention2D, LegacyNeighborhoodAttention3D = (
    _legacy_ranked(1), _legacy_ranked(2), _legacy_ranked(3))
