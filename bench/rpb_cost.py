"""Cost of the relative positional bias on the CPU kernels: time with rpb over time without, on
the NAT/DiNAT problems (python/nattn/problems.py), measured side by side.

Each round times every variant once, in an order rotated per round (forward and forward +
backward, with and without rpb), so that load from other processes hits all variants alike; the
ratio of the medians is reported together with the spread of the per-round ratios (quartiles).
The issue's targets: forward <= 1.2x, forward + backward <= 1.3x.

    PYTHONPATH=python python bench/rpb_cost.py [--rounds 200] [--batch 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import nattn
from nattn import perf, problems


def _inputs(p, batch, rpb, dtype):
    gen = torch.Generator().manual_seed(0)
    shape = (batch, *p.spatial_shape)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(dtype).requires_grad_()

    q = randn(*shape, p.heads, p.head_dim)
    k = randn(*shape, p.kv_heads, p.head_dim)
    v = randn(*shape, p.kv_heads, p.value_dim)
    bias = None
    if rpb:
        bias = randn(p.heads, *(2 * k - 1 for k in p.kernel_size))
    return q, k, v, bias


def variant(p, batch, rpb, backward, dtype=torch.float32):
    """A callable running problem ``p`` on the CPU kernels once (forward, or forward + backward
    to every input), on fixed seeded inputs of ``dtype``."""
    q, k, v, bias = _inputs(p, batch, rpb, dtype)
    g = torch.randn(batch, *p.spatial_shape, p.heads, p.value_dim).to(dtype)

    def call():
        with torch.set_grad_enabled(backward):
            out = nattn.neighborhood_attention(q, k, v, p.kernel_size, stride=p.stride,
                                               dilation=p.dilation, is_causal=p.is_causal,
                                               backend="cpu", rpb=bias)
            if backward:
                leaves = [t for t in (q, k, v, bias) if t is not None]
                torch.autograd.grad(out, leaves, g)

    return call


def interleaved(variants, warmup, rounds):
    """Times every callable of ``variants`` (a dict) once per round, in an order rotated per
    round, so that load from other processes hits all variants alike, each call with Python's
    garbage collector paused; returns, per key, the seconds of each of the ``rounds`` rounds
    after ``warmup`` untimed ones."""
    keys = list(variants)
    times = {key: [] for key in keys}
    for r in range(warmup + rounds):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for key in order:
            with perf.gc_paused():  # as bench times its calls
                t0 = time.perf_counter()
                variants[key]()
                dt = time.perf_counter() - t0
            if r >= warmup:
                times[key].append(dt)
    return times


def quartiles(xs):
    qs = statistics.quantiles(xs, n=4)
    return qs[0], qs[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="+", default=["nat-t-stage1", "dinat-t-stage1"])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    results = []
    for name in args.problems:
        p = problems.get(name)
        variants = {(pass_, rpb): variant(p, args.batch, rpb, pass_ == "fwd+bwd")
                    for pass_ in ("fwd", "fwd+bwd") for rpb in (False, True)}
        times = interleaved(variants, args.warmup, args.rounds)
        for pass_ in ("fwd", "fwd+bwd"):
            base, biased = times[(pass_, False)], times[(pass_, True)]
            per_round = [b / a for a, b in zip(base, biased)]
            lo, hi = quartiles(per_round)
            row = dict(problem=name, batch=args.batch, pass_=pass_,
                       median_ms=statistics.median(base) * 1e3,
                       median_rpb_ms=statistics.median(biased) * 1e3,
                       ratio=statistics.median(biased) / statistics.median(base),
                       round_ratio_q1=lo, round_ratio_q3=hi, rounds=args.rounds)
            results.append(row)
            print(f"{name:16s} {pass_:8s} B{args.batch}: {row['median_ms']:8.3f} ms -> "
                  f"{row['median_rpb_ms']:8.3f} ms with rpb, ratio {row['ratio']:.3f} "
                  f"(per-round quartiles {lo:.3f} .. {hi:.3f})")
    print(f"threads {torch.get_num_threads()}, isa {nattn._native._C.cpu_isa()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
