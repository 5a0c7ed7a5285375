"""Communication of context-parallel neighborhood attention: bytes per rank per call for halo,
Ulysses and all-gather on the named video problems, next to the compute time per rank from the
speed-of-light model (docs/distributed.md shows the result).

    python bench/cp_comm.py --out bench/results/cp-comm            # table + plot (closed form)
    python bench/cp_comm.py --out bench/results/cp-comm --measure  # + gloo counts

Closed form: ``nattn.distributed.make_plan`` (python/nattn/distributed/_plan.py) at the models'
own heads, head dims and dtype (bf16). ``--measure`` spawns gloo worlds of 4, 8 and 16 CPU
processes per problem and sharded axis and runs the exchange code of both strategies
(``HaloGather``; ``SeqToHeads`` of q, k, v and ``HeadsToSeq`` of out), forward and backward, on
the full layout but with 16 heads of dim 8 in fp32 so that 16 processes fit in memory; the
attention itself is not computed (the exchanges do not depend on its values). Each rank's
counted bytes must equal the closed form for that configuration; the byte formulas are linear in
heads x dims x element size, which is how the table's numbers follow. tests/test_distributed.py
checks the same equality for whole calls (attention included) on 52 random configurations.

Time model: H100 SXM datasheet ceilings (989 TFLOP/s dense bf16, 3.35 TB/s HBM3) for compute,
and 450 GB/s per direction per GPU (NVLink 4) for communication, full duplex: a rank's
communication time is max(sent, received) / 450 GB/s. Both are lower bounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from nattn import perf, problems  # noqa: E402
from nattn.backends import Problem  # noqa: E402
from nattn.distributed import _plan  # noqa: E402

PROBLEMS = ("hunyuan-video", "cosmos-predict2.5-2b")
# A small-window problem for contrast (table only, closed form, not measured, not plotted):
# 7 x 7 windows on a 256 x 256 map, where the halo is a thin border.
CONTRAST = ("nat-seg-stage1",)
WORLDS = (4, 8, 16)
AXES = (0, 1)  # frames, rows
CEILINGS = perf.Ceilings(989e12, 3.35e12, "H100 SXM datasheet (dense bf16, HBM3)", "H100",
                         "bfloat16")
LINK_BYTES_PER_S = 450e9  # NVLink 4 per direction per GPU
MEASURE = dict(heads=16, kv_heads=16, head_dim=8, value_dim=8, dtype=torch.float32)


def even_lengths(length, world):
    return [length // world + (r < length % world) for r in range(world)]


def layout(p, world, axis, heads=None, kv_heads=None, head_dim=None, value_dim=None,
           dtype=None, requires_grad=True):
    dtype = dtype or p.dtype
    return _plan.Layout(
        lengths=tuple(even_lengths(p.spatial_shape[axis], world)), axis=axis,
        spatial_shape=p.spatial_shape, batch=p.batch, heads=heads or p.heads,
        kv_heads=kv_heads or p.kv_heads, head_dim=head_dim or p.head_dim,
        value_dim=value_dim or p.value_dim, num_additional=p.num_additional,
        kernel_size=p.kernel_size, stride=p.stride, dilation=p.dilation, is_causal=p.is_causal,
        element_size=torch.empty((), dtype=dtype).element_size(), return_lse=False,
        requires_grad=requires_grad)


def _problem(p, spatial=None, heads=None, kv_heads=None):
    return Problem(batch=p.batch, spatial_shape=tuple(spatial or p.spatial_shape),
                   heads=heads or p.heads, kv_heads=kv_heads or p.kv_heads,
                   head_dim=p.head_dim, value_dim=p.value_dim, kernel_size=p.kernel_size,
                   stride=p.stride, dilation=p.dilation, is_causal=p.is_causal,
                   num_additional=p.num_additional, dtype=p.dtype, device=torch.device("cpu"),
                   requires_grad=True)


def compute_seconds(problem):
    """Forward + backward speed-of-light time (the tightest bound of each)."""
    return sum(perf.speed_of_light(problem, CEILINGS, backward=b).tightest_bound
               for b in (False, True))


def table_rows():
    rows = []
    for name in PROBLEMS + CONTRAST:
        p = problems.get(name)
        whole = compute_seconds(_problem(p))
        for axis in AXES:
            for world in WORLDS:
                lay = layout(p, world, axis)
                plan = _plan.make_plan(lay)
                row = dict(problem=name, axis=axis, world=world, lengths=list(lay.lengths),
                           chosen=plan.strategy, ideal_compute_s=whole / world)
                for s, cost in plan.costs.items():
                    entry = {"feasible": cost.feasible, "reason": cost.reason}
                    if cost.feasible:
                        ranks = range(world)
                        entry.update(
                            forward_max=max(cost.forward_sent[r] + cost.forward_received[r]
                                            for r in ranks),
                            total_max=cost.max_per_rank(True),
                            link_s=max(max(cost.forward_sent[r] + cost.backward_sent[r],
                                           cost.forward_received[r] + cost.backward_received[r])
                                       for r in ranks) / LINK_BYTES_PER_S,
                        )
                        if s == "halo":
                            rows_max = max(cost.computed_rows)
                            spatial = list(p.spatial_shape)
                            spatial[axis] = rows_max
                            entry["computed_rows_max"] = rows_max
                            entry["compute_s"] = compute_seconds(_problem(p, spatial))
                        elif s == "ulysses":
                            entry["compute_s"] = compute_seconds(
                                _problem(p, heads=p.heads // world,
                                         kv_heads=p.kv_heads // world))
                        else:
                            entry["compute_s"] = whole / world
                    row[s] = entry
                rows.append(row)
    return rows


# ------------------------------------------------------------------ measurement on gloo

def _measure_worker(rank, world, init_file, jobs, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    from nattn.distributed import _comm

    results = []
    for name, axis in jobs:
        p = problems.get(name)
        lay = layout(p, world, axis, **{k: v for k, v in MEASURE.items()})
        plan = _plan.make_plan(lay)
        dim = axis + 1
        n = lay.lengths[rank]
        local = list(p.spatial_shape)
        local[axis] = n
        shape = [p.batch] + local
        dt = MEASURE["dtype"]
        q = torch.randn(shape + [lay.heads, lay.head_dim], dtype=dt, requires_grad=True)
        k = torch.randn(shape + [lay.kv_heads, lay.head_dim], dtype=dt, requires_grad=True)
        v = torch.randn(shape + [lay.kv_heads, lay.value_dim], dtype=dt, requires_grad=True)
        got = {}
        with _comm.count_bytes() as c:
            k_ext, v_ext = _comm.HaloGather.apply(k, v, plan.halo, rank, dim, None)
            (k_ext.sum() + v_ext.sum()).backward()
        got["halo"] = [c.sent["forward"], c.received["forward"], c.sent["backward"],
                       c.received["backward"]]
        head = q.dim() - 2
        with _comm.count_bytes() as c:
            qh, kh, vh = _comm.SeqToHeads.apply(list(lay.lengths), rank, [(dim, head)] * 3,
                                                None, q, k, v)
            out_h = qh * 1.0  # stands in for the local attention's output (D_v == D here)
            (out,) = _comm.HeadsToSeq.apply(list(lay.lengths), rank, [(dim, head)], None, out_h)
            (out.sum() + kh.sum() + vh.sum()).backward()
        got["ulysses"] = [c.sent["forward"], c.received["forward"], c.sent["backward"],
                          c.received["backward"]]
        want = {s: [plan.costs[s].forward_sent[rank], plan.costs[s].forward_received[rank],
                    plan.costs[s].backward_sent[rank], plan.costs[s].backward_received[rank]]
                for s in ("halo", "ulysses")}
        results.append(dict(problem=name, axis=axis, world=world, rank=rank, counted=got,
                            closed_form=want, equal=got == want))
        del q, k, v, k_ext, v_ext, qh, kh, vh, out
    dist.barrier()
    dist.destroy_process_group()
    Path(out_dir, f"measure-{world}-{rank}.json").write_text(json.dumps(results))


def measure(out_dir: Path):
    import tempfile

    import torch.multiprocessing as mp

    jobs = [(name, axis) for name in PROBLEMS for axis in AXES]
    all_results = []
    for world in WORLDS:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            mp.start_processes(_measure_worker, args=(world, str(Path(tmp, "init")), jobs, tmp),
                               nprocs=world, join=True, start_method="spawn")
            for r in range(world):
                all_results += json.loads(Path(tmp, f"measure-{world}-{r}.json").read_text())
            print(f"measured world {world} in {time.time() - t0:.0f} s", flush=True)
    (out_dir / "measured.json").write_text(json.dumps(all_results, indent=1))
    return all_results


# ------------------------------------------------------------------ output

def _mb(b):
    return f"{b / 1e6:,.0f}"


def _ms(s):
    return f"{s * 1e3:.2f}"


def markdown(rows, measured):
    lines = [
        "# Context-parallel communication per rank per call (closed form)",
        "",
        "Produced by `python bench/cp_comm.py --out bench/results/cp-comm --measure` "
        "(no GPU involved). Bytes: payload sent + received by the busiest rank, bf16, batch 1, "
        "the models' heads and head dims, even slabs. fwd = forward; f+b = forward + backward. "
        "Link time: max(sent, received) over forward + backward at 450 GB/s per direction "
        "(NVLink 4). Compute: speed-of-light forward + backward time of the busiest rank's "
        "local problem on an H100 SXM (989 TFLOP/s bf16 dense, 3.35 TB/s), from nattn.perf. "
        "`ideal` is the whole problem's compute divided by the ranks.",
        "",
        "| problem | axis | ranks | halo fwd MB | halo f+b MB | halo link ms | halo compute ms "
        "| ulysses f+b MB | ulysses link ms | ulysses compute ms | all-gather f+b MB "
        "| all-gather link ms | ideal compute ms | auto |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        h, u, g = r["halo"], r["ulysses"], r["all-gather"]
        uf = (f"{_mb(u['total_max'])} | {_ms(u['link_s'])} | {_ms(u['compute_s'])}"
              if u["feasible"] else "n/a | n/a | n/a")
        video = r["problem"] in PROBLEMS
        axis = {0: "0 (frames)" if video else "0 (rows)",
                1: "1 (rows)" if video else "1 (columns)"}[r["axis"]]
        lines.append(
            f"| {r['problem']} | {axis} | {r['world']} | {_mb(h['forward_max'])} | "
            f"{_mb(h['total_max'])} | {_ms(h['link_s'])} | {_ms(h['compute_s'])} "
            f"({h['computed_rows_max']} rows) | {uf} | {_mb(g['total_max'])} | "
            f"{_ms(g['link_s'])} | {_ms(r['ideal_compute_s'])} | {r['chosen']} |")
    infeasible = sorted({(r["problem"], r["world"], r["ulysses"]["reason"]) for r in rows
                         if not r["ulysses"]["feasible"]})
    if infeasible:
        lines += ["", "n/a: " + "; ".join(f"{p} at {w} ranks: {why}"
                                          for p, w, why in infeasible)]
    if measured is not None:
        ok = sum(m["equal"] for m in measured)
        lines += ["", f"Measured on gloo (CPU processes, full layouts with "
                  f"{MEASURE['heads']} heads of dim {MEASURE['head_dim']} in fp32, exchange code "
                  f"only): {ok} of {len(measured)} (problem, axis, ranks, rank) counts equal the "
                  "closed form for halo and Ulysses, forward and backward (measured.json). "
                  f"{', '.join(CONTRAST)} is closed form only."]
    return "\n".join(lines) + "\n"


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PROBLEMS), figsize=(11, 5.2), sharey=True)
    for ax, name in zip(axes, PROBLEMS):
        for axis, style in zip(AXES, ("-", "--")):
            sel = [r for r in rows if r["problem"] == name and r["axis"] == axis]
            worlds = [r["world"] for r in sel]
            for key, color in (("halo", "C0"), ("ulysses", "C1"), ("all-gather", "C2")):
                pts = [(w, r[key]["link_s"] * 1e3) for w, r in zip(worlds, sel)
                       if r[key]["feasible"]]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=color,
                            label=f"{key} link, axis {axis}")
            ax.plot(worlds, [r["halo"]["compute_s"] * 1e3 for r in sel], style, marker="s",
                    color="k", label=f"halo compute, axis {axis}")
        ideal = [r for r in rows if r["problem"] == name and r["axis"] == 0]
        ax.plot([r["world"] for r in ideal], [r["ideal_compute_s"] * 1e3 for r in ideal], ":",
                color="gray", label="ideal compute (= ulysses)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(list(WORLDS), [str(w) for w in WORLDS])
        ax.set_xlabel("ranks")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms per rank, forward + backward (H100 model)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=4)
    fig.suptitle("Context parallelism: NVLink time of each strategy vs compute per rank")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--measure", action="store_true")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = table_rows()
    (args.out / "table.json").write_text(json.dumps(rows, indent=1))
    saved = args.out / "measured.json"
    if args.measure:
        measured = measure(args.out)
    else:  # keep an earlier measurement's summary line
        measured = json.loads(saved.read_text()) if saved.exists() else None
    (args.out / "README.md").write_text(markdown(rows, measured))
    plot(rows, args.out / "cp_comm.png")
    print((args.out / "README.md").read_text())


if __name__ == "__main__":
    main()
