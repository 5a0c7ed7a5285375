"""``python -m nattn profile``: run one problem with nattn's backends on the best device and
print forward/backward medians, needed FLOPs, achieved rate and peak memory."""

from __future__ import annotations

import json

import torch
from rich.table import Table

from .. import perf
from . import common, peers
from .output import console


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="time one problem with nattn's backends",
                       description="Time one neighborhood-attention problem with nattn's "
                                   "backends on the best device (cuda if available, else cpu).")
    common.add_problem_args(p)
    p.add_argument("--backend", default="auto",
                   help="'auto' (what nattn picks), 'all' (every backend that can run it), or "
                        "a backend name (default: auto)")
    p.add_argument("--backward", action="store_true", help="also time the backward pass (default: forward only)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls (default: 3 on CPU, 10 on GPU)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls, median reported (default: 10 on CPU, 50 on GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads, torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this path (default: none)")
    p.add_argument("--natten", action="store_true",
                   help="also time NATTEN's public API with its defaults, as a peer (optional: "
                        "pip install 'nattn[peers]'; reported as absent when not installed; "
                        "default: off)")
    p.set_defaults(run=run)


def _analytic_bytes(problem, dtype, backward: bool, backend: str) -> int:
    """Bytes of the tensors a fused nattn call allocates: out and lse (fp32) for the forward;
    plus dq, dk, dv (+ additional-token gradients) and delta (fp32) for the backward. The
    reference backend also holds the dense mask and the scores and probabilities,
    B * H * N * (N + M) each."""
    elt = perf._element_size(dtype)
    b, n, m = problem.batch, problem.tokens, problem.num_additional
    fwd = b * n * problem.heads * (problem.value_dim * elt + 4)
    if backend == "reference":
        fwd += n * (n + m) + 2 * b * problem.heads * n * (n + m) * elt
    if not backward:
        return fwd
    grads = (b * n * problem.heads * problem.head_dim
             + b * (n + m) * problem.kv_heads * (problem.head_dim + problem.value_dim)) * elt
    return fwd + grads + b * n * problem.heads * 4


def run(args) -> int:
    threads = common.set_threads(args.threads)
    device = common.best_device()
    problem = common.problem_from_args(args, device)
    dtype = problem.dtype
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 3)
    repeats = args.repeats if args.repeats is not None else (50 if cuda else 10)
    inputs = common.make_inputs(problem, device, dtype)
    auto = common.auto_backend(problem, device, dtype)
    if args.backend == "auto":
        names = [auto]
    elif args.backend == "all":
        names = None
    else:
        names = [args.backend]
    try:
        impls = common.nattn_impls(problem, inputs, device, dtype, names)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.natten:
        impls.append(peers.natten_impl(problem, inputs, device, dtype))
    fwd_flops = perf.needed_flops(problem)
    bwd_flops = perf.needed_flops(problem, backward=True)
    div, unit = common.flops_rate_unit(device)
    out = console()
    out.print(f"[bold]{problem.describe()}[/] {str(dtype).replace('torch.', '')} on "
              f"{common.device_name(device)}; auto backend: {auto}; threads: {threads}; "
              f"medians of {repeats} after {warmup} warm-up")
    table = Table(show_header=True)
    out.print(f"needed FLOPs: forward {common.fmt_count(fwd_flops)}, backward "
              f"{common.fmt_count(bwd_flops)}")
    for col in ("backend", "forward", "backward", f"fwd {unit}", f"bwd {unit}", "peak memory"):
        table.add_column(col, justify="left" if col == "backend" else "right", no_wrap=True)
    mem_source = "torch.cuda.max_memory_allocated over inputs" if cuda else \
        "analytic: tensors the call allocates (outputs, lse; grads, delta)"
    rows = []
    skipped = []
    for impl in impls:
        name = impl.name.split(":", 1)[-1]
        if impl.skip:
            skipped.append(f"{name}: {impl.skip}")
            table.add_row(name, f"skipped [{len(skipped)}]", "", "", "", "")
            rows.append({"backend": name, "status": "skipped", "reason": impl.skip})
            continue
        row = {"backend": name, "status": "ok", "fwd_flops": fwd_flops, "bwd_flops": bwd_flops}
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        row["fwd_s"] = common.median(common.time_calls(impl.forward, device, warmup, repeats))
        if args.backward and impl.backward_only is None:
            row["bwd_reason"] = impl.bwd_skip or "no backward"
        elif args.backward:
            call = impl.backward_only()
            row["bwd_s"] = common.median(common.time_calls(call, device, warmup, repeats))
        if cuda:
            row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        elif impl.kind == "nattn":
            row["peak_bytes"] = _analytic_bytes(problem, dtype, args.backward, name)
        else:
            row["peak_bytes"] = None  # the analytic count describes nattn's fused calls only
        row["peak_source"] = mem_source
        rows.append(row)
        bwd = row.get("bwd_s")
        table.add_row(
            name, common.fmt_time(row["fwd_s"]), common.fmt_time(bwd),
            f"{fwd_flops / row['fwd_s'] / div:.3g}",
            f"{bwd_flops / bwd / div:.3g}" if bwd else "-",
            common.fmt_bytes(row["peak_bytes"]),
        )
    out.print(table)
    for i, text in enumerate(skipped, 1):
        out.print(f"[{i}] skipped {text}", markup=False, highlight=False)
    out.print(f"peak memory: {mem_source}. FLOPs: needed only (forward 2BHW(D+Dv), backward "
              f"2BHW(3D+2Dv); W = attended pairs), see nattn.perf.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"problem": common.dataclass_problem_dict(problem), "device":
                       common.device_name(device), "dtype": str(dtype), "rows": rows}, f,
                      indent=2)
    return 0

