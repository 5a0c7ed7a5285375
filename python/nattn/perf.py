"""Speed-of-light model of neighborhood attention: FLOPs, bytes and tile counts of a problem, and
the time bounds they give on a device with a known matmul rate and memory bandwidth.

Conventions (DESIGN.md section 5):

* Needed FLOPs, forward: ``2 * B * H * W * (D + D_v)``, where ``W`` is the number of attended
  (query, key) pairs: ``sum over queries of |window|`` plus ``N * M`` for M additional tokens.
  The ``QK^T`` half costs ``2 W D`` and the ``PV`` half ``2 W D_v``; with ``D == D_v`` this is
  the usual ``4 * B * H * W * D``.
* Needed FLOPs, backward: the five matmuls of a fused backward (recompute ``S = QK^T``,
  ``dP = dO V^T``, ``dV = P^T dO``, ``dQ = dS K``, ``dK = dS^T Q``):
  ``2 * B * H * W * (3 D + 2 D_v)``, i.e. 2.5x the forward when ``D == D_v`` (the
  FlashAttention-2 convention). Softmax/exp work is not counted.
* Dense FLOPs: the same with every query attending to all N (+ M) keys. ``density = W / (N (N + M))``.
* Compulsory bytes: forward reads q, k, v (and the additional k, v) once and writes out and lse
  (fp32) once; backward reads q, k, v, out, d_out, lse and writes dq, dk, dv (plus the
  additional tokens' gradients). Intermediates (the backward's ``delta = rowsum(dO * O)``) are
  not counted.
* Bounds, in seconds, given a matmul rate R (FLOP/s) and a bandwidth BW (byte/s):
  FLOP bound = dense time x density = needed FLOPs / R; tile bound = visited tile pairs x FLOPs
  of one tile pair / R (a tiled kernel computes whole tiles), capped by the dense time
  (dense FLOPs / R: no implementation has to do more than dense work); memory bound =
  bytes / BW. A run is judged against the tightest (largest) of them.

Tile counts come from the tile planner (``include/nattn/tile_plan.h`` through ``nattn._C``):
multi-dimensional tiling works in dilation-group space with box-shaped tiles; 1-D flattened
tiling cuts the row-major token sequence into runs of consecutive tokens, the way a generic
block-sparse kernel (FlexAttention's block mask) sees a multi-dimensional layout. Window sizes
come from ``_C.axis_windows`` (window.h); nothing here restates the window formula.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._native import IMPORT_ERROR, _C, _dtype_tag
from .backends import Problem

__all__ = [
    "Ceilings",
    "TileCounts",
    "SpeedOfLight",
    "window_pairs",
    "needed_flops",
    "dense_flops",
    "density",
    "compulsory_bytes",
    "multi_dim_tiles",
    "flat_tiles",
    "tile_pair_flops",
    "candidate_tile_shapes",
    "recommend_tile_shape",
    "kernel_tile_shape",
    "cpu_forward_flops",
    "stride_note",
    "measure_ceilings",
    "speed_of_light",
]

# Tile sizes (tokens) of the kernels the model describes: 128 x 128 is the Q x KV tile of the
# Hopper FMHA mainloops for head_dim 64..128 (one 128-row warpgroup pair per Q tile, 128 keys per
# pipeline stage), and the flattened comparison uses the same token counts so that the two
# tilings compute equally large tiles.
DEFAULT_Q_TILE_TOKENS = 128
DEFAULT_KV_TILE_TOKENS = 128


def _axes(problem) -> List[Tuple[int, int, int, int, bool]]:
    return [
        (int(problem.spatial_shape[a]), int(problem.kernel_size[a]), int(problem.stride[a]),
         int(problem.dilation[a]), bool(problem.is_causal[a]))
        for a in range(len(problem.spatial_shape))
    ]


def _require_native() -> None:
    if _C is None:
        raise RuntimeError(f"nattn.perf needs the native module: {IMPORT_ERROR}")


def _tokens(problem) -> int:
    return math.prod(problem.spatial_shape)


def window_pairs(problem) -> int:
    """Attended (query, key) pairs of one head: ``sum over queries of |window|`` plus ``N * M``.

    The neighborhood is the product of per-axis windows, so the sum over all queries of the
    product of per-axis window sizes is the product over axes of per-axis sums; the per-axis
    sizes come from ``_C.axis_windows`` (window.h).
    """
    _require_native()
    total = 1
    for axis in _axes(problem):
        total *= sum(w[1] for w in _C.axis_windows(*axis))
    return total + _tokens(problem) * int(getattr(problem, "num_additional", 0))


def _flop_factor(problem, backward: bool) -> int:
    d, dv = problem.head_dim, problem.value_dim
    return 2 * (3 * d + 2 * dv) if backward else 2 * (d + dv)


def needed_flops(problem, backward: bool = False) -> int:
    """FLOPs actually needed (module docstring): forward ``2 B H W (D + D_v)``, backward
    ``2 B H W (3 D + 2 D_v)``."""
    return problem.batch * problem.heads * window_pairs(problem) * _flop_factor(problem, backward)


def dense_flops(problem, backward: bool = False) -> int:
    """FLOPs of the same attention without a mask (every query sees all N + M keys)."""
    n = _tokens(problem)
    keys = n + int(getattr(problem, "num_additional", 0))
    return problem.batch * problem.heads * n * keys * _flop_factor(problem, backward)


def density(problem) -> float:
    """Fraction of the dense score matrix that is attended: ``W / (N (N + M))``."""
    n = _tokens(problem)
    return window_pairs(problem) / (n * (n + int(getattr(problem, "num_additional", 0))))


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def compulsory_bytes(problem, backward: bool = False) -> int:
    """Bytes a kernel must move at least once (module docstring); lse is fp32."""
    e = _element_size(problem.dtype)
    b, n, m = problem.batch, _tokens(problem), int(getattr(problem, "num_additional", 0))
    h, hkv, d, dv = problem.heads, problem.kv_heads, problem.head_dim, problem.value_dim
    q = b * n * h * d * e
    kv = b * (n + m) * hkv * (d + dv) * e
    out = b * n * h * dv * e
    lse = b * n * h * 4
    if not backward:
        return q + kv + out + lse
    # reads q, k, v, out, d_out, lse; writes dq, dk, dv
    return 2 * q + 2 * kv + 2 * out + lse


@dataclass(frozen=True)
class TileCounts:
    """Tile pairs of one head of one batch element at a tile shape (tokens per tile axis)."""

    tiling: str  # "multi-dim" or "1-D flat"
    q_tile: Tuple[int, ...]
    kv_tile: Tuple[int, ...]
    q_tiles: int
    visited: int
    full: int

    @property
    def masked(self) -> int:
        return self.visited - self.full

    @property
    def masked_fraction(self) -> float:
        return self.masked / self.visited if self.visited else 0.0

    @property
    def q_tokens(self) -> int:
        return math.prod(self.q_tile)

    @property
    def kv_tokens(self) -> int:
        return math.prod(self.kv_tile)


def _additional_tiles(problem, q_tiles: int, kv_tokens: int) -> Tuple[int, int]:
    """(visited, full) pairs that the additional tokens add: every Q tile visits all of their
    KV tiles; only a last, cut tile needs a mask."""
    m = int(getattr(problem, "num_additional", 0))
    if m == 0:
        return 0, 0
    return q_tiles * math.ceil(m / kv_tokens), q_tiles * (m // kv_tokens)


def multi_dim_tiles(problem, q_tile: Sequence[int], kv_tile: Sequence[int]) -> TileCounts:
    """Tile counts of multi-dimensional tiling (box tiles in dilation-group space), from
    ``_C.tile_plan_summary``. ``q_tile``/``kv_tile``: extents per spatial axis."""
    _require_native()
    q_tiles, visited, full, _ = _C.tile_plan_summary(_axes(problem), list(q_tile), list(kv_tile))
    extra_visited, extra_full = _additional_tiles(problem, q_tiles, math.prod(kv_tile))
    return TileCounts("multi-dim", tuple(q_tile), tuple(kv_tile), q_tiles,
                      visited + extra_visited, full + extra_full)


def flat_tiles(problem, q_tokens: int, kv_tokens: int) -> TileCounts:
    """Tile counts of 1-D flattened tiling (runs of consecutive row-major tokens), from
    ``_C.flat_tile_counts``."""
    _require_native()
    q_tiles, visited, full = _C.flat_tile_counts(_axes(problem), int(q_tokens), int(kv_tokens))
    extra_visited, extra_full = _additional_tiles(problem, q_tiles, kv_tokens)
    return TileCounts("1-D flat", (int(q_tokens),), (int(kv_tokens),), q_tiles,
                      visited + extra_visited, full + extra_full)


def tile_pair_flops(problem, q_tokens: int, kv_tokens: int, backward: bool = False) -> int:
    """FLOPs one (Q tile, KV tile) pair costs a tiled kernel, for one head of one batch element."""
    return q_tokens * kv_tokens * _flop_factor(problem, backward)


def _tile_bound_flops(problem, counts: TileCounts, backward: bool) -> int:
    return (problem.batch * problem.heads * counts.visited
            * tile_pair_flops(problem, counts.q_tokens, counts.kv_tokens, backward))


def _pow2_factorizations(total: int, rank: int) -> List[Tuple[int, ...]]:
    exp = int(math.log2(total))
    if 2**exp != total:
        raise ValueError(f"tile size {total} must be a power of two")
    shapes = []
    for parts in itertools.product(range(exp + 1), repeat=rank):
        if sum(parts) == exp:
            shapes.append(tuple(2**p for p in parts))
    return shapes


def candidate_tile_shapes(rank: int, q_tokens: int = DEFAULT_Q_TILE_TOKENS,
                          kv_tokens: int = DEFAULT_KV_TILE_TOKENS):
    """Every (q_tile, kv_tile) pair of power-of-two per-axis extents whose products are
    ``q_tokens`` and ``kv_tokens`` (36 x 36 shapes for rank 3 at 128 x 128)."""
    return list(itertools.product(_pow2_factorizations(q_tokens, rank),
                                  _pow2_factorizations(kv_tokens, rank)))


def recommend_tile_shape(problem, q_tokens: int = DEFAULT_Q_TILE_TOKENS,
                         kv_tokens: int = DEFAULT_KV_TILE_TOKENS) -> TileCounts:
    """The multi-dim tile shape (among ``candidate_tile_shapes``) with the fewest visited tile
    pairs (the lowest tile bound), ties broken by fewer masked pairs."""
    best = None
    for q_tile, kv_tile in candidate_tile_shapes(len(problem.spatial_shape), q_tokens, kv_tokens):
        counts = multi_dim_tiles(problem, q_tile, kv_tile)
        key = (counts.visited, counts.masked)
        if best is None or key < best[0]:
            best = (key, counts)
    return best[1]


def kernel_tile_shape(problem, device_type: str) -> TileCounts:
    """Multi-dim tile counts at a tile shape of nattn's kernels on a device type: on CPU the CPU
    kernels' tile (``_C.cpu_q_tile`` queries x ``_C.cpu_kv_tile`` keys along the last axis, from
    csrc/cpu/block_kernels.h), for display only: those kernels start their key chunks at each
    tile's first key, not at multiples of the chunk, so their work is ``cpu_forward_flops``, not
    these counts. Elsewhere ``recommend_tile_shape`` (128 x 128 tokens)."""
    if device_type == "cpu":
        _require_native()
        lead = (1,) * (len(problem.spatial_shape) - 1)
        return multi_dim_tiles(problem, lead + (_C.cpu_q_tile,), lead + (_C.cpu_kv_tile,))
    return recommend_tile_shape(problem)


def cpu_forward_flops(problem, kernels: Optional[str] = None) -> int:
    """FLOPs the fused CPU forward (csrc/cpu/cpu_tiles.h, ``forward_tile``) executes in its
    product kernels, exactly, for the whole problem (all batches and heads).

    ``kernels``: ``"block"``, ``"lane"``, or None for the ones this build runs for the problem:
    the lane kernels where they exist (``_C.cpu_lane_forward()``: the AVX2 and AVX-512 levels,
    fp16, bf16 and fp32) and the block kernels would execute more than
    ``_C.cpu_lane_cost_ratio`` times their FLOPs (small last-axis windows; the block kernels run
    faster per FLOP), else the block kernels. The counts and the choice are the native
    module's own (``_C.cpu_forward_macs``, ``_C.cpu_forward_uses_lanes``: cpu_tiles.h), so they
    are those of the kernels that run. Raises ValueError for any other value.

    Both walk query tiles of ``R = _C.cpu_q_tile`` consecutive positions of one dilation group
    along the last axis, at every index of the other axes, and for each key index ``(y0, y1)`` of
    the other axes' windows (a key line) visit the tile's keys on the last axis.

    - Block kernels: the keys are the union ``[u_lo, u_hi)`` of the tile's rows' windows (in
      group positions), cut into chunks of ``C = _C.cpu_kv_tile`` keys starting at ``u_lo``.
      Per chunk of ``n`` keys, ``block_dot`` computes the whole ``R x C`` score block (``R C D``
      multiply-adds, whatever ``n`` and however many of the R rows are real) and
      ``block_accumulate`` ``R n D_v``. Additional tokens add, per tile, chunks of ``C`` of the
      ``M`` tokens the same way.
    - Lane kernels (one vector lane per query, block_kernels.h ``LaneTile``): lane ``r`` reads
      its window at offsets ``u`` relative to its own position ``j0 + r``; the tile visits every
      offset of the union of its real lanes' offset ranges, ``T`` of them, each one ``R``-lane
      multiply-add per depth for the scores and per value column for ``P V``: ``R T (D + D_v)``
      per key line, plus ``R M (D + D_v)`` for the additional tokens. Neighbouring indices of
      axis 1 (the second-to-last spatial axis) whose windows share most key lines run as one
      two-row tile (cpu_tiles.h ``axis1_rows``: 10 x union <= 7 x the two windows' sum); each
      of its rows visits the union of the two rows' lines on that axis.

    Softmax and exp work is not counted, so this over the matmul rate is a lower bound on the
    kernel's time (on a device whose product kernels run no faster than its dense matmul).
    Window sizes and positions come from window.h.
    """
    _require_native()
    if kernels not in (None, "block", "lane"):
        raise ValueError(f"kernels={kernels!r}: must be 'block', 'lane' or None")
    params = _cpu_params(problem)
    lane, block = _C.cpu_forward_macs(params)
    if kernels is None:
        kernels = "lane" if _C.cpu_forward_uses_lanes(params) else "block"
    return 2 * problem.batch * problem.heads * (lane if kernels == "lane" else block)


def cpu_forward_kernels(problem) -> str:
    """``"lane"`` or ``"block"``: the product kernels nattn's CPU forward runs for ``problem``
    in this build (cpu_tiles.h: use_lane_forward; see cpu_forward_flops)."""
    _require_native()
    return "lane" if _C.cpu_forward_uses_lanes(_cpu_params(problem)) else "block"


def _cpu_params(problem):
    """The native AttentionParams of ``problem``'s shape (no tensors): what the CPU kernels'
    tiling depends on."""
    params = _C.AttentionParams()
    params.dtype = _dtype_tag(problem.dtype, _C)
    params.head_dim, params.value_dim = problem.head_dim, problem.value_dim
    params.num_additional = int(getattr(problem, "num_additional", 0))
    params.set_axes(_axes(problem))
    return params


def stride_note(problem, counts: TileCounts) -> str:
    """Whether the problem is perfectly block-sparse at this multi-dim tile shape (GNA,
    arXiv 2504.16922: every visited tile pair is full, so no tile needs a mask), and if not,
    which stride would bring it closest while keeping the window: per axis, the stride among the
    multiples of the Q tile extent (at most kernel_size) with the largest full fraction. Full and
    visited counts are products over axes, so the axes are chosen independently."""
    if counts.tiling != "multi-dim":
        raise ValueError("stride_note needs multi-dimensional tile counts")
    if counts.masked == 0:
        return "perfectly block-sparse: every visited tile pair is full (no masking)"
    strides = []
    for a, (length, k, s, d, causal) in enumerate(_axes(problem)):
        tq, tk = counts.q_tile[a], counts.kv_tile[a]

        def full_fraction(stride):
            _, visited, full = _C.tile_axis_counts(length, k, stride, d, causal, tq, tk)
            return full / visited

        best = max([s] + list(range(tq, k + 1, tq)),
                   key=lambda c: (full_fraction(c), -abs(c - s)))
        strides.append(best)
    base = f"{counts.masked_fraction:.0%} of visited tile pairs need a mask"
    trial = multi_dim_tiles(_replace(problem, stride=tuple(strides)), counts.q_tile, counts.kv_tile)
    if tuple(strides) == tuple(problem.stride) or trial.masked_fraction >= counts.masked_fraction:
        return base + "; no stride <= kernel_size that is a multiple of the Q tile reduces that"
    return (f"{base}; stride {tuple(strides)} (a multiple of the Q tile {counts.q_tile} per axis) "
            f"would leave {trial.masked_fraction:.0%} masked")


def _replace(problem, **changes) -> Problem:
    """``problem`` (a backends.Problem or a problems.NamedProblem, which has no device) as a
    backends.Problem with some fields changed."""
    fields = {f: getattr(problem, f, None) for f in Problem.__dataclass_fields__}
    fields["num_additional"] = int(getattr(problem, "num_additional", 0))
    fields["device"] = getattr(problem, "device", None) or torch.device("cpu")
    fields["requires_grad"] = bool(getattr(problem, "requires_grad", False))
    fields.update(changes)
    return Problem(**fields)


@dataclass(frozen=True)
class Ceilings:
    """Device ceilings: dense matmul rate (FLOP/s) in the problem's dtype and copy bandwidth
    (byte/s, read + write), with where they came from."""

    matmul_flops: float
    bandwidth: float
    source: str
    device: str = ""
    dtype: str = ""


@contextlib.contextmanager
def gc_paused():
    """Python's garbage collector off inside the block (and back on after it if it was on), as
    ``timeit`` does for its timed calls: a collection that starts during a timed call charges
    that call for every object the process holds. In the CPU bench (torch.compile'd
    FlexAttention and NATTEN in the same process), nattn's 64 x 64 forward took 9.7-23.2 ms
    over 12 interleaved rounds with the collector on and 8.1-14.8 ms with it off, while a
    FlexAttention call takes 60 ms. Garbage made during the block is collected after it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def time_calls(fn, device: torch.device, warmup: int, repeats: int,
               flush_bytes: int = 0) -> List[float]:
    """Seconds per call of ``fn`` (CUDA events on GPU, perf_counter on CPU) over ``repeats``
    calls after ``warmup`` untimed ones, each with Python's garbage collector paused
    (``gc_paused``). On GPU with ``flush_bytes``, a buffer of that size is overwritten before
    every timed call, outside the timed events, so each call starts with a cold L2."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    flush = torch.empty(flush_bytes, dtype=torch.uint8, device=device) \
        if cuda and flush_bytes else None
    times = []
    for _ in range(repeats):
        if cuda:
            if flush is not None:
                flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            with gc_paused():
                start.record()
                fn()
                end.record()
                end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            with gc_paused():
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
    return times


def _best_seconds(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls: a ceiling is what the device can do, and on a shared
    machine the slower runs measure the neighbours, not the device."""
    return min(time_calls(fn, device, warmup, repeats))


def measure_ceilings(device, dtype: torch.dtype = torch.float32, quick: bool = True) -> Ceilings:
    """Measure the dense matmul rate (``torch.matmul`` of square matrices in ``dtype``) and the
    copy bandwidth (``Tensor.copy_`` of a large buffer, counting read + write) on ``device``.

    Sizes: CUDA 8192^2 matmuls (1.1 TFLOP each) and 1 GiB copies; CPU 1024^2 (2.1 GFLOP) and
    64 MiB copies (past the last-level cache of a server socket's share). The rate is that of
    the fastest of 5 runs (``quick``) or 20.
    """
    device = torch.device(device)
    repeats = 5 if quick else 20
    if device.type == "cuda":
        n, copy_bytes = 8192, 1 << 30
    else:
        n, copy_bytes = 1024, 64 << 20
        if dtype in (torch.float16, torch.bfloat16):
            n = 512  # CPU half-precision matmuls are slow; keep the measurement short
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    mm = _best_seconds(lambda: torch.matmul(a, b, out=out), device, 2, repeats)
    src = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    cp = _best_seconds(lambda: dst.copy_(src), device, 2, repeats)
    return Ceilings(2 * n**3 / mm, 2 * copy_bytes / cp, "measured", str(device),
                    str(dtype).replace("torch.", ""))


@dataclass
class SpeedOfLight:
    """The speed-of-light report of one problem (seconds unless named otherwise)."""

    backward: bool
    needed_flops: int
    dense_flops: int
    density: float
    bytes: int
    ceilings: Optional[Dict]
    flop_bound: Optional[float]
    dense_bound: Optional[float]
    memory_bound: Optional[float]
    tiles: Dict[str, Dict] = field(default_factory=dict)  # "multi-dim" / "1-D flat" -> details
    # FLOPs nattn's kernel on the device executes in its product kernels, and that over the
    # matmul rate (CPU forward only: ``cpu_forward_flops``; None where not modeled exactly).
    kernel_flops: Optional[int] = None
    kernel_bound: Optional[float] = None
    # tightest: the largest bound on nattn's kernel (flop, memory, and kernel where modeled);
    # tightest_any: the largest bound on any implementation (flop, memory).
    tightest: Optional[str] = None
    tightest_bound: Optional[float] = None
    tightest_any: Optional[str] = None
    tightest_any_bound: Optional[float] = None
    note: str = ""

    def to_dict(self) -> Dict:
        return asdict(self)


def speed_of_light(problem, ceilings: Optional[Ceilings] = None, backward: bool = False,
                   q_tile: Optional[Sequence[int]] = None,
                   kv_tile: Optional[Sequence[int]] = None,
                   device_type: Optional[str] = None) -> SpeedOfLight:
    """All bounds of ``problem`` (see the module docstring).

    Only lower bounds on time enter ``tightest``: the FLOP and memory bounds (any
    implementation), and on CPU for the forward the kernel bound, ``cpu_forward_flops`` over the
    matmul rate (the work nattn's CPU forward executes, exactly). The tile-model times of
    ``tiles`` (what a kernel computing whole tiles of that shape would need) are what-ifs: no
    kernel of nattn is known to tile exactly so, and a kernel with smaller or differently aligned
    tiles can beat them, so they are reported but are not bounds.

    Args:
        problem: anything with the fields of ``nattn.backends.Problem`` (``device`` and
            ``requires_grad`` are not read).
        ceilings: device ceilings; without them only FLOPs, bytes and tile counts are filled.
        backward: model the backward pass instead of the forward.
        q_tile, kv_tile: multi-dim tile extents per axis; default ``recommend_tile_shape``.
            The 1-D flattened tiling uses the same token counts per tile.
        device_type: "cpu" adds the CPU forward kernel's bound (forward only).
    """
    if (q_tile is None) != (kv_tile is None):
        raise ValueError("give both q_tile and kv_tile, or neither")
    if q_tile is None:
        multi = recommend_tile_shape(problem)
    else:
        if len(q_tile) != len(problem.spatial_shape) or len(kv_tile) != len(q_tile):
            raise ValueError(
                f"q_tile={tuple(q_tile)!r} and kv_tile={tuple(kv_tile)!r} need one extent per "
                f"spatial axis ({len(problem.spatial_shape)})")
        multi = multi_dim_tiles(problem, q_tile, kv_tile)
    flat = flat_tiles(problem, multi.q_tokens, multi.kv_tokens)
    report = SpeedOfLight(
        backward=backward,
        needed_flops=needed_flops(problem, backward),
        dense_flops=dense_flops(problem, backward),
        density=density(problem),
        bytes=compulsory_bytes(problem, backward),
        ceilings=None if ceilings is None else asdict(ceilings),
        flop_bound=None,
        dense_bound=None,
        memory_bound=None,
        note=stride_note(problem, multi),
    )
    for counts in (multi, flat):
        tile_flops = _tile_bound_flops(problem, counts, backward)
        report.tiles[counts.tiling] = {
            "q_tile": list(counts.q_tile),
            "kv_tile": list(counts.kv_tile),
            "q_tiles": counts.q_tiles,
            "visited": counts.visited,
            "full": counts.full,
            "masked": counts.masked,
            "masked_fraction": counts.masked_fraction,
            "tile_flops": tile_flops,
            "efficiency": report.needed_flops / tile_flops,  # needed / computed
            "bound": None if ceilings is None else tile_flops / ceilings.matmul_flops,
        }
    if device_type == "cpu" and not backward:
        report.kernel_flops = cpu_forward_flops(problem)
    if ceilings is not None:
        report.flop_bound = report.needed_flops / ceilings.matmul_flops
        report.dense_bound = report.dense_flops / ceilings.matmul_flops
        report.memory_bound = report.bytes / ceilings.bandwidth
        anywhere = {"flop": report.flop_bound, "memory": report.memory_bound}
        report.tightest_any = max(anywhere, key=anywhere.get)
        report.tightest_any_bound = anywhere[report.tightest_any]
        candidates = dict(anywhere)
        if report.kernel_flops is not None:
            report.kernel_bound = report.kernel_flops / ceilings.matmul_flops
            candidates["kernel"] = report.kernel_bound
        report.tightest = max(candidates, key=candidates.get)
        report.tightest_bound = candidates[report.tightest]
    return report
