"""``python -m nattn inmodel``: nattn's CPU kernels as a model sees them, between torch ops.

A nattn call in a model runs right after torch ops, whose OpenMP workers spin-wait for a while
after each region (libgomp's default wait policy). This benchmark times the same nattn calls

- alone (``alone``: only nattn calls, back to back);
- right after a ``torch.matmul`` (``after-matmul``: the forward);
- right after a ``torch.nn.Linear`` forward + backward (``after-linear``: forward + backward);
- inside a toy NAT block, linear -> na2d -> linear -> MLP, forward + backward (``nat-block``:
  the nattn part and the whole block),

in child processes run alternately with the default environment and with
``OMP_WAIT_POLICY=PASSIVE`` (torch's workers then sleep at once: no spinning to compete with),
and in each child with nattn's regions on the process's OpenMP team (``openmp``, the default)
and on nattn's own pool (``pool``, the previous design). Only the nattn calls are timed inside a
sequence; the block is also timed whole. Medians over every sample of every round.

The figure of merit (issue 14): the default environment's time over the passive one's, per
sequence, at most 1.1; and the nattn part of the block over nattn alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import torch
from rich.table import Table

from . import common
from .output import console

SEQUENCES = ("alone", "after-matmul", "after-linear", "nat-block")
MODES = ("openmp", "pool")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inmodel", help="time nattn between torch ops (thread contention), CPU",
        description="Time nattn's CPU kernels alone, right after torch ops and inside a toy NAT "
                    "block, with the default OpenMP wait policy and with "
                    "OMP_WAIT_POLICY=PASSIVE, in alternating child processes.")
    p.add_argument("-i", "--input-size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"),
                   help="2-D layout (default: 64 64)")
    p.add_argument("-w", "--window", type=int, default=7, help="kernel size (default: 7)")
    p.add_argument("-n", "--heads", type=int, default=4, help="heads (default: 4)")
    p.add_argument("-d", "--dim", type=int, default=64, help="head dim (default: 64)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads in the children (default: torch's default)")
    p.add_argument("--rounds", type=int, default=4,
                   help="child processes per environment, alternating (default: 4)")
    p.add_argument("--repeats", type=int, default=10,
                   help="timed calls per sequence and mode in each child (default: 10)")
    p.add_argument("--json", default=None, help="write the samples and medians here (default: none)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(run=run)


# ---------------------------------------------------------------------------------------------
# child: one process, one environment


def _sequences(args):
    import nattn

    torch.manual_seed(0)
    h, w = args.input_size
    c = args.heads * args.dim
    x = torch.randn(1, h, w, c)
    q, k, v = (torch.randn(1, h, w, args.heads, args.dim) for _ in range(3))
    g = torch.randn(1, h, w, args.heads, args.dim)
    a = torch.randn(h * w, c)
    wt = torch.randn(c, c)
    lin = torch.nn.Linear(c, c)
    block = {"qkv": torch.nn.Linear(c, 3 * c), "proj": torch.nn.Linear(c, c),
             "fc1": torch.nn.Linear(c, 4 * c), "fc2": torch.nn.Linear(4 * c, c)}

    def na_fwd():
        t = time.perf_counter()
        nattn.na2d(q, k, v, args.window)
        return time.perf_counter() - t

    def na_fwd_bwd():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        t = time.perf_counter()
        nattn.na2d(qq, kk, vv, args.window).backward(g)
        return time.perf_counter() - t

    def after_matmul():
        torch.matmul(a, wt)
        return na_fwd()

    def after_linear():
        xx = x.detach().requires_grad_()
        lin(xx).sum().backward()
        return na_fwd_bwd()

    def nat_block():
        xx = x.detach().requires_grad_()
        t0 = time.perf_counter()
        qkv = block["qkv"](xx).unflatten(-1, (3, args.heads, args.dim))
        qq, kk, vv = qkv.unbind(-3)
        t1 = time.perf_counter()
        o = nattn.na2d(qq, kk, vv, args.window)
        t_na = time.perf_counter() - t1
        y = xx + block["proj"](o.flatten(-2))
        y = y + block["fc2"](torch.nn.functional.gelu(block["fc1"](y)))
        # the backward runs nattn's backward inside autograd; its share is timed by a hook
        y.sum().backward()
        return t_na, time.perf_counter() - t0

    return {"alone": na_fwd, "alone-fwd-bwd": na_fwd_bwd, "after-matmul": after_matmul,
            "after-linear": after_linear, "nat-block": nat_block}


def _child(args) -> int:
    from nattn import _C

    if args.threads:
        torch.set_num_threads(args.threads)
    seqs = _sequences(args)
    samples: Dict[str, List[float]] = {}
    for _ in range(2):  # warm-up, every sequence and mode
        for mode in MODES:
            _C.cpu_threading("auto" if mode == "openmp" else "pool")
            for fn in seqs.values():
                fn()
    for _ in range(args.repeats):
        for mode in MODES:
            runtime = _C.cpu_threading("auto" if mode == "openmp" else "pool")
            if mode == "openmp" and not runtime.startswith("openmp"):
                continue  # no OpenMP runtime loaded: the pool is all there is
            for name, fn in seqs.items():
                r = fn()
                if name == "nat-block":
                    samples.setdefault(f"{mode}/nat-block-na", []).append(r[0])
                    samples.setdefault(f"{mode}/nat-block", []).append(r[1])
                else:
                    samples.setdefault(f"{mode}/{name}", []).append(r)
    _C.cpu_threading("auto")
    json.dump({"threads": torch.get_num_threads(), "samples": samples}, sys.stdout)
    return 0


# ---------------------------------------------------------------------------------------------
# parent: alternate the environments


ENVIRONMENTS = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def _child_argv(args) -> List[str]:
    argv = [sys.executable, "-m", "nattn", "inmodel", "--child",
            "-i", *map(str, args.input_size), "-w", str(args.window), "-n", str(args.heads),
            "-d", str(args.dim), "--repeats", str(args.repeats)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def run(args) -> int:
    if args.child:
        return _child(args)
    out = console()
    samples: Dict[str, Dict[str, List[float]]] = {e: {} for e in ENVIRONMENTS}
    threads = None
    for r in range(args.rounds):
        for env_name, extra in ENVIRONMENTS.items():
            env = dict(os.environ)
            env.pop("OMP_WAIT_POLICY", None)
            env.update(extra)
            res = subprocess.run(_child_argv(args), env=env, capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"error: inmodel child ({env_name}) failed:\n{res.stderr}")
            doc = json.loads(res.stdout)
            threads = doc["threads"]
            for key, vals in doc["samples"].items():
                samples[env_name].setdefault(key, []).extend(vals)
        out.print(f"round {r + 1}/{args.rounds} done")
    med = {e: {k: statistics.median(v) for k, v in s.items()} for e, s in samples.items()}
    h, w = args.input_size
    title = (f"nattn between torch ops: {h}x{w}, window {args.window}, {args.heads} heads of "
             f"{args.dim}, fp32, {threads} threads; medians of {args.rounds * args.repeats}")
    table = Table(title=title)
    for col in ("sequence", "timed", "default", "passive", "default/passive", "pool (default)",
                "pool/openmp"):
        table.add_column(col, justify="left" if col in ("sequence", "timed") else "right")
    rows = []
    described = [("alone", "nattn fwd", "alone"), ("alone-fwd-bwd", "nattn fwd+bwd", "alone"),
                 ("after-matmul", "nattn fwd", "after matmul"),
                 ("after-linear", "nattn fwd+bwd", "after linear fwd+bwd"),
                 ("nat-block-na", "nattn fwd", "NAT block"),
                 ("nat-block", "whole block fwd+bwd", "NAT block")]
    for key, timed, label in described:
        d, p = med["default"].get(f"openmp/{key}"), med["passive"].get(f"openmp/{key}")
        pool = med["default"].get(f"pool/{key}")
        row = {"sequence": key, "timed": timed, "default_s": d, "passive_s": p,
               "pool_default_s": pool,
               "default_over_passive": d / p if d and p else None,
               "pool_over_openmp": pool / d if d and pool else None}
        rows.append(row)
        table.add_row(label, timed, common.fmt_time(d), common.fmt_time(p),
                      f"{row['default_over_passive']:.2f}" if row["default_over_passive"] else "-",
                      common.fmt_time(pool),
                      f"{row['pool_over_openmp']:.2f}" if row["pool_over_openmp"] else "-")
    out.print(table)
    alone = med["default"].get("openmp/alone")
    in_block = med["default"].get("openmp/nat-block-na")
    block = med["default"].get("openmp/nat-block")
    if alone and in_block and block:
        out.print(f"NAT block: nattn's forward inside the block takes {in_block / alone:.2f}x its "
                  f"stand-alone time; the nattn forward is {in_block / block:.0%} of the block's "
                  "forward + backward.")
    out.print("default: torch's default OpenMP wait policy (what a user gets); passive: "
              "OMP_WAIT_POLICY=PASSIVE in the child (for comparison only); openmp: nattn's "
              "regions on the process's OpenMP team (the default); pool: nattn's own thread "
              "pool (the previous design).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {"commit": common.git_commit(), "device":
                                common.device_name(torch.device("cpu")), "threads": threads,
                                "torch": torch.__version__, "rounds": args.rounds,
                                "repeats": args.repeats, "problem": title},
                       "rows": rows, "samples": samples}, f, indent=1)
        out.print(f"wrote {args.json}")
    return 0
