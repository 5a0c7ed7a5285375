"""The communication plan of context-parallel neighborhood attention: pure functions, no processes.

A layout of global length ``L`` along the sharded axis is split into contiguous slabs, one per
rank, ``[begin_r, end_r)``. Everything here is computed identically on every rank from the slab
lengths and the window parameters, so no rank needs to ask another which rows it wants.

Halo (docs/distributed.md proves the exactness):

* ``needed_r = [lo, hi)``: the hull of the keys that rank r's own queries' windows reach along
  the sharded axis, from ``nattn._C.axis_windows`` (include/nattn/window.h); it holds the own
  slab (every query lies in its own window);
* ``slab_r = [A, B)``: ``needed_r`` widened to multiples of ``dilation * stride`` (or to 0 and
  L), and further by whole such blocks until ``kernel_size * dilation <= B - A``. Running the
  local operator on ``[A, B)`` gives every own query its global window, shifted by A. Rows of
  the slab outside ``needed_r`` are never attended by an own query, so they are zeros, not
  received; query rows outside the own slab are zeros too (only keys and values travel);
* ``pieces``: the local operator calls. With small windows on a long slab, the interior (own
  queries whose keys lie in the own rows' aligned core) runs on that core while the halo is in
  flight, and the edge queries afterwards on their own aligned slabs.

Bytes are counted per rank per call, as a payload (``numel * element_size`` of what this rank
hands to the communication library and gets back from it; the library's own framing and, for
collectives, its internal algorithm are not counted). The same formulas are checked against the
counts taken inside the exchange code in tests/test_distributed.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .._native import IMPORT_ERROR, _C

__all__ = [
    "STRATEGIES", "slab_bounds", "Piece", "RankSlab", "Transfer", "HaloPlan", "halo_plan", "Layout",
    "StrategyCost", "Plan", "make_plan",
]

STRATEGIES = ("auto", "halo", "ulysses")


def slab_bounds(lengths: Sequence[int]) -> List[Tuple[int, int]]:
    """``[begin, end)`` of each rank's slab, in rank order, from the slab lengths."""
    bounds, start = [], 0
    for n in lengths:
        bounds.append((start, start + int(n)))
        start += int(n)
    return bounds


@dataclass(frozen=True)
class Piece:
    """One local operator call of a rank: queries ``[q0, q1)`` computed on the slab ``[A, B)``.
    An ``interior`` piece reads own rows only, so it runs while the halo is in flight."""

    queries: Tuple[int, int]
    slab: Tuple[int, int]
    interior: bool = False

    @property
    def rows(self) -> int:
        return self.slab[1] - self.slab[0]


@dataclass(frozen=True)
class RankSlab:
    """What one rank computes along the sharded axis (global indices, half-open)."""

    rank: int
    own: Tuple[int, int]
    needed: Tuple[int, int]
    slab: Tuple[int, int]
    # The local operator calls, in row order: ``(own, slab)`` alone, or, when the halo can be
    # overlapped, a left edge, the interior and a right edge (each present if non-empty).
    pieces: Tuple[Piece, ...] = ()

    @property
    def halo_rows(self) -> int:
        """Key/value rows received from other ranks."""
        return (self.needed[1] - self.needed[0]) - (self.own[1] - self.own[0])

    @property
    def pad_rows(self) -> int:
        """Rows of the local slab that are zeros: alignment and minimum length, never attended."""
        return (self.slab[1] - self.slab[0]) - (self.needed[1] - self.needed[0])

    @property
    def computed_rows(self) -> int:
        """Query rows the local operator calls compute (own rows included)."""
        return sum(p.rows for p in self.pieces)

    @property
    def wasted_query_rows(self) -> int:
        """Query rows the local operator computes and throws away."""
        return self.computed_rows - (self.own[1] - self.own[0])

    @property
    def overlapped(self) -> bool:
        return any(p.interior for p in self.pieces)


@dataclass(frozen=True)
class Transfer:
    """Rows ``[begin, end)`` of the sharded axis that rank ``src`` owns and rank ``dst`` needs."""

    src: int
    dst: int
    begin: int
    end: int

    @property
    def rows(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class HaloPlan:
    length: int
    kernel_size: int
    stride: int
    dilation: int
    is_causal: bool
    slabs: Tuple[RankSlab, ...]
    transfers: Tuple[Transfer, ...]  # ordered by (dst, src); at most one per ordered pair

    def received_rows(self, rank: int) -> int:
        return sum(t.rows for t in self.transfers if t.dst == rank)

    def sent_rows(self, rank: int) -> int:
        return sum(t.rows for t in self.transfers if t.src == rank)


def _require_native() -> None:
    if _C is None:
        raise RuntimeError(f"nattn.distributed needs the native module: {IMPORT_ERROR}")


# Overlap only when the split costs little extra compute: the edge pieces together may add at
# most this fraction of the single slab's rows (small windows on long slabs: a few percent).
OVERLAP_MAX_EXTRA = 0.25


def _hull(windows, d: int, q0: int, q1: int) -> Tuple[int, int]:
    """The hull ``[lo, hi)`` of the keys of queries ``[q0, q1)`` (axis_windows rows)."""
    lo = min(windows[i][0] for i in range(q0, q1))
    hi = max(windows[i][0] + d * (windows[i][1] - 1) + 1 for i in range(q0, q1))
    return lo, hi


def _aligned(lo: int, hi: int, k: int, d: int, s: int, floor: int, ceil: int,
             length: int) -> Tuple[int, int]:
    """The slab for keys ``[lo, hi)``: ends on multiples of ``d * s`` (or at 0 / L), widened by
    whole blocks, right first, within ``[floor, ceil)`` (themselves aligned) until
    ``kernel_size * dilation`` rows fit (docs/distributed.md, conditions 1-4)."""
    block = d * s
    begin = (lo // block) * block
    end = min(length, -(-hi // block) * block)
    while end - begin < k * d:
        if end < ceil:
            end = min(ceil, end + block)
        elif begin > floor:
            begin = max(floor, begin - block)
        else:
            raise AssertionError("an aligned slab of at least kernel_size * dilation rows exists")
    return begin, end


def _split(windows, k, s, d, length, own, needed, slab) -> Tuple[Piece, ...]:
    """Pieces of an overlapped rank: the longest run of own queries whose keys lie in the own
    rows' aligned core (the core: own rows shrunk to multiples of d*s, or to 0 / L), computed
    on that core, plus the edge queries on their own aligned slabs within ``slab``."""
    (o0, o1), block = own, d * s
    core0 = o0 if o0 == 0 else -(-o0 // block) * block
    core1 = o1 if o1 == length else (o1 // block) * block
    single = (Piece(own, slab),)
    if core1 - core0 < k * d:
        return single
    best, run = (0, 0), None
    for i in range(core0, core1 + 1):
        inside = i < core1 and core0 <= windows[i][0] and \
            windows[i][0] + d * (windows[i][1] - 1) < core1
        if inside and run is None:
            run = i
        elif not inside and run is not None:
            if i - run > best[1] - best[0]:
                best = (run, i)
            run = None
    q0, q1 = best
    if q1 <= q0:
        return single
    pieces = []
    if q0 > o0:
        lo, hi = _hull(windows, d, o0, q0)
        pieces.append(Piece((o0, q0), _aligned(lo, hi, k, d, s, slab[0], slab[1], length)))
    pieces.append(Piece((q0, q1), (core0, core1), interior=True))
    if o1 > q1:
        lo, hi = _hull(windows, d, q1, o1)
        pieces.append(Piece((q1, o1), _aligned(lo, hi, k, d, s, slab[0], slab[1], length)))
    if sum(p.rows for p in pieces) > (1 + OVERLAP_MAX_EXTRA) * (slab[1] - slab[0]):
        return single
    return tuple(pieces)


def halo_plan(lengths: Sequence[int], kernel_size: int, stride: int, dilation: int,
              is_causal: bool, overlap: bool = True) -> HaloPlan:
    """The halo plan of one sharded axis (module docstring). ``lengths``: slab length per rank,
    each >= 1; their sum is the global length L, and the window parameters must be valid for L
    (``kernel_size * dilation <= L``, ``stride <= kernel_size``). With ``overlap``, a rank whose
    slab has an interior that needs no halo computes it while the halo is in flight."""
    _require_native()
    bounds = slab_bounds(lengths)
    length = bounds[-1][1]
    k, s, d = int(kernel_size), int(stride), int(dilation)
    windows = _C.axis_windows(length, k, s, d, bool(is_causal))
    slabs = []
    for rank, own in enumerate(bounds):
        lo, hi = _hull(windows, d, *own)
        slab = _aligned(lo, hi, k, d, s, 0, length, length)
        pieces = _split(windows, k, s, d, length, own, (lo, hi), slab) if overlap \
            else (Piece(own, slab),)
        slabs.append(RankSlab(rank, own, (lo, hi), slab, pieces))
    transfers = []
    for dst in slabs:
        for src, (b, e) in enumerate(bounds):
            if src == dst.rank:
                continue
            begin, end = max(b, dst.needed[0]), min(e, dst.needed[1])
            if begin < end:
                transfers.append(Transfer(src, dst.rank, begin, end))
    return HaloPlan(length, k, s, d, bool(is_causal), tuple(slabs), tuple(transfers))


@dataclass(frozen=True)
class Layout:
    """The global problem: what the byte and compute counts depend on."""

    lengths: Tuple[int, ...]          # slab length per rank along the sharded axis
    axis: int                         # sharded spatial axis
    spatial_shape: Tuple[int, ...]    # global spatial shape
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    num_additional: int
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    is_causal: Tuple[bool, ...]
    element_size: int                 # bytes per element of q, k, v, out
    return_lse: bool = False
    requires_grad: bool = False

    @property
    def world_size(self) -> int:
        return len(self.lengths)

    @property
    def row_tokens(self) -> int:
        """Tokens in one row of the sharded axis (the product of the other spatial extents)."""
        return math.prod(e for a, e in enumerate(self.spatial_shape) if a != self.axis)


@dataclass
class StrategyCost:
    """Bytes (payload) per rank per call of one strategy, forward and backward, and the rows of
    the sharded axis each rank computes (own plus wasted)."""

    strategy: str
    feasible: bool
    reason: str = ""
    forward_sent: List[int] = field(default_factory=list)
    forward_received: List[int] = field(default_factory=list)
    backward_sent: List[int] = field(default_factory=list)
    backward_received: List[int] = field(default_factory=list)
    computed_rows: List[int] = field(default_factory=list)
    computed_heads: int = 0

    def per_rank(self, backward: bool) -> List[int]:
        """Sent + received bytes of each rank, forward (+ backward)."""
        total = [s + r for s, r in zip(self.forward_sent, self.forward_received)]
        if backward:
            total = [t + s + r for t, s, r in
                     zip(total, self.backward_sent, self.backward_received)]
        return total

    def max_per_rank(self, backward: bool) -> int:
        return max(self.per_rank(backward))


def _kv_row_bytes(lay: Layout) -> int:
    return lay.batch * lay.row_tokens * lay.kv_heads * (lay.head_dim + lay.value_dim) \
        * lay.element_size


def _additional_bytes(lay: Layout) -> int:
    """Payload of the all-reduce of the additional tokens' key and value gradients."""
    return lay.batch * lay.num_additional * lay.kv_heads * (lay.head_dim + lay.value_dim) \
        * lay.element_size


def halo_cost(lay: Layout, plan: HaloPlan) -> StrategyCost:
    row = _kv_row_bytes(lay)
    ranks = range(lay.world_size)
    sent = [plan.sent_rows(r) * row for r in ranks]
    received = [plan.received_rows(r) * row for r in ranks]
    extra = _additional_bytes(lay)
    # backward: the halo rows' key/value gradients go back the way the rows came
    return StrategyCost(
        "halo", True, "",
        forward_sent=sent, forward_received=received,
        backward_sent=[b + extra for b in received], backward_received=[b + extra for b in sent],
        computed_rows=[s.computed_rows for s in plan.slabs], computed_heads=lay.heads)


def ulysses_infeasible(lay: Layout) -> Optional[str]:
    p = lay.world_size
    if lay.heads % p or lay.kv_heads % p:
        return (f"ulysses needs heads ({lay.heads}) and kv heads ({lay.kv_heads}) divisible by "
                f"the group size {p}")
    return None


def ulysses_cost(lay: Layout) -> StrategyCost:
    reason = ulysses_infeasible(lay)
    if reason:
        return StrategyCost("ulysses", False, reason)
    p, e = lay.world_size, lay.element_size
    tok = lay.batch * lay.row_tokens
    hc, hkc = lay.heads // p, lay.kv_heads // p
    # per token of one head chunk: q, k, v in; out (and lse, fp32) back
    qkv = hc * lay.head_dim * e + hkc * (lay.head_dim + lay.value_dim) * e
    ret = hc * lay.value_dim * e + (hc * 4 if lay.return_lse else 0)
    length = sum(lay.lengths)
    fs, fr = [], []
    for n in lay.lengths:
        # to heads: my n rows of the other P-1 head chunks out, the other L - n rows of mine in;
        # back to the sequence: the reverse for out (and lse)
        fs.append((p - 1) * n * tok * qkv + (length - n) * tok * ret)
        fr.append((length - n) * tok * qkv + (p - 1) * n * tok * ret)
    extra = _additional_bytes(lay)
    # backward: d_out (and d_lse) to heads, dq, dk, dv back: the same volumes, reversed
    return StrategyCost("ulysses", True, "", fs, fr, [b + extra for b in fr],
                        [b + extra for b in fs], [length] * p, hc)


def all_gather_cost(lay: Layout) -> StrategyCost:
    """All-gather of every key and value to every rank (torch's context-parallel default),
    modelled as a direct exchange: each rank receives the L - n rows it lacks and sends its n rows
    to P - 1 ranks; backward reduce-scatters the key/value gradients (the same volumes)."""
    row = _kv_row_bytes(lay)
    length, p = sum(lay.lengths), lay.world_size
    sent = [(p - 1) * n * row for n in lay.lengths]
    received = [(length - n) * row for n in lay.lengths]
    extra = _additional_bytes(lay)
    return StrategyCost("all-gather", True, "", sent, received, [b + extra for b in received],
                        [b + extra for b in sent], list(lay.lengths), lay.heads)


@dataclass
class Plan:
    """The strategy a call uses and why (``nattn.distributed.plan`` returns one)."""

    layout: Layout
    requested: str
    strategy: str
    halo: HaloPlan
    costs: Dict[str, StrategyCost]

    def explain(self) -> str:
        lay = self.layout
        backward = lay.requires_grad
        what = "forward + backward" if backward else "forward"
        lines = [
            f"sharded axis {lay.axis} of length {sum(lay.lengths)} over {lay.world_size} ranks "
            f"(slabs {list(lay.lengths)}); bytes sent + received per rank, {what}, max over ranks:"
        ]
        for name, cost in self.costs.items():
            if not cost.feasible:
                lines.append(f"  {name}: not possible: {cost.reason}")
                continue
            lines.append(f"  {name}: {cost.max_per_rank(backward):,} B "
                         f"(computes {max(cost.computed_rows)} rows x {cost.computed_heads} heads "
                         "on the busiest rank)")
        waste = max(s.wasted_query_rows for s in self.halo.slabs)
        lines.append(f"  halo slabs: {[s.slab for s in self.halo.slabs]} "
                     f"(up to {waste} query rows per rank computed and discarded)")
        over = [s.rank for s in self.halo.slabs if s.overlapped]
        if over:
            lines.append(f"  halo overlap: ranks {over} compute their interior while the halo is "
                         "in flight")
        if self.requested == "auto":
            lines.append(f"auto chose {self.strategy}: fewest bytes per rank among the possible "
                         "strategies (halo on a tie; all-gather is shown for comparison only)")
        else:
            lines.append(f"strategy {self.strategy!r} was requested")
        return "\n".join(lines)


def make_plan(lay: Layout, strategy: str = "auto") -> Plan:
    """Plan a call: the halo plan, the byte counts of every strategy and the chosen strategy.
    ``strategy="ulysses"`` when Ulysses is impossible raises ValueError."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} must be one of {', '.join(STRATEGIES)}")
    a = lay.axis
    halo = halo_plan(lay.lengths, lay.kernel_size[a], lay.stride[a], lay.dilation[a],
                     lay.is_causal[a])
    costs = {"halo": halo_cost(lay, halo), "ulysses": ulysses_cost(lay),
             "all-gather": all_gather_cost(lay)}
    if strategy == "ulysses" and not costs["ulysses"].feasible:
        raise ValueError(f"strategy='ulysses': {costs['ulysses'].reason}")
    chosen = strategy
    if strategy == "auto":
        chosen = "halo"
        uly = costs["ulysses"]
        if uly.feasible and uly.max_per_rank(lay.requires_grad) < \
                costs["halo"].max_per_rank(lay.requires_grad):
            chosen = "ulysses"
    return Plan(lay, strategy, chosen, halo, costs)
