"""The window math of include/nattn/window.h (through nattn._C) against the independent Python
reference (nattn.reference.in_window) and against hand-computed examples from DESIGN.md."""

import random

import pytest
import torch

from nattn import _C, reference


def _mask_from_ranges(length, firsts, counts, step):
    """[L, L] bool: row i holds first[i] + step * n for n < count[i]."""
    cols = torch.arange(length)[None, :]
    first = torch.tensor(firsts)[:, None]
    count = torch.tensor(counts)[:, None]
    offset = cols - first
    return (offset >= 0) & (offset % step == 0) & (offset // step < count)


def _reference_mask(length, k, s, d, causal):
    i = torch.arange(length)
    return reference.in_window(i[:, None], i[None, :], length, k, s, d, causal)


def _all_1d_configs(max_length):
    for length in range(1, max_length + 1):
        for d in range(1, length + 1):
            for k in range(1, length // d + 1):
                for s in range(1, k + 1):
                    for causal in (False, True):
                        yield length, k, s, d, causal


def test_every_1d_config_up_to_24_matches_reference():
    checked = 0
    for length, k, s, d, causal in _all_1d_configs(24):
        rows = _C.axis_windows(length, k, s, d, causal)
        kf, kc, qf, qc = zip(*rows)
        want = _reference_mask(length, k, s, d, causal)
        got_keys = _mask_from_ranges(length, kf, kc, d)
        got_queries = _mask_from_ranges(length, qf, qc, d).T  # row t lists queries of key t
        assert torch.equal(got_keys, want), (length, k, s, d, causal)
        assert torch.equal(got_queries, want), (length, k, s, d, causal)
        checked += 1
    assert checked > 5000


@pytest.mark.parametrize("rank", [2, 3])
def test_random_multidim_masks_are_products_of_axis_windows(rank):
    rng = random.Random(rank)
    for _ in range(60):
        shape, ks, ss, ds, cs = [], [], [], [], []
        for _axis in range(rank):
            length = rng.randint(1, 9 if rank == 3 else 14)
            d = rng.randint(1, length)
            k = rng.randint(1, length // d)
            shape.append(length)
            ks.append(k)
            ds.append(d)
            ss.append(rng.randint(1, k))
            cs.append(rng.random() < 0.3)
        want = reference.neighborhood_mask(shape, ks, ss, ds, cs)
        # Kernel side: per-axis windows from the header, combined as a product.
        axis_keys, axis_queries = [], []
        for a in range(rank):
            kf, kc, qf, qc = zip(*_C.axis_windows(shape[a], ks[a], ss[a], ds[a], cs[a]))
            axis_keys.append(_mask_from_ranges(shape[a], kf, kc, ds[a]))
            axis_queries.append(_mask_from_ranges(shape[a], qf, qc, ds[a]).T)
        for masks, expected in ((axis_keys, want), (axis_queries, want)):
            got = masks[0]
            for m in masks[1:]:
                n = got.shape[0]
                got = (got[:, None, :, None] & m[None, :, None, :]).reshape(n * m.shape[0], -1)
            assert torch.equal(got, expected), (shape, ks, ss, ds, cs)


# DESIGN.md section 2 worked examples, indices written out by hand.
EXAMPLES = [
    # (length, kernel, stride, dilation, causal, {query: keys})
    (10, 3, 1, 2, False, {0: [0, 2, 4], 2: [0, 2, 4], 4: [2, 4, 6], 6: [4, 6, 8], 8: [4, 6, 8],
                          1: [1, 3, 5], 3: [1, 3, 5], 9: [5, 7, 9]}),
    (9, 4, 2, 1, False, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3], 2: [1, 2, 3, 4], 3: [1, 2, 3, 4],
                         4: [3, 4, 5, 6], 5: [3, 4, 5, 6], 6: [5, 6, 7, 8], 7: [5, 6, 7, 8],
                         8: [5, 6, 7, 8]}),
    (10, 4, 4, 1, False, {**{q: [0, 1, 2, 3] for q in range(4)},
                          **{q: [4, 5, 6, 7] for q in range(4, 8)}, 8: [6, 7, 8, 9],
                          9: [6, 7, 8, 9]}),
    (10, 5, 3, 1, False, {**{q: [0, 1, 2, 3, 4] for q in range(3)},
                          **{q: [2, 3, 4, 5, 6] for q in range(3, 6)},
                          **{q: [5, 6, 7, 8, 9] for q in range(6, 10)}}),
    (8, 3, 1, 1, True, {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [1, 2, 3], 7: [5, 6, 7]}),
    (8, 3, 2, 1, True, {0: [0], 1: [0, 1], 2: [1, 2], 3: [1, 2, 3], 4: [3, 4], 5: [3, 4, 5]}),
]


@pytest.mark.parametrize("length,k,s,d,causal,windows", EXAMPLES)
def test_design_examples(length, k, s, d, causal, windows):
    rows = _C.axis_windows(length, k, s, d, causal)
    ref = _reference_mask(length, k, s, d, causal)
    for q, keys in windows.items():
        first, count = rows[q][0], rows[q][1]
        assert [first + d * n for n in range(count)] == keys
        assert torch.nonzero(ref[q]).flatten().tolist() == keys


def test_self_attention_and_blocked_special_cases():
    # K = L, s = d = 1: every query sees every key.
    assert _reference_mask(7, 7, 1, 1, False).all()
    assert all(r[:2] == (0, 7) for r in _C.axis_windows(7, 7, 1, 1, False))
    # s = K: blocks of K queries see exactly their own block.
    rows = _C.axis_windows(12, 4, 4, 1, False)
    assert [r[0] for r in rows] == [0] * 4 + [4] * 4 + [8] * 4


@pytest.mark.parametrize(
    "args,rule",
    [((5, 0, 1, 1), "kernel_size"), ((5, 3, 4, 1), "stride"), ((5, 3, 1, 2), "dilation"),
     ((5, 3, 0, 1), "stride"), ((0, 1, 1, 1), "length")],
)
def test_native_rejects_invalid_axes(args, rule):
    assert rule in _C.axis_params_error(*args)
    with pytest.raises(ValueError, match=rule):
        _C.axis_windows(*args, False)
    assert _C.axis_params_error(5, 3, 1, 1) is None
