"""Tile counts of every named model problem at full size, 1-D flat vs multi-dim tiling (no
timing, no device: the counts are exact and machine-independent).

    PYTHONPATH=python python bench/sol_table.py [OUT_DIR]   (default bench/results/sol-models)

Writes OUT_DIR/<problem>.json (nattn.perf.speed_of_light without ceilings) and OUT_DIR/README.md.
"""

import json
import os
import sys

from nattn import perf, problems


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    lines = [
        "# Tile counts of the named model problems (full size)",
        "",
        "Produced by `bench/sol_table.py` (exact counts from the tile planner; no timing). Tiles "
        "hold 128 Q and 128 KV tokens in both tilings; multi-dim uses the recommended shape. "
        "`needed / computed` = needed FLOPs / FLOPs of all visited tile pairs.",
        "",
        "| problem | layout | density | multi-dim Q x KV tile | visited | masked | needed / "
        "computed | 1-D flat visited | masked | needed / computed | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in problems.suite("models"):
        report = perf.speed_of_light(p)
        with open(os.path.join(out_dir, f"{p.name}.json"), "w") as f:
            json.dump({"problem": p.name, "describe": p.describe(), "source": p.source,
                       "sol": report.to_dict()}, f, indent=1)
        m, flat = report.tiles["multi-dim"], report.tiles["1-D flat"]
        shape = "x".join(map(str, m["q_tile"])) + " / " + "x".join(map(str, m["kv_tile"]))
        lines.append(
            f"| {p.name} | {p.describe()} | {report.density:.2%} | {shape} | {m['visited']} | "
            f"{m['masked_fraction']:.0%} | {m['efficiency']:.1%} | {flat['visited']} | "
            f"{flat['masked_fraction']:.0%} | {flat['efficiency']:.1%} | {report.note} |")
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/sol-models")
