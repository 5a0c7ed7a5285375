"""PNG plots of a ``bench`` run (matplotlib, imported only when plots are asked for)."""

from __future__ import annotations

import os
from typing import Dict, List


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bounds(problems: List[Dict], path: str, title: str) -> str:
    """Grouped bars: forward time of every implementation as a fraction of the problem's
    tightest speed-of-light bound (1.0 = at the bound), log scale."""
    plt = _pyplot()
    impls = sorted({r["impl"] for p in problems for r in p["rows"] if r.get("fwd_frac_bound")})
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(problems) + 2), 4.5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, p in enumerate(problems):
            row = next((r for r in p["rows"] if r["impl"] == impl), None)
            if row and row.get("fwd_frac_bound"):
                xs.append(j + (i - (len(impls) - 1) / 2) * width)
                ys.append(row["fwd_frac_bound"])
        ax.bar(xs, ys, width=width, label=impl)
    ax.set_xticks(range(len(problems)))
    ax.set_xticklabels([f"{p['name']}\nx{p['scale']:g}" for p in problems], rotation=45,
                       ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("tightest bound / achieved time (forward)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(sweep: List[Dict], path: str, title: str) -> str:
    """Speedup of nattn (auto) over each alternative vs window size, one panel per rank."""
    plt = _pyplot()
    ranks = sorted({len(p["problem"]["spatial_shape"]) for p in sweep})
    fig, axes = plt.subplots(1, len(ranks), figsize=(5.5 * len(ranks), 4), squeeze=False)
    for ax, rank in zip(axes[0], ranks):
        points = [p for p in sweep if len(p["problem"]["spatial_shape"]) == rank]
        impls = sorted({r["impl"] for p in points for r in p["rows"]
                        if r.get("fwd_nattn_speedup") and not r.get("auto")})
        for impl in impls:
            xs, ys = [], []
            for p in points:
                row = next((r for r in p["rows"] if r["impl"] == impl), None)
                if row and row.get("fwd_nattn_speedup"):
                    xs.append(p["problem"]["kernel_size"][0])
                    ys.append(row["fwd_nattn_speedup"])
            ax.plot(xs, ys, marker="o", label=f"vs {impl}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        shape = "x".join(map(str, points[0]["problem"]["spatial_shape"])) if points else ""
        ax.set_title(f"{rank}-D {shape}", fontsize=9)
        ax.set_xlabel("window size (per axis)")
        ax.set_ylabel("nattn speedup (forward)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(doc: Dict, directory: str) -> List[str]:
    """Every plot of a bench result document into ``directory``; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    meta = doc["meta"]
    title = f"{meta['device']}, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}"
    paths = []
    if doc["problems"]:
        paths.append(plot_bounds(doc["problems"], os.path.join(directory, "bounds.png"), title))
    if doc.get("sweep"):
        paths.append(plot_sweep(doc["sweep"], os.path.join(directory, "speedup_vs_window.png"),
                                title))
    return paths
