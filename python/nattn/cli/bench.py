"""``python -m nattn bench``: named problems (nattn.problems), every nattn backend side by side
with PyTorch SDPA (dense boolean mask) and FlexAttention (same mask as a block mask), judged
against the speed-of-light bounds of nattn.perf."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from dataclasses import asdict, replace
from typing import Dict, List, Optional

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .. import perf, problems
from . import common, peers
from .output import console

ALTERNATIVES = ("reference", "sdpa", "flex", "natten")
REGRESSION_THRESHOLD = 1.10  # --compare flags rows more than 10% slower than the baseline


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark named problems against SDPA and FlexAttention",
                       description="Run named problems with every nattn backend, PyTorch SDPA "
                                   "with the dense mask and FlexAttention with the same mask; "
                                   "report rates, fractions of the speed-of-light bound and "
                                   "speedups. On CPU, model problems are scaled down (printed).")
    p.add_argument("--suite", choices=sorted(problems.SUITES), default="all",
                   help="which named problems to run (default: all; --list shows them)")
    p.add_argument("--problems", nargs="+", default=None, metavar="NAME",
                   help="run these problems instead of a suite (default: the suite)")
    p.add_argument("--scale", type=float, default=None,
                   help="layout scale factor for every problem (default: 1 on GPU; on CPU a "
                        "per-problem factor that keeps each run to seconds)")
    p.add_argument("--backward", action="store_true", help="also time forward + backward (a second table; default: forward only)")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default=None,
                   help="element type (default: the problem's dtype on GPU, float32 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default: 2 on CPU, 10 on GPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls, the median is reported (default: 7 on CPU, 50 on GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's, usually all cores)")
    p.add_argument("--skip", nargs="+", choices=ALTERNATIVES, default=[],
                   help="leave out these implementations (default: none)")
    p.add_argument("--json", default=None, help="write all results to this JSON file (default: none)")
    p.add_argument("--markdown", default=None, help="write a markdown summary table here (default: none)")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="write PNG plots here; adds a window-size sweep for 2-D and 3-D "
                        "(default: no plots)")
    p.add_argument("--compare", default=None, metavar="BASELINE_JSON",
                   help="flag rows more than 10%% slower than this earlier --json output "
                        "(exit status 1 when any; default: no comparison)")
    p.add_argument("--device-ceilings", action="store_true",
                   help="measure the matmul rate and bandwidth ceilings thoroughly (20 runs "
                        "instead of 5) and print them")
    p.add_argument("--all-backends", action="store_true",
                   help="also run (and show as skipped) the nattn backends that cannot run on "
                        "this device, e.g. the CUDA ones on a CPU")
    p.add_argument("--wide", action="store_true",
                   help="one table with forward and forward + backward side by side and the "
                        "notes inline, as wide as it needs (default: tables that fit 100 "
                        "columns, notes as numbered footnotes)")
    p.add_argument("--list", action="store_true", help="list the named problems and exit")
    p.set_defaults(run=run)


def _list(device) -> int:
    table = Table(title="named problems", show_header=True)
    for col in ("name", "layout / window", "source", "CPU scale"):
        table.add_column(col)
    for suite in ("models", "cpu"):
        for p in problems.suite(suite):
            table.add_row(p.name, p.describe(), p.source, f"{problems.default_cpu_scale(p):g}")
    console().print(table)
    return 0


def _selected(args) -> List[problems.NamedProblem]:
    if args.problems:
        try:
            return [problems.get(n) for n in args.problems]
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
    return problems.suite(args.suite)


# The nattn backend whose kernels' work perf models exactly on a device type (its rows are held
# to the kernel bound as well as to the FLOP and memory bounds).
MODELED_BACKEND = {"cpu": "cpu"}


def _bounds(problem, ceilings: perf.Ceilings, backward: bool, device_type: str) -> Dict:
    """Lower bounds on time: ``bound_*`` for the rows of the backend whose kernels are modeled
    on this device (``MODELED_BACKEND``; on CPU the forward's kernel bound), ``bound_any_*`` for
    every other row (FLOP and memory bounds only)."""
    fwd = perf.speed_of_light(problem, ceilings, device_type=device_type)
    out = {"fwd": fwd.to_dict(), "bound_fwd_s": fwd.tightest_bound, "tightest_fwd": fwd.tightest,
           "bound_any_fwd_s": fwd.tightest_any_bound, "tightest_any_fwd": fwd.tightest_any}
    if backward:
        bwd = perf.speed_of_light(problem, ceilings, backward=True, device_type=device_type)
        out["bwd"] = bwd.to_dict()
        out["bound_fwd_bwd_s"] = fwd.tightest_bound + bwd.tightest_bound
        out["bound_any_fwd_bwd_s"] = fwd.tightest_any_bound + bwd.tightest_any_bound
    return out


def _derive(rows: List[Dict], auto_name: str, flops: Dict[str, int], bounds: Dict,
            matmul_rate: float, device_type: str = "cpu") -> None:
    """Add rate, its fraction of the measured matmul rate, fraction of bound (the bound that
    applies to the row, ``_bounds``) and nattn speedup (this row's time / nattn auto's time)."""
    auto = next((r for r in rows if r["impl"] == f"nattn:{auto_name}"), None)
    modeled = MODELED_BACKEND.get(device_type)
    for r in rows:
        r["auto"] = r["impl"] == f"nattn:{auto_name}"
        for key in ("fwd", "fwd_bwd"):
            t = r.get(f"{key}_s")
            if t is None:
                continue
            r[f"{key}_flops"] = flops[key]
            r[f"{key}_rate"] = flops[key] / t
            r[f"{key}_frac_matmul"] = r[f"{key}_rate"] / matmul_rate
            which = "bound" if modeled and r["impl"] == f"nattn:{modeled}" else "bound_any"
            bound = bounds.get(f"{which}_{key}_s")
            if bound:
                r[f"{key}_bound_s"] = bound
                r[f"{key}_frac_bound"] = bound / t
            if auto and auto.get(f"{key}_s"):
                r[f"{key}_nattn_speedup"] = t / auto[f"{key}_s"]


class _Ceilings:
    """Device ceilings per dtype, measured again before every problem (quick: under a second on
    CPU) keeping the best values: a ceiling is the best the device was seen to do, and load from
    neighbours on a shared machine only ever lowers a measurement."""

    def __init__(self, device, thorough: bool):
        self.device, self.thorough = device, thorough
        self.best: Dict[str, perf.Ceilings] = {}
        self.runs: Dict[str, int] = {}

    def update(self, dtype) -> str:
        key = str(dtype).replace("torch.", "")
        m = perf.measure_ceilings(self.device, dtype, quick=not self.thorough)
        self.runs[key] = self.runs.get(key, 0) + 1
        old = self.best.get(key, m)
        self.best[key] = replace(m, matmul_flops=max(old.matmul_flops, m.matmul_flops),
                                 bandwidth=max(old.bandwidth, m.bandwidth),
                                 source=f"measured, best of {self.runs[key]} measurements")
        return key


def _run_problem(problem, label: str, factor: float, args, device, ceilings: _Ceilings,
                 warmup: int, repeats: int, progress, task) -> Dict:
    """Time every implementation of one problem; the bound columns are filled in at the end of
    the run (``_finish``), with the best ceilings seen."""
    dtype = common.resolve_dtype(args.dtype, device, problem.dtype)
    problem = replace(problem, dtype=dtype)
    progress.update(task, description=f"{label}: ceilings")
    key = ceilings.update(dtype)
    flops = {"fwd": perf.needed_flops(problem)}
    if args.backward:
        flops["fwd_bwd"] = flops["fwd"] + perf.needed_flops(problem, backward=True)
    inputs = common.make_inputs(problem, device, dtype)
    auto = common.auto_backend(problem, device, dtype)
    names = [n for n in (_backend_names() if args.all_backends else _device_backends(device)[0])
             if not (n == "reference" and "reference" in args.skip)]
    impls = common.nattn_impls(problem, inputs, device, dtype, names)
    progress.update(task, description=f"{label}: baselines")
    if "sdpa" not in args.skip:
        impls.append(common.sdpa_impl(problem, inputs, device, dtype))
    if "flex" not in args.skip:
        progress.update(task, description=f"{label}: flex (compiling {len(peers.FLEX_FORMS)} "
                                          "mask forms)")
        impls += peers.flex_impls(problem, inputs, device, dtype)
    if "natten" not in args.skip:
        progress.update(task, description=f"{label}: natten")
        impls.append(peers.natten_impl(problem, inputs, device, dtype))
    progress.update(task, description=f"{label}: timing {len(impls)} implementations, "
                                      "interleaved")
    rows = peers.best_forms(peers.measure_interleaved(impls, device, warmup, repeats,
                                                      args.backward))
    progress.advance(task)
    if not progress.console.is_terminal:
        # no live bar in logs and pipes: one line per finished problem instead
        done = progress.tasks[0].completed
        progress.console.print(f"[{int(done)}/{int(progress.tasks[0].total)}] {label} done")
    return {"name": problem.name, "scale": factor, "problem": common.dataclass_problem_dict(problem),
            "dtype": key, "auto_backend": auto, "flops": flops, "rows": rows,
            "_problem": problem}


def _finish(res: Dict, ceilings: Dict[str, perf.Ceilings], backward: bool,
            device_type: str) -> None:
    """Bounds with the run's final ceilings, then rates, fractions of bound and speedups."""
    problem = res.pop("_problem")
    res["bounds"] = _bounds(problem, ceilings[res["dtype"]], backward, device_type)
    _derive(res["rows"], res["auto_backend"], res["flops"], res["bounds"],
            ceilings[res["dtype"]].matmul_flops, device_type)


def _backend_names() -> List[str]:
    from nattn import backends

    return backends.names(benchmarked_only=True)


def _pct(x: Optional[float]) -> str:
    """A fraction as a percentage, one decimal (one format for every row of a column)."""
    return "-" if x is None else f"{100 * x:.1f}"


def _rate(r: Dict, key: str, div: float) -> str:
    """Achieved rate on the needed FLOPs, one decimal, in the table's unit."""
    return f"{r[f'{key}_rate'] / div:.1f}"


def _speedup(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _time_unit(results: List[Dict], keys) -> tuple:
    """(divisor, name) of the time unit of a table: ms, or us when any time is under 1 ms."""
    times = [r[f"{k}_s"] for res in results for r in res["rows"] for k in keys
             if r.get(f"{k}_s")]
    return (1e-6, "us") if times and min(times) < 1e-3 else (1e-3, "ms")


class _Notes:
    """Footnotes of a table: each distinct text once, numbered in order of first use."""

    def __init__(self):
        self.texts: List[str] = []

    def ref(self, text: str) -> str:
        if not text:
            return ""
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"


def _row_note(r: Dict, keys) -> str:
    parts = []
    if r["status"] == "absent":
        parts.append(r.get("reason"))  # "absent: ... not installed", not a failure
    elif r["status"] == "skipped":
        parts.append(f"skipped: {r.get('reason')}")
    elif r["status"] == "error":
        parts.append(f"error: {r.get('reason')}")
    for k in keys:
        if k != "fwd" and r.get(f"{k}_reason"):
            parts.append(f"no forward + backward: {r[f'{k}_reason']}")
    parts += r.get("notes", [])
    if r.get("setup_s") is not None:
        parts.append(f"setup {common.fmt_time(r['setup_s'])} (untimed)")
    return "; ".join(parts)


def _table(results: List[Dict], device, key: str, title: str, wide: bool = False,
           notes: Optional[_Notes] = None) -> Table:
    """One table per pass (``key``: "fwd" or "fwd_bwd"; with ``wide``, both side by side and
    the notes in the last column). Every column keeps one number format; the footer
    (``_footer``) defines the columns and tags."""
    div, unit = common.flops_rate_unit(device)
    keys = ("fwd", "fwd_bwd") if key == "both" else (key,)
    tdiv, tunit = _time_unit(results, keys)
    table = Table(title=title, show_header=True, show_lines=False, pad_edge=False)
    table.add_column("problem", no_wrap=True)
    table.add_column("impl", no_wrap=True)
    label = {"fwd": "fwd", "fwd_bwd": "fwd+bwd"}
    for k in keys:
        prefix = f"{label[k]} " if len(keys) > 1 else ""
        for c in (f"{prefix}{tunit}", f"{prefix}{unit}", f"{prefix}%mm", f"{prefix}%bound",
                  f"{prefix}speedup"):
            table.add_column(c, justify="right", no_wrap=True)
    table.add_column("note", overflow="fold" if wide else "ellipsis", no_wrap=not wide)
    for res in results:
        first = True
        for r in res["rows"]:
            tag = f"x{res['scale']:g}"
            cells = [f"{res['name']} {tag}" if first else "",
                     peers.describe_form(r) + ("*" if r.get("auto") else "")]
            first = False
            for k in keys:
                t = r.get(f"{k}_s")
                if t is None:
                    cells += ["-"] * 5
                    continue
                cells += [f"{t / tdiv:.2f}" if tunit == "ms" else f"{t / tdiv:.1f}",
                          _rate(r, k, div), _pct(r.get(f"{k}_frac_matmul")),
                          _pct(r.get(f"{k}_frac_bound")), _speedup(r.get(f"{k}_nattn_speedup"))]
            note = _row_note(r, keys)
            cells.append(note if wide or notes is None else notes.ref(note))
            table.add_row(*cells)
        table.add_section()
    return table


def _footer(device, backward: bool, scaling: List[Dict], hidden: List[str]) -> List[str]:
    """Definitions of every column and tag of the tables, as plain lines."""
    _, unit = common.flops_rate_unit(device)
    lines = [
        "columns: problem: named problem (bench --list) and its layout scale factor xF (on CPU "
        "model problems are scaled down by F so that each runs in seconds; x1 = as named); "
        "impl: nattn:<backend>, PyTorch SDPA with the dense boolean mask, FlexAttention "
        "with the same mask as a block mask (the fastest of its mask_mod forms, named: "
        "lookup tables, a dense mask or arithmetic; cli/peers.py), or NATTEN's public API "
        "with its defaults (optional, nattn[peers]; 'absent' when not installed); the "
        "implementations of a problem are timed round-robin, the order rotated by one each "
        "round; * marks the backend nattn's auto picks; "
        f"ms / us: median time of one call; {unit}: needed FLOPs (attended pairs only) per "
        "second; %mm: that rate as a percentage of the device's measured matmul ceiling; "
        "%bound: the tightest lower bound on time (below) as a percentage of the time "
        "(100 = at the speed of light); speedup: this row's time / the time of nattn's pick "
        "(above 1: nattn is faster); note: [n] refers to the notes below.",
        "bounds (docs/performance.md): for every row, the larger of the FLOP bound (needed "
        "FLOPs / matmul ceiling) and the memory bound (compulsory bytes / copy bandwidth); for "
        "rows of nattn's CPU kernels (forward) also the kernel bound: the FLOPs those kernels "
        "execute, counted exactly from their tiling (the lane kernels' window offsets or the "
        "block kernels' key chunks, whichever this build runs: perf.cpu_forward_flops), / "
        "matmul ceiling. The forward + backward bound is the sum of the two passes' bounds.",
    ]
    if not backward:
        lines.append("forward only: --backward adds a forward + backward table.")
    for sc in scaling:
        lines.append(
            f"linear scaling: {sc['large']} has {sc['token_ratio']}x the tokens of "
            f"{sc['small']}; nattn's forward took {common.fmt_time(sc['large_s'])} / "
            f"{common.fmt_time(sc['small_s'])} = {sc['time_ratio']:.2f}x the time; "
            f"{_natten_scaling_text(sc)}. These medians come from a second, separate "
            "measurement with the calls of the two problems interleaved, so that drift of a "
            "shared machine's speed over the minutes between the two table rows does not enter "
            "the ratio; they differ from the table's medians by that drift.")
    if hidden:
        lines.append("not shown: " + ", ".join(hidden) + " (cannot run on this device; "
                     "--all-backends shows them)")
    return lines


def _device_backends(device) -> tuple:
    """(shown, hidden) nattn backends: hidden are those that cannot run even a small 1-D
    problem on this device (e.g. the CUDA backends on a CPU)."""
    from nattn import backends

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    probe = backends.Problem(batch=1, spatial_shape=(64,), heads=1, kv_heads=1, head_dim=64,
                             value_dim=64, kernel_size=(7,), stride=(1,), dilation=(1,),
                             is_causal=(False,), num_additional=0, dtype=dtype, device=device,
                             requires_grad=False)
    shown, hidden = [], []
    for name in _backend_names():
        (hidden if backends.get(name).not_supported_reasons(probe) else shown).append(name)
    return shown, hidden


def print_tables(out, results: List[Dict], sweep: List[Dict], device, backward: bool,
                 wide: bool, scaling: List[Dict], hidden: List[str], threads: int) -> None:
    """The result tables (forward; forward + backward with ``backward``; the window sweep),
    their footnotes and the footer. Without ``wide`` each table fits 100 columns."""
    notes = None if wide else _Notes()
    passes = ["both"] if wide and backward else ["fwd"] + (["fwd_bwd"] if backward else [])
    name = {"fwd": "forward only", "fwd_bwd": "forward + backward",
            "both": "forward | forward + backward"}
    for group, title in ((results, "named problems"), (sweep, "window sweep")):
        if not group:
            continue
        for key in passes:
            out.print(_table(group, device, key, f"{title}: {name[key]} ({threads} threads)",
                             wide, notes))
    if notes is not None:
        for i, text in enumerate(notes.texts, 1):
            out.print(f"[{i}] {text}", markup=False, highlight=False)
    for line in _footer(device, backward, scaling, hidden):
        out.print(line, markup=False, highlight=False)


def _markdown(results: List[Dict], device, backward: bool, meta: Dict) -> str:
    div, unit = common.flops_rate_unit(device)
    lines = [f"# nattn bench: {meta['device']}", "",
             f"date {meta['date']}, commit {meta['commit']}, torch {meta['torch']}, "
             f"threads {meta['threads']}, medians of {meta['repeats']} after {meta['warmup']} "
             f"warm-up, load average {meta['load_average'][0]} before / "
             f"{meta['load_average'][1]} after. Ceilings: " + ", ".join(
                 f"{k}: {v['matmul_flops'] / 1e9:.1f} GFLOP/s matmul, "
                 f"{v['bandwidth'] / 1e9:.1f} GB/s copy" for k, v in meta["ceilings"].items()),
             ""] + [line + "\n" for line in _footer(device, backward, [], [])]
    for sc in meta.get("scaling", []):
        lines += [f"Linear scaling (nattn auto forward, calls of the two problems interleaved): "
                  f"{sc['large']} / {sc['small']} = {common.fmt_time(sc['large_s'])} / "
                  f"{common.fmt_time(sc['small_s'])} = {sc['time_ratio']:.2f} for "
                  f"{sc['token_ratio']}x the tokens; {_natten_scaling_text(sc)}.", ""]
    head = ["problem", "scale", "layout", "impl", "fwd", unit, "%mm", "%bound", "speedup"]
    if backward:
        head += ["fwd+bwd", unit, "%mm", "%bound", "speedup"]
    head.append("note")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for res in results:
        for r in res["rows"]:
            cells = [res["name"], f"{res['scale']:g}", res["problem"]["describe"],
                     r["impl"] + (" (auto)" if r.get("auto") else "")]
            for key in ("fwd", "fwd_bwd") if backward else ("fwd",):
                t = r.get(f"{key}_s")
                cells += ["-"] * 5 if t is None else [
                    common.fmt_time(t), _rate(r, key, div), _pct(r.get(f"{key}_frac_matmul")),
                    _pct(r.get(f"{key}_frac_bound")), _speedup(r.get(f"{key}_nattn_speedup"))]
            cells.append(_row_note(r, ("fwd", "fwd_bwd")).replace("|", "/"))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(results: List[Dict], baseline_path: str) -> List[Dict]:
    """Rows of (problem, impl, pass) whose median time grew by more than 10% over the baseline
    JSON (same problem name and shape); each with old/new seconds and the ratio."""
    with open(baseline_path) as f:
        base = json.load(f)
    old = {}
    for res in base.get("problems", []):
        for r in res["rows"]:
            old[(res["name"], res["problem"]["describe"], r["impl"])] = r
    out = []
    for res in results:
        for r in res["rows"]:
            b = old.get((res["name"], res["problem"]["describe"], r["impl"]))
            if b is None:
                continue
            for key in ("fwd", "fwd_bwd"):
                new_t, old_t = r.get(f"{key}_s"), b.get(f"{key}_s")
                if new_t is None or old_t is None:
                    continue
                ratio = new_t / old_t
                out.append({"problem": res["name"], "impl": r["impl"], "pass": key,
                            "old_s": old_t, "new_s": new_t, "ratio": ratio,
                            "regression": ratio > REGRESSION_THRESHOLD})
    return out


# (smaller, larger, token ratio): pairs whose time ratio checks linear scaling in N. The two
# problems of a pair run minutes apart in the suite, and a shared machine's speed drifts over
# minutes, so the ratio is measured again with their calls interleaved.
SCALING_PAIRS = [("cpu-2d-64", "cpu-2d-128", 4), ("cpu-3d-1k", "cpu-3d-16", 4),
                 ("cpu-1d-4k", "cpu-1d-16k", 4)]


def _scaling(results: List[Dict], device, warmup: int, repeats: int,
             with_natten: bool = True) -> List[Dict]:
    """For each SCALING_PAIRS pair in ``results`` (unscaled): medians of nattn (auto)'s forward
    over ``repeats`` alternating calls of the two problems, and their ratio; the same for
    NATTEN's forward (``natten_*`` keys; None, with ``natten_note``, when it is absent or cannot
    run the pair), its calls in the same rounds."""
    by_name = {r["name"]: r for r in results if r["scale"] == 1}
    out = []
    for small, large, tokens in SCALING_PAIRS:
        if small not in by_name or large not in by_name:
            continue
        fns, natten_fns, note = [], [], None
        for name in (small, large):
            problem = by_name[name]["_problem"]
            inputs = common.make_inputs(problem, device, problem.dtype)
            auto = common.auto_backend(problem, device, problem.dtype)
            fns.append(common.nattn_impls(problem, inputs, device, problem.dtype, [auto])[0]
                       .forward)
            if with_natten and note is None:
                impl = peers.natten_impl(problem, inputs, device, problem.dtype)
                if impl.forward is None:
                    note = impl.skip
                natten_fns.append(impl.forward)
        if note is not None or not with_natten:
            natten_fns = []
        all_fns = fns + natten_fns
        times = [[] for _ in all_fns]
        caps = []
        for fn in all_fns:
            t0 = time.perf_counter()
            common.time_calls(fn, device, 1, 0)
            caps.append(peers.repeats_for(time.perf_counter() - t0, repeats))
            if caps[-1] == repeats:
                common.time_calls(fn, device, max(warmup - 1, 0), 0)
        for rnd in range(repeats):  # rotated by one each round (peers.measure_interleaved)
            shift = rnd % len(all_fns)
            for i in list(range(shift, len(all_fns))) + list(range(shift)):
                if rnd < caps[i]:
                    times[i] += common.time_calls(all_fns[i], device, 0, 1)
        med = [common.median(t) for t in times]
        row = {"small": small, "large": large, "token_ratio": tokens,
               "small_s": med[0], "large_s": med[1], "time_ratio": med[1] / med[0],
               "natten_small_s": None, "natten_large_s": None, "natten_ratio": None,
               "natten_note": note if with_natten else "not measured"}
        if natten_fns:
            row.update(natten_small_s=med[2], natten_large_s=med[3],
                       natten_ratio=med[3] / med[2])
        out.append(row)
    return out


def _natten_scaling_text(sc: Dict) -> str:
    if sc.get("natten_ratio") is None:
        return f"NATTEN: not measured ({sc.get('natten_note') or 'absent'})"
    return (f"NATTEN's: {common.fmt_time(sc['natten_large_s'])} / "
            f"{common.fmt_time(sc['natten_small_s'])} = {sc['natten_ratio']:.2f}x")


def run(args) -> int:
    threads = common.set_threads(args.threads)
    device = common.best_device()
    if args.list:
        return _list(device)
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    repeats = args.repeats if args.repeats is not None else (50 if cuda else 7)
    selected = _selected(args)
    if args.scale is not None and not args.scale > 0:
        raise SystemExit(f"error: --scale {args.scale} must be > 0")
    out = console(wide=args.wide)
    jobs = []
    for p in selected:
        factor = args.scale if args.scale is not None else \
            (1.0 if cuda else problems.default_cpu_scale(p))
        jobs.append((problems.scale(p, factor), factor))
    sweep_jobs = []
    if args.plots:
        for rank in (2, 3):
            sweep_jobs += [(p, 1.0) for p in problems.window_sweep(rank, device.type)]
    out.print(f"[bold]nattn bench[/] on {common.device_name(device)}, torch {torch.__version__}, "
              f"{len(jobs)} problems{f' + {len(sweep_jobs)} sweep points' if sweep_jobs else ''}"
              f", medians of {repeats} after {warmup} warm-up")
    for p, factor in jobs:
        if factor != 1:
            out.print(f"  {p.name}: scale {factor:g} -> {p.describe()}")
    ceilings = _Ceilings(device, args.device_ceilings)
    load_before = os.getloadavg()
    results, sweep = [], []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TimeElapsedColumn(), console=out, transient=True) as progress:
        task = progress.add_task("starting", total=len(jobs) + len(sweep_jobs))
        for p, factor in jobs:
            results.append(_run_problem(p, p.name, factor, args, device, ceilings, warmup,
                                        repeats, progress, task))
        for p, factor in sweep_jobs:
            sweep.append(_run_problem(p, p.name, factor, args, device, ceilings, warmup,
                                      repeats, progress, task))
    scaling = _scaling(results, device, warmup, repeats,  # before _finish drops "_problem"
                       with_natten="natten" not in args.skip)
    for res in results + sweep:
        _finish(res, ceilings.best, args.backward, device.type)
    for key, c in ceilings.best.items():
        out.print(f"ceilings ({c.source}, {key}): matmul "
                  f"{c.matmul_flops / 1e9:.1f} GFLOP/s, copy bandwidth {c.bandwidth / 1e9:.1f} GB/s")
    hidden = [] if args.all_backends else [f"nattn:{n}" for n in _device_backends(device)[1]]
    print_tables(out, results, sweep, device, args.backward, args.wide, scaling, hidden, threads)
    meta = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "commit": common.git_commit(), "device": common.device_name(device),
        "device_type": device.type, "torch": torch.__version__, "python":
        platform.python_version(), "threads": threads, "warmup": warmup, "repeats": repeats,
        "backward": args.backward,
        # 1-minute load average before and after: other processes on the machine skew timings
        "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "ceilings": {k: asdict(v) for k, v in ceilings.best.items()},
        "scaling": scaling,
    }
    doc = {"meta": meta, "problems": results, "sweep": sweep}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        out.print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(_markdown(results + sweep, device, args.backward, meta))
        out.print(f"wrote {args.markdown}")
    if args.plots:
        from . import plots

        for path in plots.write_all(doc, args.plots):
            out.print(f"wrote {path}")
    status = 0
    if args.compare:
        rows = compare(results, args.compare)
        table = Table(title=f"compared with {args.compare}", show_header=True)
        for c in ("problem", "impl", "pass", "baseline", "now", "ratio", ""):
            table.add_column(c)
        for r in rows:
            table.add_row(r["problem"], r["impl"], r["pass"], common.fmt_time(r["old_s"]),
                          common.fmt_time(r["new_s"]), f"{r['ratio']:.2f}",
                          "[red]REGRESSION[/]" if r["regression"] else "")
        out.print(table)
        regressions = [r for r in rows if r["regression"]]
        out.print(f"{len(regressions)} regression(s) (> {REGRESSION_THRESHOLD - 1:.0%} slower) "
                  f"of {len(rows)} compared timings")
        status = 1 if regressions else 0
    return status
