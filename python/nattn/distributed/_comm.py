"""The exchanges, as autograd Functions over torch.distributed (no communication layer of our own).

* ``HaloGather``: every rank receives the key/value rows of its halo from their owners
  (``batch_isend_irecv``, one message per ordered pair of ranks that share rows) and builds its
  zero-padded local slab; backward sends the halo rows' gradients back, and the owner adds them
  to its own.
* ``SeqToHeads`` / ``HeadsToSeq``: Ulysses' swap between sequence sharding and head sharding
  (``all_to_all_single`` with uneven splits, one call per tensor); each is the other's backward.
* ``Replicated``: identity forward for the additional tokens every rank holds; backward
  all-reduces (sums) their gradients over the group.

Every rank counts the payload bytes it sends and receives (``count_bytes``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ._plan import HaloPlan

__all__ = ["ByteCount", "count_bytes", "start_halo", "PendingHalo", "HaloGather", "KeepInGraph", "SeqToHeads", "HeadsToSeq", "Replicated"]


@dataclass
class ByteCount:
    """Payload bytes this rank sent and received, per phase ("forward", "backward")."""

    sent: Dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    received: Dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})

    def add(self, phase: str, sent: int, received: int) -> None:
        self.sent[phase] += sent
        self.received[phase] += received


_ACTIVE: List[ByteCount] = []


@contextlib.contextmanager
def count_bytes():
    """Count the payload bytes this rank's context-parallel calls send and receive inside the
    ``with`` block (forward and backward separately)::

        with nattn.distributed.count_bytes() as c:
            out = nattn.distributed.neighborhood_attention(q, k, v, 7)
            out.sum().backward()
        c.sent["forward"], c.received["backward"]

    The up-front shape check (one ``all_gather_object`` of a small dict) is not counted."""
    counter = ByteCount()
    _ACTIVE.append(counter)
    try:
        yield counter
    finally:
        _ACTIVE.remove(counter)


def _count(phase: str, sent: int, received: int) -> None:
    for counter in _ACTIVE:
        counter.add(phase, sent, received)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _peer(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _p2p_start(sends, recvs, group) -> list:
    """Post every send and receive at once (no ordering can deadlock); returns the requests."""
    ops = [dist.P2POp(dist.isend, t, _peer(group, r), group) for r, t in sends]
    ops += [dist.P2POp(dist.irecv, t, _peer(group, r), group) for r, t in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


def _p2p(sends, recvs, group) -> None:
    for req in _p2p_start(sends, recvs, group):
        req.wait()


def _flat(*pieces: torch.Tensor) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in pieces])


class PendingHalo:
    """A halo exchange posted by ``start_halo`` and not yet waited for; the send buffers live
    here until ``HaloGather`` waits."""

    def __init__(self, requests, sends, recvs, pieces):
        self.requests, self.sends, self.recvs, self.pieces = requests, sends, recvs, pieces


def start_halo(key, value, plan: HaloPlan, rank: int, dim: int, group) -> PendingHalo:
    """Post this rank's halo sends and receives (the forward of ``HaloGather``) and return at
    once, so that compute on own rows can run while the rows travel."""
    own0 = plan.slabs[rank].own[0]
    sends, recvs, pieces = [], [], []
    with torch.no_grad():
        for t in plan.transfers:
            if t.src == rank:
                start = t.begin - own0
                sends.append((t.dst, _flat(key.narrow(dim, start, t.rows),
                                           value.narrow(dim, start, t.rows))))
            elif t.dst == rank:
                kshape, vshape = list(key.shape), list(value.shape)
                kshape[dim] = vshape[dim] = t.rows
                buf = key.new_empty(_numel(kshape) + _numel(vshape))
                recvs.append((t.src, buf))
                pieces.append((t, kshape, vshape, buf))
    return PendingHalo(_p2p_start(sends, recvs, group), sends, recvs, pieces)


class HaloGather(torch.autograd.Function):
    """``(key, value)`` own slabs -> the local slabs ``[A, B)`` of ``plan.slabs[rank]`` along
    tensor dim ``dim``: own rows in place, halo rows received, every other row zero. ``pending``:
    the exchange already posted by ``start_halo`` (else it is posted here)."""

    @staticmethod
    def forward(ctx, key, value, plan: HaloPlan, rank: int, dim: int, group,
                pending: Optional[PendingHalo] = None):
        ctx.plan, ctx.rank, ctx.dim, ctx.group = plan, rank, dim, group
        if pending is None:
            pending = start_halo(key, value, plan, rank, dim, group)
        for req in pending.requests:
            req.wait()
        _count("forward", sum(_nbytes(x) for _, x in pending.sends),
               sum(_nbytes(x) for _, x in pending.recvs))
        me = plan.slabs[rank]
        own0, own1 = me.own
        a, b = me.slab
        kshape, vshape = list(key.shape), list(value.shape)
        kshape[dim] = vshape[dim] = b - a
        k_ext, v_ext = key.new_zeros(kshape), value.new_zeros(vshape)
        k_ext.narrow(dim, own0 - a, own1 - own0).copy_(key)
        v_ext.narrow(dim, own0 - a, own1 - own0).copy_(value)
        for t, ks, vs, buf in pending.pieces:
            nk = _numel(ks)
            k_ext.narrow(dim, t.begin - a, t.rows).copy_(buf[:nk].view(ks))
            v_ext.narrow(dim, t.begin - a, t.rows).copy_(buf[nk:].view(vs))
        return k_ext, v_ext

    @staticmethod
    def backward(ctx, dk_ext, dv_ext):
        plan, rank, dim, group = ctx.plan, ctx.rank, ctx.dim, ctx.group
        me = plan.slabs[rank]
        own0, own1 = me.own
        a = me.slab[0]
        dk = dk_ext.narrow(dim, own0 - a, own1 - own0).clone()
        dv = dv_ext.narrow(dim, own0 - a, own1 - own0).clone()
        sends, recvs, pieces = [], [], []
        for t in plan.transfers:
            if t.dst == rank:  # my halo rows' gradients go back to their owner
                sends.append((t.src, _flat(dk_ext.narrow(dim, t.begin - a, t.rows),
                                           dv_ext.narrow(dim, t.begin - a, t.rows))))
            elif t.src == rank:
                ks, vs = list(dk.shape), list(dv.shape)
                ks[dim] = vs[dim] = t.rows
                buf = dk.new_empty(_numel(ks) + _numel(vs))
                recvs.append((t.dst, buf))
                pieces.append((t, ks, vs, buf))
        _p2p(sends, recvs, group)
        _count("backward", sum(_nbytes(x) for _, x in sends), sum(_nbytes(x) for _, x in recvs))
        for t, ks, vs, buf in pieces:
            nk = _numel(ks)
            dk.narrow(dim, t.begin - own0, t.rows).add_(buf[:nk].view(ks))
            dv.narrow(dim, t.begin - own0, t.rows).add_(buf[nk:].view(vs))
        return dk, dv, None, None, None, None, None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _all_to_all(pieces: List[torch.Tensor], recv_shapes: List[List[int]], rank: int, group,
                phase: str) -> List[torch.Tensor]:
    """Send ``pieces[p]`` to rank p and return what each rank p sent here, shaped
    ``recv_shapes[p]``: one ``all_to_all_single`` with uneven splits (gloo and NCCL both run
    it). The piece a rank keeps is not counted as communication."""
    send = _flat(*pieces)
    recv_sizes = [_numel(s) for s in recv_shapes]
    recv = send.new_empty(sum(recv_sizes))
    dist.all_to_all_single(recv, send, recv_sizes, [p.numel() for p in pieces], group=group)
    e = send.element_size()
    _count(phase, (send.numel() - pieces[rank].numel()) * e,
           (recv.numel() - recv_sizes[rank]) * e)
    return [c.view(s) for c, s in zip(recv.split(recv_sizes), recv_shapes)]


def _seq_to_heads(x, lengths, rank, seq_dim, head_dim, group, phase):
    p = len(lengths)
    chunk = x.shape[head_dim] // p
    pieces = [x.narrow(head_dim, i * chunk, chunk) for i in range(p)]
    shapes = []
    for n in lengths:
        s = list(x.shape)
        s[seq_dim], s[head_dim] = n, chunk
        shapes.append(s)
    return torch.cat(_all_to_all(pieces, shapes, rank, group, phase), dim=seq_dim)


def _heads_to_seq(y, lengths, rank, seq_dim, head_dim, group, phase):
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    pieces = [y.narrow(seq_dim, s, n) for s, n in zip(starts, lengths)]
    shape = list(y.shape)
    shape[seq_dim] = lengths[rank]
    return torch.cat(_all_to_all(pieces, [shape] * len(lengths), rank, group, phase),
                     dim=head_dim)


class _Swap(torch.autograd.Function):
    """Ulysses' swap of tensors between sequence and head sharding; ``dims``: one
    (seq_dim, head_dim) per tensor. Its backward is the swap the other way."""

    @staticmethod
    def forward(ctx, to_heads, lengths, rank, dims, group, *tensors):
        ctx.args = (to_heads, lengths, rank, dims, group)
        swap = _seq_to_heads if to_heads else _heads_to_seq
        return tuple(swap(t, lengths, rank, sd, hd, group, "forward")
                     for t, (sd, hd) in zip(tensors, dims))

    @staticmethod
    def backward(ctx, *grads):
        to_heads, lengths, rank, dims, group = ctx.args
        swap = _heads_to_seq if to_heads else _seq_to_heads
        return (None,) * 5 + tuple(swap(g, lengths, rank, sd, hd, group, "backward")
                                   for g, (sd, hd) in zip(grads, dims))


class SeqToHeads:
    """Tensors sharded along ``seq_dim`` (slab lengths ``lengths``) with all heads -> the whole
    sequence with head chunk ``rank`` of ``P`` along ``head_dim``; differentiable."""

    @staticmethod
    def apply(lengths, rank, dims, group, *tensors):
        return _Swap.apply(True, lengths, rank, dims, group, *tensors)


class HeadsToSeq:
    """The inverse of ``SeqToHeads``; differentiable."""

    @staticmethod
    def apply(lengths, rank, dims, group, *tensors):
        return _Swap.apply(False, lengths, rank, dims, group, *tensors)


class Replicated(torch.autograd.Function):
    """Tensors every rank holds alike (the additional tokens): identity forward; backward sums
    their gradients over the group (one ``all_reduce`` of both, flattened)."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        ctx.shapes = [t.shape for t in tensors]
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        flat = _flat(*grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ctx.group)
        _count("backward", _nbytes(flat), _nbytes(flat))
        out = [c.view(s) for c, s in zip(flat.split([_numel(s) for s in ctx.shapes]), ctx.shapes)]
        return (None,) + tuple(out)


class KeepInGraph(torch.autograd.Function):
    """``out`` unchanged; its backward hands zero gradients to ``anchors``, so that the nodes
    producing them run their backward on this rank too. A rank whose every query is interior
    never reads its gathered slab, yet must take part in the reverse halo exchange (it receives
    the gradients of the rows it sent)."""

    @staticmethod
    def forward(ctx, out, *anchors):
        ctx.anchors = [(a.shape, a.dtype, a.device) for a in anchors]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return (grad,) + tuple(torch.zeros(s, dtype=t, device=d) for s, t, d in ctx.anchors)
