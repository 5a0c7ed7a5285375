"""Where the CPU kernels' parallel regions run (csrc/cpu/threads.h).

With torch's OpenMP runtime loaded, the regions run on that runtime's team (found through the
dynamic loader, not linked); nattn's own pool is the fallback. Both must give the same bits for
any thread count, follow torch.set_num_threads, and report a bad mode clearly.
"""

import threading

import pytest
import torch

import nattn
from nattn import _C, _native


@pytest.fixture(autouse=True)
def _restore():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    _C.cpu_threading("auto")


def _torch_uses_openmp() -> bool:
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def test_auto_uses_the_loaded_openmp_runtime():
    if not _torch_uses_openmp():
        pytest.skip("this torch build has no OpenMP parallel backend")
    runtime = _C.cpu_threading("auto")
    assert runtime.startswith("openmp:"), runtime
    # It is the runtime this process has mapped, not one of nattn's own.
    path = runtime.split(":", 1)[1]
    with open("/proc/self/maps") as maps:
        assert any(line.rstrip().endswith(path) for line in maps)
    assert _C.cpu_threading("pool") == "pool"
    assert _C.cpu_threading("") == "pool"  # '' reports without changing


def test_bad_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="'auto', 'openmp' or 'pool', got 'omp'"):
        _C.cpu_threading("omp")


def _forward_backward(q, k, v, g):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = nattn.na2d(q, k, v, kernel_size=(5, 3), dilation=(1, 2), stride=(2, 1),
                          return_lse=True)
    out.backward(g)
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_runtimes_and_thread_counts_agree_bitwise(monkeypatch, dtype):
    monkeypatch.setattr(_native, "exact_threads", True)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 13, 11, 4, 16, dtype=dtype, generator=gen)
    k = torch.randn(2, 13, 11, 2, 16, dtype=dtype, generator=gen)
    v = torch.randn(2, 13, 11, 2, 16, dtype=dtype, generator=gen)
    g = torch.randn(2, 13, 11, 4, 16, dtype=dtype, generator=gen)
    results = []
    for mode in ("pool", "auto"):
        _C.cpu_threading(mode)
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            results.append(_forward_backward(q, k, v, g))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_calls_from_several_host_threads(monkeypatch):
    """Host threads each enter their own region (their own OpenMP team, or the pool in turns)."""
    monkeypatch.setattr(_native, "exact_threads", True)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 17, 9, 2, 8, generator=gen) for _ in range(3))
    expected = nattn.na2d(q, k, v, kernel_size=5)
    for mode in ("auto", "pool"):
        _C.cpu_threading(mode)
        outs, errors = [None] * 4, []

        def call(i):
            try:
                outs[i] = nattn.na2d(q, k, v, kernel_size=5)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        workers = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)
        assert not errors and all(not w.is_alive() for w in workers)
        assert all(torch.equal(o, expected) for o in outs)
