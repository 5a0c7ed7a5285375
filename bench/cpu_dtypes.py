"""Reduced precision on the CPU kernels: bf16 and fp16 time against fp32 on named problems,
forward and forward + backward, measured side by side.

Every variant (dtype x pass) runs once per round in an order rotated per round (rpb_cost.py:
interleaved); reported are the medians and the fp32 / dtype speedup of the medians with the
quartiles of the per-round speedups. The CPU kernels compute fp16 in fp32 (they widen each
element when packing a tile), and so does bf16, except at the avx512bf16 level (AVX512-BF16),
where the forward's lane kernels and the backward's products run on bf16 pairs (block_kernels.h:
lane_forward_bf16, lane_line_scores_bf16, accumulate_pairs_bf16). The kernel level and the CPU's
instruction-set features (AVX512-BF16, AVX512-FP16, AMX) are printed alongside.

    PYTHONPATH=python python bench/cpu_dtypes.py [--problems cpu-2d-64] [--rounds 40]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import nattn
from nattn import problems
from rpb_cost import interleaved, quartiles, variant

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")


def cpu_features():
    """The FEATURES flags /proc/cpuinfo lists for this CPU ({} where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return {f: f in flags for f in FEATURES}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="+", default=["cpu-2d-64"])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    results = []
    for name in args.problems:
        p = problems.get(name)
        variants = {(pass_, dt): variant(p, p.batch, False, pass_ == "fwd+bwd", DTYPES[dt])
                    for pass_ in ("fwd", "fwd+bwd") for dt in DTYPES}
        times = interleaved(variants, args.warmup, args.rounds)
        for pass_ in ("fwd", "fwd+bwd"):
            base = times[(pass_, "fp32")]
            for dt in DTYPES:
                if dt == "fp32":
                    continue
                other = times[(pass_, dt)]
                per_round = [a / b for a, b in zip(base, other)]
                lo, hi = quartiles(per_round)
                row = dict(problem=name, pass_=pass_, dtype=dt,
                           fp32_ms=statistics.median(base) * 1e3,
                           median_ms=statistics.median(other) * 1e3,
                           speedup=statistics.median(base) / statistics.median(other),
                           round_speedup_q1=lo, round_speedup_q3=hi, rounds=args.rounds)
                results.append(row)
                print(f"{name:12s} {pass_:8s} {dt}: {row['median_ms']:8.3f} ms against fp32 "
                      f"{row['fp32_ms']:8.3f} ms, speedup {row['speedup']:.3f} "
                      f"(per-round quartiles {lo:.3f} .. {hi:.3f})")
    meta = dict(threads=torch.get_num_threads(), isa=nattn._native._C.cpu_isa(),
                cpu_features=cpu_features(), torch=torch.__version__)
    print(meta)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
