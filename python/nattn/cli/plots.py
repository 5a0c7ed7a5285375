"""PNG plots of a ``bench`` run (matplotlib, imported only when plots are asked for)."""

from __future__ import annotations

import os
import textwrap
from typing import Dict, List

PASSES = (("fwd", "forward"), ("fwd_bwd", "forward + backward"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _passes(problems: List[Dict]) -> List[tuple]:
    """The passes the results hold: forward, and forward + backward when any row timed it."""
    return [(k, n) for k, n in PASSES
            if k == "fwd" or any(r.get(f"{k}_s") for p in problems for r in p["rows"])]


def _impls(problems: List[Dict]) -> List[str]:
    """Implementations in order of first appearance (nattn backends first, as bench runs them)."""
    seen: List[str] = []
    for p in problems:
        for r in p["rows"]:
            if r["impl"] not in seen:
                seen.append(r["impl"])
    return seen


def _problem_label(p: Dict) -> str:
    q = p["problem"]
    shape = "x".join(map(str, q["spatial_shape"]))
    window = "x".join(map(str, q["kernel_size"]))
    heads = f"H{q.get('heads', '?')} D{q.get('head_dim', '?')}"
    return f"{p['name']} x{p['scale']:g}\n{shape} w{window}\n{heads}"


def _caption(meta: Dict, problems: List[Dict]) -> str:
    dtypes = sorted({p.get("dtype", "?") for p in problems})
    return (f"{meta['device']}; dtype {', '.join(dtypes)}; {meta.get('threads', '?')} threads; "
            f"torch {meta['torch']}; nattn commit {meta['commit']}; {meta['date']}. "
            "x = skipped or not run (reason in the bench table / JSON).")


def _finish(fig, title: str, caption: str, path: str) -> str:
    width = fig.get_size_inches()[0]
    chars = int(width * 13)  # about 13 characters per inch at 9 pt
    fig.suptitle("\n".join(textwrap.wrap(title, chars)), fontsize=9)
    fig.text(0.01, 0.005, "\n".join(textwrap.wrap(caption, int(width * 15))), fontsize=7,
             va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_bounds(problems: List[Dict], path: str, meta: Dict) -> str:
    """Grouped bars: time of every implementation as a fraction of the bound that applies to it
    (1.0 = at the bound), log scale; one panel per pass (forward; forward + backward when the
    run timed it). Implementations that did not run are marked x at the bottom of the axis."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    passes = _passes(problems)
    impls = _impls(problems)
    n = len(problems)
    fig, axes = plt.subplots(len(passes), 1, figsize=(max(7.0, 1.2 * n + 3), 3.6 * len(passes)
                                                         + 0.8), squeeze=False)
    width = 0.8 / max(1, len(impls))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, name) in zip(axes[:, 0], passes):
        ys_all = [r[f"{key}_frac_bound"] for p in problems for r in p["rows"]
                  if r.get(f"{key}_frac_bound")]
        floor = min(ys_all) / 3 if ys_all else 1e-3
        for i, impl in enumerate(impls):
            xs, ys, miss = [], [], []
            for j, p in enumerate(problems):
                row = next((r for r in p["rows"] if r["impl"] == impl), None)
                x = j + (i - (len(impls) - 1) / 2) * width
                if row and row.get(f"{key}_frac_bound"):
                    xs.append(x)
                    ys.append(row[f"{key}_frac_bound"])
                elif row is not None:
                    miss.append(x)
            color = colors[i % len(colors)]
            if xs:
                ax.bar(xs, ys, width=width, color=color)
            if miss:
                ax.scatter(miss, [floor * 1.2] * len(miss), marker="x", color=color, s=25,
                           zorder=3)
        ax.set_xticks(range(n))
        ax.set_xticklabels([_problem_label(p) for p in problems], fontsize=6.5)
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(f"bound / time, {name}", fontsize=8)
        handles = [Patch(color=colors[i % len(colors)], label=impl)
                   for i, impl in enumerate(impls)]
        handles.append(Line2D([], [], marker="x", color="gray", linestyle="",
                              label="did not run"))
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0),
                  frameon=False)
    title = "nattn bench: fraction of the speed-of-light bound (1 = at the bound; higher is " \
            "better)"
    return _finish(fig, title, _caption(meta, problems), path)


def plot_sweep(sweep: List[Dict], path: str, meta: Dict) -> str:
    """Speedup of nattn (auto) over each alternative vs window size: one column per rank, one
    row per pass. Implementations that did not run at a window are marked x at speedup 1."""
    plt = _pyplot()
    ranks = sorted({len(p["problem"]["spatial_shape"]) for p in sweep})
    passes = _passes(sweep)
    fig, axes = plt.subplots(len(passes), len(ranks),
                             figsize=(5.8 * len(ranks) + 1.5, 3.8 * len(passes) + 0.8),
                             squeeze=False)
    for row_i, (key, name) in enumerate(passes):
        for ax, rank in zip(axes[row_i], ranks):
            points = [p for p in sweep if len(p["problem"]["spatial_shape"]) == rank]
            impls = [i for i in _impls(points)
                     if not any(r.get("auto") for p in points for r in p["rows"]
                                if r["impl"] == i)]
            colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
            for i, impl in enumerate(impls):
                xs, ys, miss = [], [], []
                for p in points:
                    row = next((r for r in p["rows"] if r["impl"] == impl), None)
                    w = p["problem"]["kernel_size"][0]
                    if row and row.get(f"{key}_nattn_speedup"):
                        xs.append(w)
                        ys.append(row[f"{key}_nattn_speedup"])
                    elif row is not None:
                        miss.append(w)
                color = colors[i % len(colors)]
                if xs:
                    ax.plot(xs, ys, marker="o", label=f"vs {impl}", color=color)
                if miss:
                    ax.scatter(miss, [1.0] * len(miss), marker="x", color=color, zorder=3,
                               label=f"{impl}: did not run")
            ax.axhline(1.0, color="black", linewidth=0.8)
            q = points[0]["problem"] if points else {}
            shape = "x".join(map(str, q.get("spatial_shape", [])))
            ax.set_title(f"{rank}-D {shape}, H{q.get('heads', '?')} D{q.get('head_dim', '?')}: "
                         f"{name}", fontsize=8)
            ax.set_xlabel("window size (per axis)", fontsize=8)
            ax.set_ylabel(f"nattn speedup ({name})", fontsize=8)
            ax.set_yscale("log")
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    title = "nattn bench: speedup of nattn's pick over each alternative against window size " \
            "(above 1: nattn is faster)"
    return _finish(fig, title, _caption(meta, sweep), path)


def write_all(doc: Dict, directory: str) -> List[str]:
    """Every plot of a bench result document into ``directory``; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    meta = doc["meta"]
    paths = []
    if doc["problems"]:
        paths.append(plot_bounds(doc["problems"], os.path.join(directory, "bounds.png"), meta))
    if doc.get("sweep"):
        paths.append(plot_sweep(doc["sweep"], os.path.join(directory, "speedup_vs_window.png"),
                                meta))
    return paths
