"""The benchmark's peers (nattn/cli/peers.py): FlexAttention's mask forms agree with the window
header, the fastest form is the one reported, NATTEN reports "absent" when it is missing, and
the timing is interleaved."""

import itertools
import random
import sys
import time

import pytest
import torch

from nattn import _C
from nattn.cli import common, peers
from nattn.problems import NamedProblem


def _problem(shape, k, s, d, c, m=0):
    return NamedProblem(name="t", batch=1, spatial_shape=shape, heads=2, kv_heads=1,
                        head_dim=8, value_dim=8, kernel_size=k, stride=s, dilation=d,
                        is_causal=c, num_additional=m, dtype=torch.float32,
                        source="test")


def _header_mask(p):
    """[N, N + M] from include/nattn/window.h (nattn._C.axis_windows), not from reference.py
    that the forms use."""
    per_axis = []
    for a, length in enumerate(p.spatial_shape):
        t = torch.zeros(length, length, dtype=torch.bool)
        for i, (first, count, _, _) in enumerate(_C.axis_windows(
                length, p.kernel_size[a], p.stride[a], p.dilation[a], bool(p.is_causal[a]))):
            t[i, first:first + p.dilation[a] * (count - 1) + 1:p.dilation[a]] = True
        per_axis.append(t)
    coords = list(itertools.product(*(range(n) for n in p.spatial_shape)))
    mask = torch.zeros(len(coords), len(coords) + p.num_additional, dtype=torch.bool)
    mask[:, len(coords):] = True
    for qi, qc in enumerate(coords):
        for ki, kc in enumerate(coords):
            mask[qi, ki] = all(per_axis[a][qc[a], kc[a]] for a in range(len(qc)))
    return mask


def _random_problem(rng):
    rank = rng.choice([1, 2, 3])
    shape, k, s, d, c = [], [], [], [], []
    for _ in range(rank):
        n = rng.randint(3, {1: 30, 2: 9, 3: 5}[rank])
        dil = rng.randint(1, max(1, n // 3)) if rng.random() < 0.4 else 1
        ks = rng.randint(1, n // dil)
        shape.append(n), k.append(ks), d.append(dil)
        s.append(rng.randint(1, ks) if rng.random() < 0.4 else 1)
        c.append(rng.random() < 0.3)
    return _problem(tuple(shape), tuple(k), tuple(s), tuple(d), tuple(c), rng.choice([0, 3]))


@pytest.mark.parametrize("seed", range(12))
def test_every_flex_mask_form_is_the_window(seed):
    p = _random_problem(random.Random(seed))
    expected = _header_mask(p)
    n = p.tokens
    q = torch.arange(n)[:, None]
    kv = torch.arange(n + p.num_additional)[None, :]
    forms = {
        "arith": common.neighborhood_mask_mod(p),
        "lookup": peers.lookup_mask_mod(p, torch.device("cpu")),
        "dense": peers.dense_mask_mod(common._mask(p, torch.device("cpu"))),
    }
    for form, mask_mod in forms.items():
        got = mask_mod(0, 0, q, kv).expand_as(expected)
        assert torch.equal(got, expected), (form, p)


def _row(name, kind, fwd=None, reason=""):
    r = {"impl": name, "kind": kind, "status": "ok" if fwd else "skipped", "reason": reason,
         "notes": []}
    if fwd:
        r["fwd_s"] = fwd
    return r


def test_best_form_is_the_fastest_and_names_it():
    rows = [_row("nattn:cpu", "nattn", 0.01), _row("flex:lookup", "flex", 0.03),
            _row("flex:dense", "flex", 0.02), _row("flex:arith", "flex", 0.09),
            _row("sdpa-dense-mask", "sdpa", 0.2)]
    out = peers.best_forms(rows)
    assert [r["impl"] for r in out] == ["nattn:cpu", "flex-attention", "sdpa-dense-mask"]
    flex = out[1]
    assert flex["form"] == "dense" and flex["fwd_s"] == 0.02
    assert set(flex["forms"]) == {"lookup", "dense", "arith"}
    assert flex["notes"][0].startswith("fastest mask form of: dense")
    assert peers.describe_form(flex) == "flex-attention (dense mask)"
    # all forms skipped: one row, still saying why
    out = peers.best_forms([_row("flex:arith", "flex", reason="no flex"),
                            _row("flex:dense", "flex", reason="too big")])
    assert len(out) == 1 and out[0]["reason"] == "no flex"


def test_natten_absent_is_not_a_failure(monkeypatch):
    monkeypatch.setitem(sys.modules, "natten", None)  # import natten -> ImportError
    p = _problem((6, 6), (3, 3), (1, 1), (1, 1), (False, False))
    inputs = common.make_inputs(p, torch.device("cpu"), torch.float32)
    impl = peers.natten_impl(p, inputs, torch.device("cpu"), torch.float32)
    (row,) = peers.measure_interleaved([impl], torch.device("cpu"), 1, 2, backward=True)
    assert row["status"] == "absent" and "nattn[peers]" in row["reason"]
    assert peers.natten_available() is None


def test_natten_runs_when_installed():
    if peers.natten_available() is None:
        pytest.skip("natten is not installed (optional peer)")
    p = _problem((9, 8), (3, 5), (1, 2), (2, 1), (False, True))
    inputs = common.make_inputs(p, torch.device("cpu"), torch.float32)
    impl = peers.natten_impl(p, inputs, torch.device("cpu"), torch.float32)
    import nattn

    assert not impl.skip, impl.skip
    expected = nattn.na2d(inputs.q, inputs.k, inputs.v, p.kernel_size, p.stride, p.dilation,
                          p.is_causal)
    torch.testing.assert_close(impl.forward(), expected, atol=1e-5, rtol=1e-5)


def test_timing_is_interleaved():
    calls = []

    def impl(name, fail_at=None):
        count = itertools.count()

        def fn():
            i = next(count)
            calls.append(name)
            if fail_at is not None and i == fail_at:
                raise RuntimeError("boom")

        return common.Impl(name=name, kind="x", forward=fn)

    rows = peers.measure_interleaved([impl("a"), impl("b", fail_at=2), impl("c")],
                                     torch.device("cpu"), warmup=1, repeats=3, backward=False)
    # warm-ups one after another, then rounds of a, b, c rotated by one each round, so that
    # each follows each of the others (b fails in its second timed call, the first of the second
    # round, and drops out of the third)
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a"]
    assert rows[0]["status"] == "ok" and len(rows[0]["fwd_times"]) == 3
    assert rows[1]["status"] == "error" and "boom" in rows[1]["reason"] and "fwd_s" not in rows[1]


def test_slow_implementation_is_timed_fewer_rounds(monkeypatch):
    """A peer whose first call takes longer than SLOW_CALL_S (NATTEN on CPU: ~50 s a call at
    128 x 128) takes part in SLOW_REPEATS rounds only, and its row says so."""
    monkeypatch.setattr(peers, "SLOW_CALL_S", 0.05)
    calls = []

    def impl(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)

        return common.Impl(name=name, kind="x", forward=fn)

    rows = peers.measure_interleaved([impl("fast", 0.0), impl("slow", 0.06)],
                                     torch.device("cpu"), warmup=2, repeats=4, backward=False)
    assert peers.SLOW_REPEATS == 2  # the rounds below: (fast, slow), (slow, fast), fast, fast
    assert calls == ["fast", "fast", "slow"] + ["fast", "slow", "slow", "fast"] + \
        ["fast"] * (4 - peers.SLOW_REPEATS)
    assert len(rows[0]["fwd_times"]) == 4 and len(rows[1]["fwd_times"]) == peers.SLOW_REPEATS
    assert any("timed 2 times" in n for n in rows[1]["notes"])


def test_inmodel_runs_both_environments(tmp_path):
    """The in-model benchmark's plumbing (no timing asserted): children in both environments,
    both threading modes, every sequence."""
    import json

    from nattn.__main__ import main

    out = tmp_path / "inmodel.json"
    assert main(["inmodel", "-i", "12", "12", "-w", "3", "-n", "2", "-d", "8", "--rounds", "1",
                 "--repeats", "1", "--threads", "2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["samples"]) == {"default", "passive"}
    keys = {r["sequence"] for r in doc["rows"]}
    assert keys == {"alone", "alone-fwd-bwd", "after-matmul", "after-linear", "nat-block-na",
                    "nat-block"}
    assert all(r["default_s"] and r["passive_s"] and r["pool_default_s"] for r in doc["rows"])
