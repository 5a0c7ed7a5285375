"""nattn.distributed: the halo plan as a pure function (exhaustively, no processes), and spawned
gloo worlds of 2, 3 and 4 processes where both strategies must equal single-process
nattn.neighborhood_attention in fp64 (out, lse, every gradient) to 1e-10, the bytes counted in
the exchange code must equal the closed form, and bad calls must raise the same error on every
rank within a timeout.

Spawning a world costs seconds (each process imports torch), so each world runs many
configurations."""

from __future__ import annotations

import json
import os
import random
import time
import warnings
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from nattn import _C
from nattn.distributed import _plan

TOL = 1e-10  # fp64 against fp64 (docs/development.md)
WORLD_TIMEOUT_S = 240  # generous: CI's 2 cores are shared; a hang shows up as a failure


# --------------------------------------------------------------------------- pure plan tests

def _random_split(rng, length, parts):
    cuts = sorted(rng.sample(range(1, length), parts - 1))
    return [b - a for a, b in zip([0] + cuts, cuts + [length])]


def _axis_configs(max_length):
    for length in range(1, max_length + 1):
        for k in range(1, length + 1):
            for d in range(1, length // k + 1):
                for s in range(1, k + 1):
                    for causal in (False, True):
                        yield length, k, s, d, causal


def _check_plan_exact(lengths, k, s, d, causal):
    plan = _plan.halo_plan(lengths, k, s, d, causal)
    length = sum(lengths)
    glob = _C.axis_windows(length, k, s, d, causal)
    for sl in plan.slabs:
        (o0, o1), (lo, hi), (a, b) = sl.own, sl.needed, sl.slab
        assert a <= lo <= o0 < o1 <= hi <= b
        assert a % (d * s) == 0 and (b == length or b % (d * s) == 0)
        assert b - a >= k * d
        for i in range(o0, o1):
            kf, kc = glob[i][:2]
            assert lo <= kf and kf + d * (kc - 1) < hi
        # the pieces (one slab, or edge / interior / edge) cover the own queries in order, and
        # each gives its queries their global windows; an interior piece reads own rows only
        assert sl.pieces[0].queries[0] == o0 and sl.pieces[-1].queries[1] == o1
        assert all(p.queries[1] == n.queries[0] for p, n in zip(sl.pieces, sl.pieces[1:]))
        for piece in sl.pieces:
            (p0, p1), (pa, pb) = piece.queries, piece.slab
            assert a <= pa <= p0 < p1 <= pb <= b
            assert pa % (d * s) == 0 and (pb == length or pb % (d * s) == 0)
            assert pb - pa >= k * d
            if piece.interior:
                assert o0 <= pa and pb <= o1
            local = _C.axis_windows(pb - pa, k, s, d, causal)
            for i in range(p0, p1):
                got = (local[i - pa][0] + pa, local[i - pa][1])
                assert got == tuple(glob[i][:2]), (lengths, k, s, d, causal, i, piece)
        # the received rows are exactly the needed rows this rank does not own, each once
        got = sorted((t.begin, t.end) for t in plan.transfers if t.dst == sl.rank)
        rows = [r for t0, t1 in got for r in range(t0, t1)]
        assert rows == [r for r in range(lo, hi) if not o0 <= r < o1]
        if d == 1:  # the hull is tight: every received row is some own query's key
            attended = {kf + j for i in range(o0, o1) for kf, kc in [glob[i][:2]]
                        for j in range(kc)}
            assert set(range(lo, hi)) <= attended


def test_halo_plan_gives_every_own_query_its_global_window():
    """Every valid axis up to length 20, split over 2-4 ranks at random (even and uneven): the
    local window math on the extended slab equals the global one for every own query."""
    rng = random.Random(0)
    checked = 0
    for length, k, s, d, causal in _axis_configs(20):
        for parts in (2, 3, 4):
            if parts > length:
                continue
            _check_plan_exact(_random_split(rng, length, parts), k, s, d, causal)
            checked += 1
    assert checked > 5000


def test_long_slabs_with_small_windows_overlap_the_halo():
    """Interior pieces exist where the windows are small against the slab, and are exact (the
    sweep above covers them too); large windows keep one slab."""
    rng = random.Random(1)
    overlapped = 0
    for k, s, d, causal in [(3, 1, 1, False), (4, 2, 1, False), (3, 1, 2, True), (5, 5, 1, False),
                            (2, 1, 3, False), (7, 3, 1, True)]:
        for parts in (2, 3, 4):
            lengths = _random_split(rng, 120, parts)
            _check_plan_exact(lengths, k, s, d, causal)
            plan = _plan.halo_plan(lengths, k, s, d, causal)
            overlapped += sum(sl.overlapped for sl in plan.slabs)
    assert overlapped >= 30
    assert not any(sl.overlapped for sl in _plan.halo_plan([8, 8, 7, 7], 18, 16, 1, False).slabs)


@pytest.mark.parametrize("lengths,k,s,d,causal", [
    ([8, 8, 7, 7], 18, 16, 1, False),   # hunyuan-video frames over 4 ranks
    ([2] * 14 + [1] * 2, 18, 16, 1, False),
    ([1] * 24, 24, 1, 1, False),        # cosmos frames over 24 ranks: windows span many slabs
    ([5, 5, 5], 5, 2, 3, True),
    ([1, 1, 10], 4, 4, 3, False),
])
def test_halo_plan_examples(lengths, k, s, d, causal):
    _check_plan_exact(lengths, k, s, d, causal)


def test_causal_axis_needs_left_halo_only():
    plan = _plan.halo_plan([6, 6, 6], 5, 1, 1, True)
    assert all(t.begin < plan.slabs[t.dst].own[0] for t in plan.transfers)
    assert plan.slabs[1].needed == (2, 12)


def test_closed_form_of_a_known_case():
    """1-D, L = 12 over [4, 4, 4], K = 3: each inner border moves one row each way."""
    lay = _plan.Layout(lengths=(4, 4, 4), axis=0, spatial_shape=(12,), batch=1, heads=3,
                       kv_heads=3, head_dim=2, value_dim=2, num_additional=0, kernel_size=(3,),
                       stride=(1,), dilation=(1,), is_causal=(False,), element_size=8)
    p = _plan.make_plan(lay)
    halo = p.costs["halo"]
    row = 3 * (2 + 2) * 8  # kv heads x (D + Dv) x fp64
    assert halo.forward_received == [row, 2 * row, row]
    assert halo.forward_sent == [row, 2 * row, row]
    uly = p.costs["ulysses"]
    # q, k, v: my 4 rows of 2 other head chunks out, 8 rows of my chunk in; out comes back
    assert uly.forward_sent[0] == 2 * 4 * (3 * 2 * 8) + 8 * (2 * 8)
    assert p.strategy == "halo"
    assert "auto chose halo" in p.explain()


def test_ulysses_infeasible_is_explained():
    lay = _plan.Layout(lengths=(4, 4, 4), axis=0, spatial_shape=(12,), batch=1, heads=4,
                       kv_heads=2, head_dim=2, value_dim=2, num_additional=0, kernel_size=(3,),
                       stride=(1,), dilation=(1,), is_causal=(False,), element_size=8)
    assert _plan.make_plan(lay).strategy == "halo"
    with pytest.raises(ValueError, match=r"heads \(4\) and kv heads \(2\) divisible by .* 3"):
        _plan.make_plan(lay, "ulysses")


# --------------------------------------------------------------------------- spawned worlds

def _random_config(rng, world, index):
    rank = rng.choice((1, 2, 3))
    axis = (0, rank - 1)[index % 2] if rank > 1 else 0  # first and last axis alternately
    spatial, ks, st, dl, causal = [], [], [], [], []
    long_axis = rng.random() < 0.35  # small windows on long slabs: the overlapped halo path
    for a in range(rank):
        length = rng.randint(max(world, 3), 16 if a == axis else (24 if rank == 1 else 6))
        if long_axis and a == axis:
            length = rng.randint(10 * world, 14 * world)
        k = rng.randint(1, min(length, 3 if long_axis and a == axis else 7))
        d = rng.randint(1, max(1, min(3, length // k)))
        s = rng.randint(1, k)
        spatial.append(length)
        ks.append(k)
        dl.append(d)
        st.append(s)
        causal.append(rng.random() < 0.3)
    length = spatial[axis]
    lengths = ([length // world + (r < length % world) for r in range(world)]
               if rng.random() < 0.4 else _random_split(rng, length, world))
    kv_heads = world * rng.choice((1, 1, 2)) if rng.random() < 0.8 else world
    heads = kv_heads * rng.choice((1, 2))  # GQA half the time
    return dict(spatial=spatial, axis=axis, lengths=lengths, kernel_size=ks, stride=st,
                dilation=dl, is_causal=causal, batch=rng.choice((1, 2)), heads=heads,
                kv_heads=kv_heads, head_dim=rng.choice((4, 8)), value_dim=rng.choice((4, 6)),
                additional=rng.choice((0, 0, 3)), seed=rng.randrange(1 << 30),
                backend="reference" if index % 4 == 3 else "cpu")  # the local operator's


def _global_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    b, sp = c["batch"], c["spatial"]

    def rnd(*shape, dtype=torch.float64):
        return torch.randn(*shape, generator=g, dtype=dtype)

    q = rnd(b, *sp, c["heads"], c["head_dim"])
    k = rnd(b, *sp, c["kv_heads"], c["head_dim"])
    v = rnd(b, *sp, c["kv_heads"], c["value_dim"])
    m = c["additional"]
    ak = rnd(b, m, c["kv_heads"], c["head_dim"]) if m else None
    av = rnd(b, m, c["kv_heads"], c["value_dim"]) if m else None
    g_out = rnd(b, *sp, c["heads"], c["value_dim"])
    g_lse = rnd(b, *sp, c["heads"], dtype=torch.float32)
    return (q, k, v, ak, av), (g_out, g_lse)


def _window_kwargs(c):
    return dict(kernel_size=tuple(c["kernel_size"]), stride=tuple(c["stride"]),
                dilation=tuple(c["dilation"]), is_causal=tuple(c["is_causal"]))


def _out_lse_grads(fn, inputs, grads, **kw):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    q, k, v, ak, av = leaves
    out, lse = fn(q, k, v, additional_keys=ak, additional_values=av, return_lse=True, **kw)
    ((out * grads[0]).sum() + (lse * grads[1]).sum()).backward()
    return [out.detach(), lse.detach()] + [t.grad for t in leaves if t is not None]


def _check_config(c, rank, world, nd, nattn):
    """One configuration on this rank: both strategies (and auto) against the global call."""
    inputs, grads = _global_inputs(c)
    kw = _window_kwargs(c)
    want = _out_lse_grads(nattn.neighborhood_attention, inputs, grads, backend="cpu", **kw)
    dim = c["axis"] + 1
    start, n = sum(c["lengths"][:rank]), c["lengths"][rank]

    def mine(t):
        return t.narrow(dim, start, n)

    local_in = [mine(t) for t in inputs[:3]] + list(inputs[3:])
    local_grads = [mine(t) for t in grads]
    want_local = [mine(t) for t in want[:5]] + want[5:]
    report = {}
    for strategy in ("halo", "ulysses", "auto"):
        with nd.count_bytes() as counted:
            got = _out_lse_grads(nd.neighborhood_attention, local_in, local_grads,
                                 backend=c["backend"], axis=c["axis"], strategy=strategy, **kw)
        names = ["out", "lse", "dq", "dk", "dv", "dak", "dav"]
        for name, g_, w_ in zip(names, got, want_local):
            err = (g_.double() - w_.double()).abs().max().item()
            assert err <= TOL, f"{strategy} {name}: max error {err:.3e} in {c}"
        leaves = [t.detach().clone().requires_grad_() if t is not None else None
                  for t in local_in]
        plan = nd.plan(*leaves[:3], additional_keys=leaves[3], additional_values=leaves[4],
                       return_lse=True, axis=c["axis"], strategy=strategy, **kw)
        cost = plan.costs[plan.strategy]
        counted_now = (counted.sent["forward"], counted.received["forward"],
                       counted.sent["backward"], counted.received["backward"])
        closed = (cost.forward_sent[rank], cost.forward_received[rank],
                  cost.backward_sent[rank], cost.backward_received[rank])
        assert counted_now == closed, f"{strategy}: counted {counted_now} != closed {closed}"
        report[strategy] = plan.strategy
    return report


def _error_cases(world):
    """(name, per-rank change, expected exception, pattern): the change is applied on rank 1."""
    return [
        ("head_dim differs", "head_dim", ValueError, r"rank 1: query.shape=.* differs from rank"),
        ("empty slab", "empty", ValueError, r"rank 1: .*slab along the sharded axis 0 is empty"),
        ("no such axis", "axis", ValueError, r"axis=2 must be a spatial axis"),
        ("dtype differs", "dtype", ValueError, r"rank 1: query.dtype=torch.float32 differs"),
        ("kernel differs", "kernel", ValueError, r"rank 1: kernel_size=5 differs from rank 0's"),
        ("ulysses heads", "ulysses", ValueError,
         rf"ulysses needs heads \(2\) and kv heads \(2\) divisible by the group size {world}"),
        ("global window rule", "window", ValueError,
         r"global layout .*kernel_size \* dilation = 40 on axis 0 must be <= its length"),
        ("additional on one rank", "additional", ValueError,
         r"rank 1: additional_keys is given here but not on rank 0"),
        ("not a tensor", "type", TypeError, r"rank 1: key must be a torch.Tensor, got list"),
        ("grad on one rank", "grad", ValueError,
         r"rank 1: query requires grad here but does not on rank 0"),
    ]


def _run_error_case(change, rank, nd):
    n = 4
    q = torch.randn(1, n, 5, 2, 4, dtype=torch.float64)
    k, v = torch.randn_like(q), torch.randn_like(q)
    kw = dict(kernel_size=3, axis=0)
    me = rank == 1
    if change == "head_dim" and me:
        q = torch.randn(1, n, 5, 2, 8, dtype=torch.float64)
    if change == "empty" and me:
        q, k, v = q[:, :0], k[:, :0], v[:, :0]
    if change == "axis":
        kw["axis"] = 2
    if change == "dtype" and me:
        q, k, v = q.float(), k.float(), v.float()
    if change == "kernel" and me:
        kw["kernel_size"] = 5
    if change == "ulysses":
        kw["strategy"] = "ulysses"
    if change == "window":
        kw["kernel_size"] = 40
    if change == "additional" and me:
        kw["additional_keys"] = torch.randn(1, 2, 2, 4, dtype=torch.float64)
        kw["additional_values"] = torch.randn(1, 2, 2, 4, dtype=torch.float64)
    if change == "type" and me:
        k = [1.0]
    if change == "grad" and me:
        q.requires_grad_()
    nd.neighborhood_attention(q, k, v, **kw)


def _module_check(rank, world, nd, nattn):
    """The nn.Module form: same output rows as the single-process module, and the parameter
    gradients summed over the ranks equal the single-process ones."""
    import torch.distributed as dist

    torch.manual_seed(7)
    kw = dict(kernel_size=(3, 5), stride=(2, 1), dilation=(1, 2), is_causal=(True, False))
    ref = nattn.NeighborhoodAttention(24, 2 * world, rank=2, num_kv_heads=world, **kw).double()
    mod = nd.NeighborhoodAttention(24, 2 * world, rank=2, num_kv_heads=world, axis=1,
                                   strategy="halo", **kw).double()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 4 * world + 1, 24, dtype=torch.float64)
    lengths = [x.shape[2] // world + (r < x.shape[2] % world) for r in range(world)]
    start = sum(lengths[:rank])
    ref(x).pow(2).sum().backward()
    out = mod(x.narrow(2, start, lengths[rank]))
    out.pow(2).sum().backward()
    err = (out - ref(x).narrow(2, start, lengths[rank])).abs().max().item()
    assert err <= TOL, f"module out error {err}"
    for (name, p), q in zip(mod.named_parameters(), ref.parameters()):
        g = p.grad.clone()
        dist.all_reduce(g)
        assert (g - q.grad).abs().max().item() <= TOL, f"module grad {name}"


def _lse_only_check(rank, world, nd, nattn):
    """A causal axis where rank 0's queries are all interior (it only sends halo rows) and the
    loss reads lse alone: rank 0 must still receive its rows' key gradients."""
    kw = dict(kernel_size=3, is_causal=True)
    lengths = [12] * world
    plan = nd.halo_plan(lengths, 3, 1, 1, True)
    assert all(p.interior for p in plan.slabs[0].pieces) and plan.sent_rows(0) > 0
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, sum(lengths), world, 4, generator=g, dtype=torch.float64)
               for _ in range(3))
    grads = []
    for fn, sl in ((nattn.neighborhood_attention, slice(None)),
                   (nd.neighborhood_attention, slice(12 * rank, 12 * rank + 12))):
        leaves = [t[:, sl].clone().requires_grad_() for t in (q, k, v)]
        extra = {} if fn is nattn.neighborhood_attention else {"strategy": "halo"}
        _, lse = fn(*leaves, return_lse=True, **kw, **extra)
        lse.square().sum().backward()
        grads.append([t.grad for t in leaves])
    for name, want, got in zip("qkv", grads[0], grads[1]):
        err = (want[:, 12 * rank:12 * rank + 12] - got).abs().max().item()
        assert err <= TOL, f"lse-only loss: d{name} error {err}"


def _worker(rank, world, init_file, configs, out_dir, do_errors):
    import torch.distributed as dist

    torch.set_num_threads(1)  # world processes share the machine's cores
    result = {"configs": 0, "errors": {}, "strategies": [], "failure": None}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world)
        import nattn
        import nattn.distributed as nd

        for c in configs:
            result["strategies"].append(_check_config(c, rank, world, nd, nattn))
            result["configs"] += 1
        if do_errors:
            for name, change, exc_type, pattern in _error_cases(world):
                try:
                    _run_error_case(change, rank, nd)
                    result["errors"][name] = "no error"
                except Exception as exc:  # noqa: BLE001 - recorded and checked by the parent
                    result["errors"][name] = [type(exc).__name__, str(exc)]
            _module_check(rank, world, nd, nattn)
            _lse_only_check(rank, world, nd, nattn)
            result["module"] = "ok"
        dist.barrier()
    except BaseException:  # noqa: BLE001 - the parent reports it
        result["failure"] = traceback.format_exc()
    # The result is written before the process group is torn down: gloo's teardown can abort a
    # process (std::terminate in its worker threads, pytorch/pytorch#190489) after every check
    # has run; the parent then still has the complete result and says what happened.
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        import gc

        gc.collect()  # drop finished Work objects before gloo's threads stop
        dist.destroy_process_group()


def _spawn_world(tmp_path, world, configs, do_errors):
    ctx = mp.start_processes(_worker, args=(world, str(tmp_path / "init"), configs,
                                            str(tmp_path), do_errors),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + WORLD_TIMEOUT_S
    teardown = None
    while True:
        try:
            if ctx.join(timeout=5):
                break
        except mp.ProcessExitedException as exc:
            # A rank that died after writing its complete result died in gloo's teardown
            # (pytorch/pytorch#190489), not in nattn; one that died earlier fails below.
            done = [(tmp_path / f"rank{r}.json").exists() for r in range(world)]
            if not all(done):
                raise
            teardown = str(exc)
            for p in ctx.processes:
                p.join(timeout=30)
            break
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"world of {world} did not finish within {WORLD_TIMEOUT_S} s (a hang?)")
    if teardown:
        warnings.warn(f"world of {world}: {teardown} during process-group teardown, after "
                      "every rank had written its complete result")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for r, res in enumerate(results):
        assert res["failure"] is None, f"rank {r} of {world}:\n{res['failure']}"
        assert res["configs"] == len(configs)
    return results


CONFIGS_PER_WORLD = {2: 20, 3: 16, 4: 16}  # 52 random configurations in all


@pytest.mark.parametrize("world", [2, 3, 4])
def test_spawned_world_is_exact_and_counts_bytes(tmp_path, world):
    rng = random.Random(1000 + world)
    configs = [_random_config(rng, world, i) for i in range(CONFIGS_PER_WORLD[world])]
    do_errors = world == 3
    overlapped = sum(
        sl.overlapped for c in configs
        for sl in _plan.halo_plan(c["lengths"], c["kernel_size"][c["axis"]],
                                  c["stride"][c["axis"]], c["dilation"][c["axis"]],
                                  c["is_causal"][c["axis"]]).slabs)
    assert overlapped >= world, "the overlapped halo path must run in every world"
    results = _spawn_world(tmp_path, world, configs, do_errors)
    # every rank made the same automatic choice
    assert all(res["strategies"] == results[0]["strategies"] for res in results)
    if do_errors:
        for name, change, exc_type, pattern in _error_cases(world):
            got = [res["errors"][name] for res in results]
            for r, g in enumerate(got):
                assert g != "no error", f"{name}: rank {r} raised nothing"
                assert g[0] == exc_type.__name__, f"{name}: rank {r} raised {g}"
                assert __import__("re").search(pattern, g[1]), f"{name}: rank {r}: {g[1]}"
            assert all(g == got[0] for g in got), f"{name}: ranks disagree: {got}"
        assert all(res.get("module") == "ok" for res in results)
