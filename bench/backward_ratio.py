"""Forward + backward over the forward alone on the CPU kernels, timed back to back.

The issue's target is forward + backward <= 3.3x the forward on cpu-2d-64. In `bench`'s
interleaved rounds nattn's forward follows calls of SDPA, FlexAttention and NATTEN that evict its
caches, so this script times the two passes alone, in rounds that alternate their order
(bench/rpb_cost.py: variant, interleaved), and reports the medians and the per-round ratios
(median and quartiles).

    PYTHONPATH=python python bench/backward_ratio.py [--problem cpu-2d-64] [--rounds 40]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from nattn import problems
from rpb_cost import interleaved, quartiles, variant


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="cpu-2d-64")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = problems.get(args.problem)
    times = interleaved({"fwd": variant(p, 1, False, False), "fwd+bwd": variant(p, 1, False, True)},
                        args.warmup, args.rounds)
    fwd, both = times["fwd"], times["fwd+bwd"]
    per_round = [b / a for a, b in zip(fwd, both)]
    lo, hi = quartiles(per_round)
    print(f"{args.problem}, {args.threads} threads, {args.rounds} rounds: forward "
          f"{statistics.median(fwd) * 1e3:.2f} ms (min {min(fwd) * 1e3:.2f}), forward + backward "
          f"{statistics.median(both) * 1e3:.2f} ms (min {min(both) * 1e3:.2f}); per-round ratio "
          f"{statistics.median(per_round):.2f} [{lo:.2f}-{hi:.2f}], ratio of medians "
          f"{statistics.median(both) / statistics.median(fwd):.2f}")


if __name__ == "__main__":
    main()
