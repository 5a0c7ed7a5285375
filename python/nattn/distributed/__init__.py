"""Context parallelism: exact neighborhood attention over a token layout sharded across the ranks
of a ``torch.distributed`` process group, along one spatial axis.

    out = nattn.distributed.neighborhood_attention(q, k, v, kernel_size=(18, 24, 24),
                                                   stride=(16, 8, 8), axis=0)

Each rank holds a contiguous slab of the global layout (rank 0 the first rows); slabs may be
uneven. Two strategies, both exact (docs/distributed.md has the proof and the byte counts):

* ``"halo"``: each rank receives from the ranks that own them exactly the key/value rows its
  queries' windows reach (from the window math of include/nattn/window.h), runs the local
  operator on a slab aligned to the stride and dilation blocks, and keeps its own rows. Backward
  sends the halo rows' key/value gradients back to their owners.
* ``"ulysses"``: an all-to-all from sequence sharding to head sharding, the whole layout for a
  chunk of the heads, and an all-to-all back. Needs heads and kv heads divisible by the group
  size.
* ``"auto"`` takes the one that moves fewer bytes per rank (``plan(...).explain()`` says why).

Communication is torch.distributed only (``batch_isend_irecv``, ``all_to_all_single``,
``all_reduce``, ``all_gather_object``); it runs on gloo (CPU) and NCCL (CUDA).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .. import modules as _modules
from ..functional import neighborhood_attention as _local_attention
from ._checks import check_call
from ._comm import (ByteCount, HaloGather, HeadsToSeq, KeepInGraph, Replicated, SeqToHeads,
                    count_bytes, start_halo)
from ._plan import Layout, Plan, halo_plan, make_plan, slab_bounds

__all__ = [
    "neighborhood_attention", "plan", "NeighborhoodAttention", "count_bytes", "ByteCount",
    "Plan", "Layout", "make_plan", "halo_plan", "slab_bounds",
]


def _checked_plan(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                  additional_keys, additional_values, return_lse, backend, axis, group,
                  strategy):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("nattn.distributed needs an initialized torch.distributed process "
                           "group (torch.distributed.init_process_group)")
    layout, na_args = check_call(
        query, key, value, additional_keys, additional_values, kernel_size=kernel_size,
        stride=stride, dilation=dilation, is_causal=is_causal, scale=scale,
        return_lse=return_lse, backend=backend, axis=axis, strategy=strategy, group=group)
    try:
        return make_plan(layout, strategy), na_args
    except ValueError as exc:  # ulysses requested but impossible: the same on every rank
        raise ValueError(f"nattn.distributed.neighborhood_attention: {exc}") from None


def plan(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
         additional_keys=None, additional_values=None, return_lse=False, backend="auto", *,
         axis: int = 0, group=None, strategy: str = "auto") -> Plan:
    """The plan ``neighborhood_attention`` would follow for these arguments: the strategy, the
    halo slabs and the closed-form bytes per rank of halo, Ulysses and all-gather
    (``.explain()`` prints the reasoning). Collective: every rank of ``group`` must call it.
    Raises what ``neighborhood_attention`` raises for the same arguments."""
    return _checked_plan(query, key, value, kernel_size, stride, dilation, is_causal, scale,
                         additional_keys, additional_values, return_lse, backend, axis, group,
                         strategy)[0]


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
    *,
    axis: int = 0,
    group=None,
    strategy: str = "auto",
):
    """``nattn.neighborhood_attention`` of a global layout sharded along one spatial axis over
    the ranks of ``group``; each rank gets the rows of its own slab. Collective: every rank of
    the group calls it with its own slab, and every rank runs the backward.

    Args:
        query, key, value: this rank's slabs ``[B, *local_spatial, H, D]``,
            ``[B, *local_spatial, H_kv, D]``, ``[B, *local_spatial, H_kv, D_v]``. All ranks agree
            on every dim except ``local_spatial[axis]``, which is this rank's slab length
            (>= 1; uneven is fine, e.g. 30 frames over 4 ranks as 8, 8, 7, 7). Rank r holds the
            rows after those of ranks 0..r-1.
        kernel_size, stride, dilation, is_causal, scale, return_lse, backend: as in
            ``nattn.neighborhood_attention``, for the global layout; ``backend`` is the local
            operator's (CPU kernels, CUDA kernels, reference). The same on every rank.
        additional_keys, additional_values: ``[B, M, H_kv, D]`` / ``[B, M, H_kv, D_v]``, the
            same tokens on every rank (e.g. the text tokens of a video model); their gradients
            are summed over the group, so every rank gets the gradient of the global call.
        axis: the sharded spatial axis, counted from 0 (default the first: frames of a video,
            rows of an image).
        group: the process group (default the world).
        strategy: ``"auto"``, ``"halo"`` or ``"ulysses"`` (module docstring).

    Returns:
        ``out`` ``[B, *local_spatial, H, D_v]``, or ``(out, lse)`` with ``lse``
        ``[B, *local_spatial, H]`` in float32: this rank's rows of the global result.

    Raises:
        ValueError (or TypeError for a wrong kind of value), on every rank alike, naming the
        rank and the rule: shapes that differ across ranks other than along the sharded axis,
        an empty slab, an axis the layout does not have, different dtypes, devices or
        arguments across ranks, heads or kv heads not divisible by the group size for
        ``strategy="ulysses"``, and every rule of ``nattn.neighborhood_attention`` applied to
        the global layout. RuntimeError: no initialized process group.
    """
    the_plan, na_args = _checked_plan(
        query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
        additional_values, return_lse, backend, axis, group, strategy)
    lay = the_plan.layout
    rank = dist.get_rank(group)
    if lay.num_additional == 0:
        additional_keys = additional_values = None
    elif lay.world_size > 1:
        # Created before every other communicating node of the call, so its backward (an
        # all-reduce) runs after theirs on every rank: autograd runs ready nodes latest-created
        # first, and the ranks' graphs may differ (halo pieces), so this fixes one order.
        additional_keys, additional_values = Replicated.apply(group, additional_keys,
                                                              additional_values)
    window = dict(kernel_size=na_args.kernel_size, stride=na_args.stride,
                  dilation=na_args.dilation, is_causal=na_args.is_causal, scale=na_args.scale,
                  backend=backend)
    if lay.world_size == 1:
        return _local_attention(query, key, value, additional_keys=additional_keys,
                                additional_values=additional_values, return_lse=return_lse,
                                **window)
    if the_plan.strategy == "halo":
        return _halo(the_plan, rank, group, query, key, value, additional_keys,
                     additional_values, return_lse, window)
    return _ulysses(the_plan, rank, group, query, key, value, additional_keys,
                    additional_values, return_lse, window)


def _halo(the_plan, rank, group, query, key, value, ak, av, return_lse, window):
    lay = the_plan.layout
    dim = lay.axis + 1
    me = the_plan.halo.slabs[rank]
    (own0, own1), (a, b) = me.own, me.slab
    pending = start_halo(key, value, the_plan.halo, rank, dim, group)

    def attend(q_rows, k_rows, v_rows, piece, slab_start):
        # the piece's slab out of tensors that start at global row slab_start; keep its queries
        (p0, p1), (s0, s1) = piece.queries, piece.slab
        out, lse = _local_attention(
            q_rows.narrow(dim, s0 - slab_start, s1 - s0),
            k_rows.narrow(dim, s0 - slab_start, s1 - s0),
            v_rows.narrow(dim, s0 - slab_start, s1 - s0),
            additional_keys=ak, additional_values=av, return_lse=True, **window)
        return out.narrow(dim, p0 - s0, p1 - p0), lse.narrow(dim, p0 - s0, p1 - p0)

    # The interior reads own rows only: computed while the halo is in flight.
    results = {p: attend(query, key, value, p, own0) for p in me.pieces if p.interior}
    k_ext, v_ext = HaloGather.apply(key, value, the_plan.halo, rank, dim, group, pending)
    # Query rows outside the own slab are computed and thrown away: zeros, never sent.
    before, after = list(query.shape), list(query.shape)
    before[dim], after[dim] = own0 - a, b - own1
    q_ext = torch.cat([query.new_zeros(before), query, query.new_zeros(after)], dim=dim)
    for p in me.pieces:
        if not p.interior:
            results[p] = attend(q_ext, k_ext, v_ext, p, a)
    parts = [results[p] for p in me.pieces]
    out = parts[0][0] if len(parts) == 1 else torch.cat([o for o, _ in parts], dim=dim)
    lse = parts[0][1] if len(parts) == 1 else torch.cat([s for _, s in parts], dim=dim)
    if all(p.interior for p in me.pieces) and torch.is_grad_enabled() and k_ext.requires_grad:
        # whichever result the loss uses, the reverse exchange runs on this rank
        out = KeepInGraph.apply(out, k_ext, v_ext)
        lse = KeepInGraph.apply(lse, k_ext, v_ext)
    return (out, lse) if return_lse else out


def _ulysses(the_plan, rank, group, query, key, value, ak, av, return_lse, window):
    lay = the_plan.layout
    p, dim, lengths = lay.world_size, lay.axis + 1, list(lay.lengths)
    head = query.dim() - 2
    q, k, v = SeqToHeads.apply(lengths, rank, [(dim, head)] * 3, group, query, key, value)
    if ak is not None:
        chunk = lay.kv_heads // p
        ak, av = ak.narrow(2, rank * chunk, chunk), av.narrow(2, rank * chunk, chunk)
    out, lse = _local_attention(q, k, v, additional_keys=ak, additional_values=av,
                                return_lse=True, **window)
    if not return_lse:
        (out,) = HeadsToSeq.apply(lengths, rank, [(dim, head)], group, out)
        return out
    return HeadsToSeq.apply(lengths, rank, [(dim, head), (dim, head)], group, out, lse)


class NeighborhoodAttention(_modules.NeighborhoodAttention):
    """``nattn.NeighborhoodAttention`` (fused q/k/v projection, neighborhood attention, output
    projection) on a layout sharded along ``axis`` over ``group``: ``x`` is this rank's slab
    ``[B, *local_spatial, embed_dim]`` and the result is this rank's slab of the global layer's
    output. The parameters are the same on every rank (replicate them, e.g. with DDP); the
    projections are per token, so only the attention communicates.

    Args: those of ``nattn.NeighborhoodAttention``, plus ``axis``, ``group`` and ``strategy`` of
    ``nattn.distributed.neighborhood_attention``. Raises what both raise; an ``x`` of the wrong
    rank or channel count raises on its own rank before the collective check (the projection
    runs first), so that error alone is not raised on every rank.
    """

    def __init__(self, embed_dim: int, num_heads: int, kernel_size, rank: int = 2, *,
                 axis: int = 0, group=None, strategy: str = "auto", **kwargs) -> None:
        super().__init__(embed_dim, num_heads, kernel_size, rank=rank, **kwargs)
        self.axis, self.group, self.strategy = axis, group, strategy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.rank + 2 or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"x.shape={tuple(x.shape)} must be [batch, {self.rank} spatial axes, "
                f"{self.embed_dim}]"
            )
        kv_dim = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([self.embed_dim, kv_dim, kv_dim], dim=-1)
        out = neighborhood_attention(
            q.unflatten(-1, (self.num_heads, self.head_dim)),
            k.unflatten(-1, (self.num_kv_heads, self.head_dim)),
            v.unflatten(-1, (self.num_kv_heads, self.head_dim)),
            self.kernel_size, self.stride, self.dilation, self.is_causal, self.scale,
            backend=self.backend, axis=self.axis, group=self.group, strategy=self.strategy,
        )
        return self.proj(out.flatten(-2))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, axis={self.axis}, strategy={self.strategy!r}"
