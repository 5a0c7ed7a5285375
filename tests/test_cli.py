"""The ``python -m nattn`` CLI on tiny problems: every test checks table content or JSON fields."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nattn import perf, problems
from nattn.__main__ import main

pytest.importorskip("nattn._C")



def test_sol_json_matches_perf(tmp_path, capsys):
    out = tmp_path / "sol.json"
    rc = main(["sol", "-i", "16", "16", "-n", "2", "-d", "16", "-w", "5", "--dilation", "2",
               "--tile-shape", "4x4", "2x8", "--matmul-tflops", "1", "--bandwidth-gbs", "100",
               "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "visited tile pairs" in text and "1-D flat" in text and "multi-dim" in text
    assert "tightest bound" in text
    doc = json.loads(out.read_text())
    sol = doc["sol"]
    p = problems.NamedProblem("custom", (16, 16), 2, 2, 16, (5, 5), (1, 1), (2, 2),
                              (False, False), "test")
    counts = perf.multi_dim_tiles(p, (4, 4), (2, 8))
    assert sol["tiles"]["multi-dim"]["visited"] == counts.visited
    assert sol["tiles"]["multi-dim"]["full"] == counts.full
    assert sol["tiles"]["1-D flat"]["q_tile"] == [16]
    assert sol["needed_flops"] == perf.needed_flops(p)
    assert sol["ceilings"]["source"] == "supplied"
    assert sol["flop_bound"] == pytest.approx(perf.needed_flops(p) / 1e12)
    assert sol["memory_bound"] == pytest.approx(sol["bytes"] / 1e11)


def test_sol_reports_broken_window_rule(capsys):
    with pytest.raises(SystemExit, match="kernel_size \\* dilation must be <= length"):
        main(["sol", "-i", "8", "-w", "5", "--dilation", "2", "--no-measure"])
    with pytest.raises(SystemExit, match="window-size needs 1 or 2 values"):
        main(["sol", "-i", "8", "8", "-w", "3", "3", "3", "--no-measure"])


def test_sol_named_problem_is_perfectly_block_sparse(tmp_path, capsys):
    out = tmp_path / "flux.json"
    assert main(["sol", "--problem", "flux-4k", "--no-measure", "--json", str(out)]) == 0
    assert "perfectly block-sparse" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["problem"]["spatial_shape"] == [256, 256]
    assert doc["dtype"] == ("bfloat16" if torch.cuda.is_available() else "float32")
    multi, flat = doc["sol"]["tiles"]["multi-dim"], doc["sol"]["tiles"]["1-D flat"]
    assert multi["masked"] == 0 and multi["efficiency"] == pytest.approx(1.0)
    assert flat["visited"] > multi["visited"]
    with pytest.raises(SystemExit, match="--input-size and --window-size are required"):
        main(["sol", "--no-measure"])


def test_sol_causal_flag_alone_makes_every_axis_causal(tmp_path):
    out = tmp_path / "s.json"
    main(["sol", "-i", "12", "12", "-w", "3", "--causal", "--no-measure", "--json", str(out)])
    assert json.loads(out.read_text())["problem"]["is_causal"] == [True, True]
    main(["sol", "-i", "12", "12", "-w", "3", "--causal", "true", "false", "--no-measure",
          "--json", str(out)])
    assert json.loads(out.read_text())["problem"]["is_causal"] == [True, False]


def test_profile_all_backends(tmp_path, capsys):
    out = tmp_path / "profile.json"
    rc = main(["profile", "-i", "8", "8", "-n", "2", "--kv-heads", "1", "-d", "16", "-w", "3",
               "--backend", "all", "--backward", "--warmup", "0", "--repeats", "2",
               "--threads", "2", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "auto backend" in text and "GFLOP/s" in text and "peak memory: analytic" in text
    doc = json.loads(out.read_text())
    rows = {r["backend"]: r for r in doc["rows"]}
    assert "reference" in rows
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert ok, rows
    for r in ok:
        assert r["fwd_s"] > 0 and r["bwd_s"] > 0
        assert r["fwd_flops"] == 2 * 2 * 64 * 9 * 32
        assert r["peak_bytes"] > 0


def test_bench_list(capsys):
    assert main(["bench", "--list"]) == 0
    text = capsys.readouterr().out
    for name in problems.PROBLEMS:
        assert name in text


def test_bench_rows_json_markdown_and_compare(tmp_path, capsys):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    rc = main(["bench", "--problems", "dinat-t-stage3", "--scale", "0.5", "--backward",
               "--warmup", "1", "--repeats", "2", "--json", str(out), "--markdown", str(md)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "dinat-t-stage3 x0.5" in text and "sdpa-dense-mask" in text
    assert "forward only" in text and "forward + backward" in text
    doc = json.loads(out.read_text())
    assert doc["meta"]["device_type"] in ("cpu", "cuda") and doc["meta"]["ceilings"]
    (res,) = doc["problems"]
    assert res["scale"] == 0.5 and res["problem"]["spatial_shape"] == [7, 7]
    assert res["problem"]["dilation"] == [1, 1]  # 7 x 2 > 7: dilation shrinks to 7 // 7
    rows = {r["impl"]: r for r in res["rows"]}
    assert {"nattn:reference", "sdpa-dense-mask", "flex-attention"} <= set(rows)
    auto = [r for r in rows.values() if r.get("auto")]
    assert len(auto) == 1 and auto[0]["impl"] == f"nattn:{res['auto_backend']}"
    assert auto[0]["fwd_nattn_speedup"] == pytest.approx(1.0)
    sdpa = rows["sdpa-dense-mask"]
    assert sdpa["status"] == "ok" and sdpa["fwd_s"] > 0 and sdpa["fwd_bwd_s"] > 0
    assert sdpa["setup_s"] is not None
    assert sdpa["fwd_nattn_speedup"] == pytest.approx(sdpa["fwd_s"] / auto[0]["fwd_s"])
    # SDPA is held to the bounds on any implementation; nattn's CPU kernel also to its own
    assert sdpa["fwd_frac_bound"] == pytest.approx(
        res["bounds"]["bound_any_fwd_s"] / sdpa["fwd_s"])
    if doc["meta"]["device_type"] == "cpu":
        cpu = rows["nattn:cpu"]
        assert cpu["fwd_frac_bound"] == pytest.approx(res["bounds"]["bound_fwd_s"] / cpu["fwd_s"])
        assert res["bounds"]["bound_fwd_s"] >= res["bounds"]["bound_any_fwd_s"]
    assert sdpa["fwd_flops"] == res["flops"]["fwd"]
    matmul = doc["meta"]["ceilings"][res["dtype"]]["matmul_flops"]
    assert sdpa["fwd_bwd_frac_matmul"] == pytest.approx(sdpa["fwd_bwd_rate"] / matmul)
    assert f"| {100 * sdpa['fwd_frac_matmul']:.1f} |" in md.read_text()
    flex = rows["flex-attention"]
    if flex["status"] == "ok":
        assert flex["fwd_s"] > 0 and flex["setup_s"] is not None
        if doc["meta"]["device_type"] == "cpu":
            assert "no backward on CPU" in flex["fwd_bwd_reason"]
    else:
        assert flex["reason"]  # a skipped flex row says why
    assert "| problem | scale |" in md.read_text() and "sdpa-dense-mask" in md.read_text()

    # compared with its own results: the comparison table is printed (timings of a loaded
    # 2-core machine vary too much to assert that nothing regresses)
    rc = main(["bench", "--problems", "dinat-t-stage3", "--scale", "0.5", "--warmup", "0",
               "--repeats", "1", "--skip", "flex", "reference", "sdpa",
               "--compare", str(out)])
    text = capsys.readouterr().out
    assert "compared timings" in text
    # a baseline 100x faster than anything measurable: every compared timing regresses
    for r in res["rows"]:
        for key in ("fwd_s", "fwd_bwd_s"):
            if r.get(key):
                r[key] /= 100
    fast = tmp_path / "fast.json"
    fast.write_text(json.dumps(doc))
    rc = main(["bench", "--problems", "dinat-t-stage3", "--scale", "0.5", "--warmup", "0",
               "--repeats", "1", "--skip", "flex", "reference", "sdpa", "--compare", str(fast)])
    text = capsys.readouterr().out
    assert rc == 1 and "REGRESSION" in text


def test_bench_skips_dense_baselines_with_a_reason(tmp_path, monkeypatch):
    from nattn.cli import common

    monkeypatch.setitem(common.DENSE_BYTES_LIMIT, "cpu", 1000)
    monkeypatch.setitem(common.DENSE_BYTES_LIMIT, "cuda", 1000)
    out = tmp_path / "b.json"
    main(["bench", "--problems", "cpu-3d-16", "--scale", "0.5", "--warmup", "0", "--repeats",
          "1", "--skip", "flex", "--json", str(out)])
    rows = {r["impl"]: r for r in json.loads(out.read_text())["problems"][0]["rows"]}
    assert rows["nattn:reference"]["status"] == "skipped"
    assert "GiB limit" in rows["nattn:reference"]["reason"]
    # SDPA holds only the mask when PyTorch runs its fused kernel, so the limit on scores does
    # not apply to it; on its math path it materializes the scores like the reference.
    sdpa = rows["sdpa-dense-mask"]
    if common._sdpa_backend(torch.device("cpu"), torch.float32, False) == "FLASH_ATTENTION":
        assert sdpa["status"] == "ok" and "SDPA kernel: flash_attention" in sdpa["notes"]
    monkeypatch.setattr(common, "_sdpa_backend", lambda *args: "MATH")
    main(["bench", "--problems", "cpu-3d-16", "--scale", "0.5", "--warmup", "0", "--repeats",
          "1", "--skip", "flex", "reference", "--json", str(out)])
    rows = {r["impl"]: r for r in json.loads(out.read_text())["problems"][0]["rows"]}
    assert rows["sdpa-dense-mask"]["status"] == "skipped"
    assert "GiB limit" in rows["sdpa-dense-mask"]["reason"]


def test_plots_from_results(tmp_path):
    from nattn.cli import plots

    def point(name, window, speedup):
        return {"name": name, "scale": 1.0, "dtype": "float32",
                "problem": {"spatial_shape": [8, 8], "kernel_size": [window, window],
                            "heads": 4, "head_dim": 32},
                "rows": [{"impl": "nattn:cpu", "auto": True, "fwd_frac_bound": 0.5,
                          "fwd_nattn_speedup": 1.0, "fwd_s": 1e-3, "fwd_bwd_s": 3e-3,
                          "fwd_bwd_frac_bound": 0.4, "fwd_bwd_nattn_speedup": 1.0},
                         {"impl": "sdpa-dense-mask", "fwd_frac_bound": 0.2,
                          "fwd_nattn_speedup": speedup, "fwd_s": 2e-3, "fwd_bwd_s": 6e-3,
                          "fwd_bwd_frac_bound": 0.1, "fwd_bwd_nattn_speedup": speedup},
                         {"impl": "flex-attention", "fwd_frac_bound": 0.1, "fwd_s": 4e-3,
                          "fwd_nattn_speedup": 2 * speedup},  # no backward: marked x
                         {"impl": "nattn:reference", "status": "skipped"}]}

    doc = {"meta": {"device": "test", "torch": "x", "commit": "c0ffee1", "date": "d",
                    "threads": 2},
           "problems": [point("a", 3, 2.0), point("b", 5, 3.0)],
           "sweep": [point("s3", 3, 2.0), point("s5", 5, 1.5)]}
    paths = plots.write_all(doc, str(tmp_path / "plots"))
    assert [Path(p).name for p in paths] == ["bounds.png", "speedup_vs_window.png"]
    for p in paths:
        assert Path(p).read_bytes()[:4] == b"\x89PNG"
    assert plots._passes(doc["problems"]) == [("fwd", "forward"),
                                              ("fwd_bwd", "forward + backward")]
    caption = plots._caption(doc["meta"], doc["problems"])
    assert "float32" in caption and "2 threads" in caption and "c0ffee1" in caption
    assert "H4 D32" in plots._problem_label(doc["problems"][0])


def test_module_entry_point_runs():
    # The package under test (installed, or python/ with a dev build), not necessarily ROOT's.
    import nattn

    env = {**os.environ, "PYTHONPATH": str(Path(nattn.__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "nattn", "sol", "-i", "32", "-w", "8", "-s",
                           "4", "--no-measure"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "needed / computed" in proc.stdout


def test_scaling_pair_is_measured_interleaved(monkeypatch):
    from dataclasses import replace

    from nattn import problems
    from nattn.cli import bench

    small = replace(problems.scale(problems.get("cpu-2d-64"), 0.125), name="tiny-a")
    large = replace(problems.scale(problems.get("cpu-2d-64"), 0.25), name="tiny-b")
    monkeypatch.setattr(bench, "SCALING_PAIRS", [("tiny-a", "tiny-b", 4)])
    results = [{"name": p.name, "scale": 1, "_problem": p} for p in (small, large)]
    (sc,) = bench._scaling(results, torch.device("cpu"), warmup=1, repeats=3)
    assert (sc["small"], sc["large"], sc["token_ratio"]) == ("tiny-a", "tiny-b", 4)
    assert sc["small_s"] > 0 and sc["large_s"] > 0
    assert sc["time_ratio"] == pytest.approx(sc["large_s"] / sc["small_s"])
    # NATTEN's ratio comes from the same rounds when it is installed, else it is named absent.
    if sc["natten_ratio"] is None:
        assert sc["natten_note"] and sc["natten_small_s"] is None
    else:
        assert sc["natten_ratio"] == pytest.approx(sc["natten_large_s"] / sc["natten_small_s"])
    # A scaled-down pair (scale != 1) is not the named pair: nothing is measured.
    results[0]["scale"] = 0.5
    assert bench._scaling(results, torch.device("cpu"), warmup=1, repeats=3) == []
