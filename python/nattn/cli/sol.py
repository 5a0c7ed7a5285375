"""``python -m nattn sol``: the speed-of-light table of one problem, 1-D flattened tiling and
multi-dimensional tiling side by side (nattn.perf)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Optional, Tuple

from rich.table import Table

from .. import perf, problems
from . import common
from .output import console


def _tile(text: str) -> Tuple[int, ...]:
    try:
        extents = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a tile shape like 8x16") from None
    if not extents or min(extents) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: tile extents must be >= 1")
    return extents


def add_parser(sub) -> None:
    p = sub.add_parser("sol", help="speed-of-light bounds of one problem",
                       description="FLOP, tile and memory bounds of one problem (nattn.perf), "
                                   "1-D flattened vs multi-dimensional tiling.")
    common.add_problem_args(p)
    p.add_argument("--problem", default=None, metavar="NAME",
                   help="a named problem (python -m nattn bench --list) instead of the problem "
                        "flags; --batch-size and --dtype still apply (default: none)")
    p.add_argument("--tile-shape", type=_tile, nargs=2, metavar=("Q", "KV"), default=None,
                   help="multi-dim Q and KV tile extents, e.g. 8x16 8x16 (default: the "
                        "recommended shape of 128 x 128 tokens)")
    p.add_argument("--backward", action="store_true", help="model the backward pass (default: the forward)")
    p.add_argument("--matmul-tflops", type=float, default=None,
                   help="matmul rate ceiling (TFLOP/s) instead of measuring it (default: "
                        "measured, best of 20 runs)")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="memory bandwidth ceiling (GB/s) instead of measuring it (default: "
                        "measured, best of 20 runs)")
    p.add_argument("--no-measure", action="store_true",
                   help="no ceilings: counts only, no times")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for measuring (default: torch's, usually all cores)")
    p.add_argument("--json", default=None,
                   help="write the report as JSON to this path (default: none)")
    p.set_defaults(run=run)


def ceilings_from_args(args, device, dtype) -> Optional[perf.Ceilings]:
    """Supplied ceilings, measured ones for what is not supplied, or None with --no-measure."""
    if args.no_measure:
        return None
    rate = args.matmul_tflops * 1e12 if args.matmul_tflops else None
    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else None
    if rate is not None and bandwidth is not None:
        source = "supplied"
    else:
        # thorough (best of 20): a ceiling measured low makes every bound too large
        measured = perf.measure_ceilings(device, dtype, quick=False)
        source = "measured" if rate is None and bandwidth is None else "measured + supplied"
        rate = rate or measured.matmul_flops
        bandwidth = bandwidth or measured.bandwidth
    return perf.Ceilings(rate, bandwidth, source, str(device), str(dtype).replace("torch.", ""))


def run(args) -> int:
    common.set_threads(args.threads)
    device = common.best_device()
    if args.problem:
        try:
            problem = problems.get(args.problem)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
        problem = replace(problem, batch=args.batch_size,
                          dtype=common.resolve_dtype(args.dtype, device, problem.dtype))
    else:
        problem = common.problem_from_args(args, device)
    q_tile = kv_tile = None
    if args.tile_shape:
        q_tile, kv_tile = args.tile_shape
        if len(q_tile) != problem.rank or len(kv_tile) != problem.rank:
            raise SystemExit(f"error: --tile-shape needs {problem.rank} extents per tile")
    ceilings = ceilings_from_args(args, device, problem.dtype)
    report = perf.speed_of_light(problem, ceilings, backward=args.backward, q_tile=q_tile,
                                 kv_tile=kv_tile, device_type=device.type)
    print_report(problem, report, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"problem": common.dataclass_problem_dict(problem),
                       "source": problem.source,
                       "dtype": str(problem.dtype).replace("torch.", ""),
                       "sol": report.to_dict()}, f, indent=2)
    return 0


def print_report(problem, report: perf.SpeedOfLight, device) -> None:
    out = console()
    pass_name = "backward" if report.backward else "forward"
    out.print(f"[bold]{problem.describe()}[/] {str(problem.dtype).replace('torch.', '')}, "
              f"{pass_name}")
    summary = Table(title="speed of light", show_header=True)
    summary.add_column("quantity")
    summary.add_column("value", justify="right")
    summary.add_row("needed FLOPs", common.fmt_count(report.needed_flops))
    summary.add_row("dense FLOPs", common.fmt_count(report.dense_flops))
    summary.add_row("density", f"{report.density:.4%}")
    summary.add_row("compulsory bytes", common.fmt_bytes(report.bytes))
    if report.ceilings:
        c = report.ceilings
        summary.add_row("matmul ceiling", f"{c['matmul_flops'] / 1e12:.3f} TFLOP/s ({c['source']}"
                                          f", {c['device']} {c['dtype']})")
        summary.add_row("bandwidth ceiling", f"{c['bandwidth'] / 1e9:.1f} GB/s")
        summary.add_row("FLOP bound (any implementation)", common.fmt_time(report.flop_bound))
        summary.add_row("memory bound (any implementation)",
                        common.fmt_time(report.memory_bound))
        if report.kernel_bound is not None:
            summary.add_row("kernel bound (nattn's CPU forward)",
                            common.fmt_time(report.kernel_bound))
        summary.add_row("tightest bound", f"{report.tightest}: "
                                          f"{common.fmt_time(report.tightest_bound)}")
    elif report.kernel_flops is not None:
        summary.add_row("FLOPs of nattn's CPU forward", common.fmt_count(report.kernel_flops))
    out.print(summary)
    if report.ceilings:
        out.print("Every bound above is a lower bound on time on this device, given the matmul "
                  "and bandwidth ceilings: the FLOP bound (needed FLOPs / matmul ceiling) and "
                  "the memory bound (compulsory bytes / bandwidth) for any implementation"
                  + ("; the kernel bound for nattn's CPU forward: the FLOPs its product "
                     "kernels execute, counted exactly from its tiling "
                     f"({_C_tile(problem)}; perf.cpu_forward_flops), / matmul ceiling"
                     if report.kernel_bound is not None else "") + ".")
    tiles = Table(title="tiling", show_header=True)
    tiles.add_column("")
    order = ("1-D flat", "multi-dim")
    for name in order:
        tiles.add_column(name, justify="right")
    t = report.tiles

    def row(label, fn):
        tiles.add_row(label, *(fn(t[name]) for name in order))

    row("Q tile", lambda d: "x".join(map(str, d["q_tile"])))
    row("KV tile", lambda d: "x".join(map(str, d["kv_tile"])))
    row("Q tiles (per head)", lambda d: str(d["q_tiles"]))
    row("visited tile pairs", lambda d: str(d["visited"]))
    row("full tile pairs", lambda d: str(d["full"]))
    row("masked tile pairs", lambda d: str(d["masked"]))
    row("masked fraction", lambda d: f"{d['masked_fraction']:.1%}")
    row("computed FLOPs", lambda d: common.fmt_count(d["tile_flops"]))
    row("needed / computed", lambda d: f"{d['efficiency']:.1%}")
    if report.ceilings:
        row("tile-model time", lambda d: common.fmt_time(d["bound"]))
    out.print(tiles)
    out.print("The tiling table is a what-if: a kernel that computes whole tiles of these shapes "
              "needs the computed FLOPs and, at the matmul ceiling, the tile-model time. It is "
              "not a bound on nattn's kernels (they tile differently) and is not in the "
              "tightest bound.")
    out.print(f"note: {report.note}")


def _C_tile(problem) -> str:
    from .._native import _C

    if perf.cpu_forward_kernels(problem) == "lane":
        return f"{_C.cpu_q_tile}-query tiles, one vector lane per query, over their window offsets"
    return f"{_C.cpu_q_tile}-query tiles x {_C.cpu_kv_tile}-key chunks"
