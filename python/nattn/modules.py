"""``torch.nn`` modules: the multi-head neighborhood-attention layer of NAT/DiNAT-style models."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .functional import neighborhood_attention

__all__ = [
    "NeighborhoodAttention",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
]


class NeighborhoodAttention(nn.Module):
    """Multi-head neighborhood attention over a ``rank``-D token layout.

    ``x [B, *spatial, embed_dim]`` -> fused q/k/v projection -> ``nattn.neighborhood_attention``
    -> output projection -> ``[B, *spatial, embed_dim]``. With ``num_kv_heads < num_heads`` the
    projection makes fewer key/value heads (GQA). As in NAT (arXiv 2204.07143) and DiNAT
    (2209.15001), minus relative positional biases.

    Args:
        embed_dim: channels C of the input and output; divisible by ``num_heads``.
        num_heads: query heads H; head dim is ``embed_dim // num_heads``.
        kernel_size, stride, dilation, is_causal: per-axis window parameters (see
            ``nattn.neighborhood_attention``), checked against the input at each call.
        rank: number of spatial axes (1, 2 or 3).
        num_kv_heads: key/value heads (default ``num_heads``); must divide ``num_heads``.
        qkv_bias, proj_bias: biases of the two projections.
        scale: softmax scale (default head_dim ** -0.5).
        backend: passed to ``nattn.neighborhood_attention``.

    Raises:
        ValueError: ``embed_dim`` not divisible by ``num_heads``, ``num_kv_heads`` not dividing
            ``num_heads``, or ``rank`` not in 1..3; at call time, the input's rank or channels
            do not match, or a window rule fails for its spatial shape.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kernel_size,
        rank: int = 2,
        stride=1,
        dilation=1,
        is_causal=False,
        num_kv_heads: Optional[int] = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        scale: Optional[float] = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if rank not in (1, 2, 3):
            raise ValueError(f"rank={rank!r} must be 1, 2 or 3")
        if num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim={embed_dim} must be a positive multiple of num_heads={num_heads}"
            )
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.rank = rank
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.is_causal, self.scale, self.backend = is_causal, scale, backend
        kv_dim = num_kv_heads * self.head_dim
        self.qkv = nn.Linear(embed_dim, embed_dim + 2 * kv_dim, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.rank + 2 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"x.shape={tuple(x.shape)} must be [batch, {self.rank} spatial axes, "
                f"{self.embed_dim}]"
            )
        kv_dim = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([self.embed_dim, kv_dim, kv_dim], dim=-1)
        heads = lambda t, h: t.unflatten(-1, (h, self.head_dim))  # noqa: E731
        out = neighborhood_attention(
            heads(q, self.num_heads), heads(k, self.num_kv_heads), heads(v, self.num_kv_heads),
            self.kernel_size, self.stride, self.dilation, self.is_causal, self.scale,
            backend=self.backend,
        )
        return self.proj(out.flatten(-2))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, rank={self.rank}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}, "
            f"is_causal={self.is_causal}"
        )


def _ranked_module(rank: int):
    class _NA(NeighborhoodAttention):
        def __init__(self, embed_dim: int, num_heads: int, kernel_size, **kwargs) -> None:
            if "rank" in kwargs:
                raise TypeError(f"NeighborhoodAttention{rank}D has a fixed rank={rank}")
            super().__init__(embed_dim, num_heads, kernel_size, rank=rank, **kwargs)

    _NA.__name__ = _NA.__qualname__ = f"NeighborhoodAttention{rank}D"
    _NA.__doc__ = f"``NeighborhoodAttention`` with ``rank={rank}``: x is ``[B, *{rank} axes, C]``."
    return _NA


NeighborhoodAttention1D = _ranked_module(1)
NeighborhoodAttention2D = _ranked_module(2)
NeighborhoodAttention3D = _ranked_module(3)
