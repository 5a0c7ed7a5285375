"""Every bound `sol` and `bench` print is a lower bound on time: the CPU forward kernel's
measured time is never below any of them, for the CPU suite (the slack is for timer noise and
for ceilings measured on a shared machine, not for a model error: the kernel bound counts the
work the kernels execute, and they run well below the matmul ceiling on it)."""

from dataclasses import replace

import pytest
import torch

from nattn import perf, problems
from nattn._native import _C
from nattn.cli import common

from conftest import cpu_problem

pytestmark = pytest.mark.skipif(_C is None, reason="needs the native module")

# The measured median may fall below the bound by this much: timer resolution and a ceiling
# caught while neighbours load the machine (every ceiling is the best of several measurements
# interleaved with the timed calls).
SLACK = 0.9


def _problem(shape, k, dilation=1, causal=False, m=0, head_dim=1, value_dim=1):
    return cpu_problem(shape, k, dilation=dilation, is_causal=causal, num_additional=m,
                       head_dim=head_dim, value_dim=value_dim)


def test_cpu_forward_flops_block_kernels_by_hand():
    assert (_C.cpu_q_tile, _C.cpu_kv_tile) == (8, 16)  # the numbers below assume 8 x 16
    # length 8, window 3: one tile of 8 queries whose windows span keys [0, 8): one chunk,
    # block_dot 8 x 16 x D and block_accumulate 8 x 8 x Dv multiply-adds
    assert perf.cpu_forward_flops(_problem((8,), 3), "block") == 2 * (8 * 16 + 8 * 8)
    # length 20, window 5: tiles [0, 8) (keys [0, 10): 1 chunk of 10), [8, 16) (keys [6, 18):
    # 1 chunk of 12), [16, 20) (4 real rows, keys [14, 20): 1 chunk of 6)
    assert perf.cpu_forward_flops(_problem((20,), 5), "block") == 2 * (3 * 8 * 16 + 8 * (10 + 12 + 6))
    # dilation 2: two groups of 10 positions, each as the undilated length 10, window 5:
    # tiles [0, 8) (keys [0, 10)) and [8, 10) (keys [5, 10)) per group
    assert perf.cpu_forward_flops(_problem((20,), 5, dilation=2), "block") == \
        2 * 2 * (2 * 8 * 16 + 8 * (10 + 5))
    # 2-D 8 x 8, window 3: every row's 3 key rows (sum over rows of 3) per tile of one row
    assert perf.cpu_forward_flops(_problem((8, 8), 3), "block") == 2 * 8 * 3 * (8 * 16 + 8 * 8)
    # 20 additional tokens: per tile two chunks (16 + 4 tokens) of 8 x 16 scores
    assert perf.cpu_forward_flops(_problem((8,), 3, m=20), "block") == \
        2 * (8 * 16 + 8 * 8 + 2 * 8 * 16 + 8 * 20)


def test_cpu_forward_flops_lane_kernels_by_hand():
    assert _C.cpu_q_tile == 8  # one lane per query of a tile of 8
    # length 8, window 3: lane r's offsets relative to its query: [0, 3) for query 0, [-1, 2)
    # for queries 1..6, [-2, 1) for query 7; union [-2, 3): 5 offsets x 8 lanes x (D + Dv)
    assert perf.cpu_forward_flops(_problem((8,), 3), "lane") == 2 * 8 * 5 * 2
    # length 20, window 5: tile [0, 8) offsets [-2, 5) (7), tile [8, 16) [-2, 3) (5), tile
    # [16, 20) (4 real lanes, windows clamped to [15, 20) from query 18 on) [-4, 3) (7)
    assert perf.cpu_forward_flops(_problem((20,), 5), "lane") == 2 * 8 * (7 + 5 + 7) * 2
    # dilation 2: two groups of 10, each the undilated length 10, window 5: tile [0, 8) offsets
    # [-2, 5) (7), tile [8, 10) (2 real lanes: windows [5, 10)) [-4, 2) (6), per group
    assert perf.cpu_forward_flops(_problem((20,), 5, dilation=2), "lane") == \
        2 * 2 * 8 * (7 + 6) * 2
    # 2-D 8 x 8, window 3: the rows of axis 1 run in pairs (0, 1), (2, 3), (4, 5), (6, 7),
    # each row over the union of the pair's key lines: [0, 3) and [0, 3): 3; [1, 4) and [2, 5):
    # 4; [3, 6) and [4, 7): 4; [5, 8) and [5, 8): 3. So 2 x (3 + 4 + 4 + 3) = 28 row-lines of
    # 5 offsets, against 8 x 3 = 24 unpaired.
    assert perf.cpu_forward_flops(_problem((8, 8), 3), "lane") == 2 * 8 * 28 * 5 * 2
    # window 2: rows 0 and 1 pair (both [0, 2): 2 lines for 4); rows 2 and 3 ([1, 3), [2, 4)),
    # and every later pair, would visit 3 lines for 4 and stay single (10 x 3 > 7 x 4). So 2 x 2
    # + 6 x 2 = 16 row-lines of 3 offsets ([-1, 2) over the tile's lanes)
    assert perf.cpu_forward_flops(_problem((8, 8), 2), "lane") == 2 * 8 * 16 * 3 * 2
    # 20 additional tokens: each lane multiplies all 20, scores and P V
    assert perf.cpu_forward_flops(_problem((8,), 3, m=20), "lane") == 2 * 8 * (5 + 20) * 2
    with pytest.raises(ValueError, match="kernels='tile'"):
        perf.cpu_forward_flops(_problem((8,), 3), "tile")


def test_cpu_forward_flops_counts_the_kernels_this_build_runs():
    lane = bool(_C.cpu_lane_forward())
    # window 5: the block kernels execute 2.0x the lane kernels' FLOPs, past the cost ratio
    p = _problem((20,), 5)
    assert perf.cpu_forward_flops(p, "block") > _C.cpu_lane_cost_ratio * \
        perf.cpu_forward_flops(p, "lane")
    assert perf.cpu_forward_flops(p) == perf.cpu_forward_flops(p, "lane" if lane else "block")
    assert perf.cpu_forward_kernels(p) == ("lane" if lane else "block")
    p64 = replace(p, dtype=torch.float64)  # fp64 always runs on the block kernels
    assert perf.cpu_forward_flops(p64) == perf.cpu_forward_flops(p64, "block")
    # window 63: 1.1x, so the block kernels run (faster per FLOP) wherever the lanes exist
    wide = _problem((200,), 63)
    assert perf.cpu_forward_flops(wide, "block") < _C.cpu_lane_cost_ratio * \
        perf.cpu_forward_flops(wide, "lane")
    assert perf.cpu_forward_flops(wide) == perf.cpu_forward_flops(wide, "block")
    assert perf.cpu_forward_kernels(wide) == "block"


@pytest.mark.parametrize("kernels", ["block", "lane"])
@pytest.mark.parametrize("seed", range(20))
def test_cpu_forward_flops_covers_the_needed_work(seed, kernels):
    g = torch.Generator().manual_seed(seed)
    rank = int(torch.randint(1, 4, (1,), generator=g))
    shape = tuple(int(torch.randint(3, 24 if rank < 3 else 10, (1,), generator=g))
                  for _ in range(rank))
    k = int(torch.randint(1, min(shape) + 1, (1,), generator=g))
    k -= 1 - k % 2  # odd, at most the shortest axis
    p = _problem(shape, k, causal=bool(seed % 2), head_dim=32, value_dim=16, m=seed % 3 * 7)
    # every attended pair is in some chunk: at least the needed work, and at most the whole
    # padded blocks of every chunk
    assert perf.cpu_forward_flops(p, kernels) >= perf.needed_flops(p)


def test_measured_cpu_time_is_never_below_a_printed_bound():
    device = torch.device("cpu")
    for named in problems.suite("cpu"):
        p = named  # the CPU suite runs unscaled (default_cpu_scale 1)
        inputs = common.make_inputs(p, device, torch.float32)
        (impl,) = common.nattn_impls(p, inputs, device, torch.float32, ["cpu"])
        best, times = None, []
        for _ in range(3):
            c = perf.measure_ceilings(device, torch.float32)
            best = c if best is None else perf.Ceilings(
                max(best.matmul_flops, c.matmul_flops), max(best.bandwidth, c.bandwidth),
                "measured")
            times += common.time_calls(impl.forward, device, 1, 3)
        t = common.median(times)
        report = perf.speed_of_light(p, best, device_type="cpu")
        printed = {"flop": report.flop_bound, "memory": report.memory_bound,
                   "kernel": report.kernel_bound, "tightest": report.tightest_bound}
        for name, bound in printed.items():
            assert t >= SLACK * bound, \
                f"{p.name}: measured {t * 1e3:.2f} ms is below the {name} bound " \
                f"{bound * 1e3:.2f} ms (matmul ceiling {best.matmul_flops / 1e9:.1f} GFLOP/s)"
