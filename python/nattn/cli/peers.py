"""The peers a benchmark runs beside nattn, each in its best form, and the interleaved timing.

FlexAttention's speed on CPU depends on how its ``mask_mod`` is written far more than on the
mask itself: the benchmark builds the same mask three ways and reports the fastest as the
``flex-attention`` row, naming its form:

- ``arith``: the window rule evaluated arithmetically per (query, key) pair
  (``common.neighborhood_mask_mod``: divisions, modulos and clamps per axis);
- ``lookup``: per axis, a precomputed ``[L, L]`` boolean table of that axis's window
  (``reference.in_window``) and a ``[N]`` table of each token's coordinate, so a pair costs
  ``rank`` coordinate loads and ``rank`` table loads; memory ``sum(L_a^2) + rank * N``;
- ``dense``: one precomputed ``[N, N + M]`` boolean mask (SDPA's), looked up per pair; memory
  ``N * (N + M)`` bytes, so it is skipped past ``common.DENSE_BYTES_LIMIT``.

All three give the same block mask and outputs; the tests check that.

NATTEN (``pip install 'nattn[peers]'``, which pins ``natten==0.21.7``) runs through its public
``natten.na1d/na2d/na3d`` with its defaults. On CPU that is its Flex backend, unfused (NATTEN's
compiled Flex path requires a CUDA device), forward only: NATTEN has no CPU backward. When
NATTEN is not installed its row says "absent", which is not a failure.
"""

from __future__ import annotations

import time
import warnings
from typing import Dict, List, Optional, Sequence

import torch

from .. import perf, reference
from ..problems import NamedProblem
from . import common

FLEX_FORMS = ("lookup", "dense", "arith")

NATTEN_PIN = "natten==0.21.7"


# ---------------------------------------------------------------------------------------------
# FlexAttention mask forms


def lookup_mask_mod(problem: NamedProblem, device: torch.device):
    """``mask_mod`` from per-axis window tables: key ``kv`` is attended by query ``q`` iff, on
    every axis a, ``table[a][coord[a][q], coord[a][kv]]``; keys at flat index >= N (the
    additional tokens) are always attended."""
    shape, n = problem.spatial_shape, problem.tokens
    flat = torch.arange(n, device=device)
    coords = reference.unravel(flat, shape)
    tables = []
    for a, length in enumerate(shape):
        i = torch.arange(length, device=device)
        tables.append(reference.in_window(i[:, None], i[None, :], length, problem.kernel_size[a],
                                          problem.stride[a], problem.dilation[a],
                                          bool(problem.is_causal[a])))

    def mask_mod(b, h, q_idx, kv_idx):
        kv = torch.clamp(kv_idx, max=n - 1)
        inside = None
        for a in range(len(shape)):
            w = tables[a][coords[a][q_idx], coords[a][kv]]
            inside = w if inside is None else inside & w
        return (kv_idx >= n) | inside

    return mask_mod


def dense_mask_mod(mask: torch.Tensor):
    """``mask_mod`` that looks up a precomputed dense ``[N, N + M]`` boolean mask."""

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[q_idx, kv_idx]

    return mask_mod


def flex_impls(problem: NamedProblem, inputs: common.Inputs, device: torch.device,
               dtype: torch.dtype, forms: Sequence[str] = FLEX_FORMS) -> List[common.Impl]:
    """One FlexAttention ``Impl`` per mask form (named ``flex:<form>``); ``best_forms`` later
    keeps the fastest as the ``flex-attention`` row."""
    impls = []
    for form in forms:
        if form == "arith":
            impls.append(common.flex_impl(problem, inputs, device, dtype, "arith"))
        elif form == "lookup":
            impls.append(common.flex_impl(problem, inputs, device, dtype, "lookup",
                                          lookup_mask_mod(problem, device)))
        elif form == "dense":
            n, m = problem.tokens, problem.num_additional
            limit = common.DENSE_BYTES_LIMIT.get(device.type, common.DENSE_BYTES_LIMIT["cpu"])
            if n * (n + m) > limit:
                why = (f"the dense form's {n} x {n + m} boolean mask is "
                       f"{n * (n + m) / 2**30:.1f} GiB > {limit / 2**30:.0f} GiB limit")
                impls.append(common.Impl(name="flex:dense", kind="flex", skip=why))
                continue
            mask = common._mask(problem, device)
            impls.append(common.flex_impl(problem, inputs, device, dtype, "dense",
                                          dense_mask_mod(mask)))
        else:
            raise ValueError(f"flex form must be one of {FLEX_FORMS}, got {form!r}")
    return impls


# ---------------------------------------------------------------------------------------------
# NATTEN


def natten_impl(problem: NamedProblem, inputs: common.Inputs, device: torch.device,
                dtype: torch.dtype) -> common.Impl:
    """NATTEN's public ``na{rank}d`` with its defaults (``backend=None``: NATTEN chooses)."""
    impl = common.Impl(name="natten", kind="natten")
    try:
        import natten
    except ImportError:
        impl.skip = f"absent: NATTEN is not installed (pip install 'nattn[peers]' for {NATTEN_PIN})"
        impl.absent = True
        return impl
    except Exception as exc:  # noqa: BLE001 - a broken install is a row, not a crash
        impl.skip = f"NATTEN failed to import: {type(exc).__name__}: {str(exc)[:160]}"
        return impl
    version = getattr(natten, "__version__", "?")
    fn = getattr(natten, f"na{problem.rank}d", None)
    if fn is None:
        impl.skip = f"NATTEN {version} has no na{problem.rank}d"
        return impl

    def run(leaves):
        kwargs = {}
        if len(leaves) > 3:
            kwargs = {"additional_keys": leaves[3], "additional_values": leaves[4]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NATTEN/Flex warn on every unfused CPU call
            return fn(leaves[0], leaves[1], leaves[2], kernel_size=problem.kernel_size,
                      stride=problem.stride, dilation=problem.dilation,
                      is_causal=problem.is_causal, **kwargs)

    fixed = inputs.leaves(False)

    def forward():
        with torch.no_grad():
            return run(fixed)

    try:
        t0 = time.perf_counter()
        forward()
        common.synchronize(device)
        impl.notes.append(f"NATTEN {version}, first call {time.perf_counter() - t0:.1f} s")
    except Exception as exc:  # noqa: BLE001
        impl.skip = f"NATTEN {version} cannot run this problem on {device.type}: " \
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        return impl
    impl.forward = forward
    if device.type == "cpu":
        impl.notes.append("CPU: NATTEN's unfused Flex backend (its compiled Flex needs CUDA)")
        impl.bwd_skip = "NATTEN has no backward on CPU"
    else:
        impl.fwd_bwd, impl.backward_only = common._autograd_fns(run, inputs)
    return impl


# ---------------------------------------------------------------------------------------------
# Interleaved timing and the best form of each peer


# An implementation whose warm-up call takes longer than this (seconds; NATTEN's unfused CPU path
# takes ~50 s a call at 128 x 128) is timed in only the first SLOW_REPEATS rounds, so that one
# slow peer does not hold the whole run for tens of minutes; its row says so.
SLOW_CALL_S = 5.0
SLOW_REPEATS = 2


def repeats_for(first_call_s: float, repeats: int) -> int:
    """Timed calls for an implementation whose warm-up call took ``first_call_s``."""
    return min(repeats, SLOW_REPEATS) if first_call_s > SLOW_CALL_S else repeats


def measure_interleaved(impls: Sequence[common.Impl], device: torch.device, warmup: int,
                        repeats: int, backward: bool) -> List[Dict]:
    """Rows as ``common.measure`` makes them, timed round-robin: after each implementation's
    warm-up, repeat r times one call of every implementation in turn, so that all of them see
    the same machine (this VM's speed drifts by tens of percent within minutes). Medians. An
    implementation slower than SLOW_CALL_S a call takes part in SLOW_REPEATS rounds only.

    The order rotates by one implementation each round (round r starts at the r-th, modulo the
    count), so that every implementation follows each of the others equally often: a call's
    time depends on the one before it. On the 2-core CI VM, a call right after NATTEN's
    2-second CPU forward took 1.5-2.4x as long as the next one (nattn's 64 x 64 forward 15-19
    against 7-9 ms; FlexAttention's +3 ms, SDPA's +10 ms), and in a fixed order the first
    implementation always followed the last. Each timed call runs with Python's garbage
    collector paused (``perf.gc_paused``), as ``timeit`` times its calls."""
    rows = []
    for impl in impls:
        row = common.measure(impl, device, warmup=0, repeats=0, backward=False) \
            if impl.skip else {"impl": impl.name, "kind": impl.kind, "status": "ok",
                               "reason": "", "setup_s": impl.setup_s, "notes": list(impl.notes)}
        if getattr(impl, "absent", False):
            row["status"] = "absent"
        rows.append(row)
    cuda = device.type == "cuda"
    for key in ("fwd", "fwd_bwd") if backward else ("fwd",):
        live = []
        for impl, row in zip(impls, rows):
            if impl.skip:
                continue
            fn = impl.forward if key == "fwd" else impl.fwd_bwd
            skip = "" if key == "fwd" else impl.bwd_skip
            if skip or fn is None:
                row[f"{key}_reason"] = skip or "not available"
                continue
            try:
                t0 = time.perf_counter()
                fn()
                common.synchronize(device)
                first = time.perf_counter() - t0
                n_warm = max(warmup, 1) if first <= SLOW_CALL_S else 1
                for _ in range(n_warm - 1):
                    fn()
                common.synchronize(device)
                cap = repeats_for(first, repeats)
                if cap < repeats:
                    row["notes"].append(f"{key}: {first:.0f} s a call, so timed {cap} times "
                                        f"(not {repeats})")
                live.append((fn, row, cap))
                row[f"{key}_times"] = []
            except Exception as exc:  # noqa: BLE001
                _fail(row, key, exc)
        for rnd in range(repeats):
            shift = rnd % len(live) if live else 0
            for fn, row, cap in live[shift:] + live[:shift]:
                if row.get(f"{key}_failed") or rnd >= cap:
                    continue
                try:
                    common.synchronize(device)
                    with perf.gc_paused():
                        t0 = time.perf_counter()
                        fn()
                        common.synchronize(device)
                        row[f"{key}_times"].append(time.perf_counter() - t0)
                except Exception as exc:  # noqa: BLE001
                    _fail(row, key, exc)
        for _, row, _ in live:
            if row.get(f"{key}_times"):
                row[f"{key}_s"] = common.median(row[f"{key}_times"])
            row.pop(f"{key}_failed", None)
            if cuda and f"{key}_s" in row:
                row[f"{key}_peak_bytes"] = _peak_bytes(fn, device)
    return rows


def _peak_bytes(fn, device: torch.device) -> int:
    """Peak CUDA memory of one call above what was allocated before it."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _fail(row: Dict, key: str, exc: Exception) -> None:
    row[f"{key}_failed"] = True
    row[f"{key}_reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" \
        if str(exc) else type(exc).__name__
    row.pop(f"{key}_times", None)
    if key == "fwd":
        row["status"] = "error"
        row["reason"] = row["fwd_reason"]


def best_forms(rows: List[Dict], kind: str = "flex", name: str = "flex-attention") -> List[Dict]:
    """Replace the rows of one peer's forms (``kind``) by one row named ``name``: the form with
    the fastest forward, its ``form`` recorded, the other forms' medians in its notes and in
    ``forms``. Rows of other kinds pass through in order."""
    forms = [r for r in rows if r["kind"] == kind]
    if not forms:
        return rows
    timed = [r for r in forms if r.get("fwd_s") is not None]
    best = min(timed, key=lambda r: r["fwd_s"]) if timed else forms[0]
    merged = dict(best)
    merged["impl"] = name
    merged["form"] = best["impl"].split(":", 1)[-1]
    merged["forms"] = {r["impl"].split(":", 1)[-1]: {"fwd_s": r.get("fwd_s"),
                                                      "reason": r.get("reason", "")}
                       for r in forms}
    if timed:
        others = ", ".join(f"{r['impl'].split(':', 1)[-1]} {common.fmt_time(r['fwd_s'])}"
                           for r in sorted(timed, key=lambda r: r["fwd_s"]))
        merged["notes"] = [f"fastest mask form of: {others}"] + list(best.get("notes", []))
    out, placed = [], False
    for r in rows:
        if r["kind"] != kind:
            out.append(r)
        elif not placed:
            out.append(merged)
            placed = True
    return out


def describe_form(row: Dict) -> str:
    """'flex-attention (lookup mask)' for a merged row, the plain name otherwise."""
    return f"{row['impl']} ({row['form']} mask)" if row.get("form") else row["impl"]


def natten_available() -> Optional[str]:
    """NATTEN's version when it imports, else None."""
    try:
        import natten
    except Exception:  # noqa: BLE001
        return None
    return getattr(natten, "__version__", "?")
