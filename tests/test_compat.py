"""nattn.compat.natten: NATTEN's legacy unfused ops against a brute-force reference written from
DESIGN.md sections 2 and 7 (not from the kernels, not nattn.reference), the fused rpb op against
the unfused path, NAT/DiNAT-Tiny backbones on the 0.17-form modules, NATTEN state_dicts, the
current API's keywords, merge_attentions and install_as_natten. No real NATTEN is needed."""

from __future__ import annotations

import importlib.machinery
import inspect
import math
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import nattn
from nattn.compat import install_as_natten, uninstall_as_natten
from nattn.compat import natten as nt
from nattn.compat.natten import context as nctx
from nattn.compat.natten import functional as F

F64 = torch.float64
HAS_FUSED_RPB = "rpb" in inspect.signature(nattn.neighborhood_attention).parameters
needs_fused_rpb = pytest.mark.skipif(
    not HAS_FUSED_RPB, reason="nattn.neighborhood_attention has no rpb argument in this build")


# ---- the brute-force reference (DESIGN.md section 2 with stride 1, and section 7) -----------

def ref_keys(length, k, d, causal, i):
    """Keys of query i on one axis, in window-slot order, from DESIGN.md section 2 (s = 1)."""
    g, j = i % d, i // d
    group_len = (length - g + d - 1) // d
    if causal:
        start, stop = max(j - k + 1, 0), j + 1
    else:
        start = min(max(j - k // 2, 0), group_len - k)
        stop = start + k
    return [g + d * t for t in range(start, stop)]


def ref_tables(spatial, ks, ds, cs):
    """For every flat query and window slot (row-major, last axis fastest): flat key index,
    validity and the rpb index per axis ``(j - i) / d + K - 1`` (DESIGN.md section 7)."""
    r = len(spatial)
    flat, valid, bias = 0, True, []
    for a in range(r):
        keys = torch.arange(spatial[a])[:, None].repeat(1, ks[a])  # masked slots: the query
        ok = torch.zeros(spatial[a], ks[a], dtype=torch.bool)
        for i in range(spatial[a]):
            window = ref_keys(spatial[a], ks[a], ds[a], cs[a], i)
            keys[i, :len(window)] = torch.tensor(window)
            ok[i, :len(window)] = True
        b = (keys - torch.arange(spatial[a])[:, None]) // ds[a] + ks[a] - 1
        shape = [1] * (2 * r)
        shape[a], shape[r + a] = spatial[a], ks[a]
        flat = flat * spatial[a] + keys.view(shape)
        valid = valid & ok.view(shape)
        bias.append(b.view(shape))
    full = tuple(spatial) + tuple(ks)
    n, s = math.prod(spatial), math.prod(ks)
    return (flat.expand(full).reshape(n, s), valid.expand(full).reshape(n, s),
            torch.stack([b.expand(full).reshape(n, s) for b in bias], dim=-1))


def ref_qk(q, k, tables, rpb=None, ak=None):
    keys, valid, bias = tables
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    qf, kf = q.reshape(B, H, -1, D), k.reshape(B, H, -1, D)
    attn = torch.einsum("bhnd,bhnsd->bhns", qf, kf[:, :, keys])
    if rpb is not None:
        idx = (slice(None),) + tuple(bias[..., a] for a in range(bias.shape[-1]))
        attn = attn + rpb[idx].unsqueeze(0)
    attn = attn.masked_fill(~valid, float("-inf"))
    if ak is not None:
        attn = torch.cat([attn, torch.einsum("bhnd,bhmd->bhnm", qf, ak)], dim=-1)
    return attn.reshape(*q.shape[:-1], attn.shape[-1])


def ref_av(attn, v, tables, av=None):
    keys, valid, _ = tables
    B, H, D = v.shape[0], v.shape[1], v.shape[-1]
    n, s = keys.shape
    a = attn.reshape(B, H, n, -1)
    out = torch.einsum("bhns,bhnsd->bhnd", a[..., :s].masked_fill(~valid, 0),
                       v.reshape(B, H, n, D)[:, :, keys])
    if av is not None:
        out = out + torch.einsum("bhnm,bhmd->bhnd", a[..., s:], av)
    return out.reshape(v.shape)


# ---- configurations -------------------------------------------------------------------------

def _configs(count=216, seed=1234):
    rng = random.Random(seed)
    out = []
    for n in range(count):
        rank = 1 + n % 3
        ks, ds, spatial = [], [], []
        for _ in range(rank):
            k = rng.choice([2, 3, 4, 5] if rank < 3 else [2, 3])
            d = rng.choice([1, 1, 2, 3] if rank == 1 else [1, 2])
            ks.append(k)
            ds.append(d)
            spatial.append(k * d + rng.randrange(0, {1: 6, 2: 4, 3: 2}[rank]))
        cs = [rng.random() < 0.3 for _ in range(rank)]
        out.append(dict(rank=rank, spatial=tuple(spatial), ks=tuple(ks), ds=tuple(ds),
                        cs=tuple(cs), rpb=n % 2 == 0, extra=rng.choice([0, 0, 3]),
                        heads=rng.choice([1, 2]), dim=rng.choice([3, 4])))
    return out


CONFIGS = _configs()


def _inputs(c, gen, dtype=F64):
    shape = (2, c["heads"], *c["spatial"], c["dim"])
    q, k, v = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3))
    rpb = torch.randn(c["heads"], *(2 * k_ - 1 for k_ in c["ks"]), generator=gen, dtype=dtype) \
        if c["rpb"] else None
    ak = av = None
    if c["extra"]:
        ak, av = (torch.randn(2, c["heads"], c["extra"], c["dim"], generator=gen, dtype=dtype)
                  for _ in range(2))
    return q, k, v, rpb, ak, av


def test_configs_cover_the_issue():
    assert len(CONFIGS) >= 200
    assert {c["rank"] for c in CONFIGS} == {1, 2, 3}
    assert any(k % 2 == 0 for c in CONFIGS for k in c["ks"])
    assert any(k % 2 == 1 for c in CONFIGS for k in c["ks"])
    assert any(d > 1 for c in CONFIGS for d in c["ds"])
    assert any(any(c["cs"]) and c["rpb"] for c in CONFIGS)
    assert any(c["extra"] and c["rpb"] for c in CONFIGS)


def test_legacy_ops_match_brute_force_reference():
    """Forward of na*d_qk / na*d_av on every configuration, and gradients of a qk -> softmax
    -> av chain on every fourth, against the reference, fp64."""
    gen = torch.Generator().manual_seed(7)
    for n, c in enumerate(CONFIGS):
        r = c["rank"]
        qk, av = getattr(F, f"na{r}d_qk"), getattr(F, f"na{r}d_av")
        tables = ref_tables(c["spatial"], c["ks"], c["ds"], c["cs"])
        q, k, v, rpb, ak, avv = _inputs(c, gen)
        with_grad = n % 4 == 0
        leaves = [t.requires_grad_() if (t is not None and with_grad) else t
                  for t in (q, k, v, rpb, ak, avv)]
        attn = qk(q, k, c["ks"], c["ds"], additional_keys=ak, is_causal=c["cs"], rpb=rpb)
        want_attn = ref_qk(q, k, tables, rpb, ak)
        assert attn.shape == want_attn.shape, c
        assert torch.equal(torch.isinf(attn), torch.isinf(want_attn)), c
        fin = torch.isfinite(want_attn)
        torch.testing.assert_close(attn[fin], want_attn[fin], rtol=0, atol=1e-12, msg=str(c))
        weights = torch.randn(attn.shape, generator=gen, dtype=F64)
        out = av(weights, v, c["ks"], c["ds"], additional_values=avv, is_causal=c["cs"])
        torch.testing.assert_close(out, ref_av(weights, v, tables, avv), rtol=0, atol=1e-12,
                                   msg=str(c))
        if with_grad:
            g = torch.randn(v.shape, generator=gen, dtype=F64)
            params = [t for t in leaves if t is not None]
            got = torch.autograd.grad((av(attn.softmax(-1), v, c["ks"], c["ds"], avv,
                                          c["cs"]) * g).sum(), params)
            want = torch.autograd.grad((ref_av(want_attn.softmax(-1), v, tables, avv) * g)
                                       .sum(), params)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=str(c))


def test_natten_names_and_rpb_border_example():
    """DESIGN.md section 7's example: L=7, K=3: query 0 uses bias 2,3,4, query 6 uses 0,1,2."""
    q = torch.zeros(1, 1, 7, 2, dtype=F64)
    rpb = torch.arange(5, dtype=F64).view(1, 5)
    attn = F.natten1dqkrpb(q, q, rpb, 3, 1)
    assert attn[0, 0, 0].tolist() == [2, 3, 4]
    assert attn[0, 0, 3].tolist() == [1, 2, 3]
    assert attn[0, 0, 6].tolist() == [0, 1, 2]
    x = torch.randn(1, 2, 6, 7, 4, dtype=F64)
    r2 = torch.randn(2, 5, 5, dtype=F64)
    torch.testing.assert_close(F.natten2dqkrpb(x, x, r2, 3, 2), F.na2d_qk(x, x, 3, 2, rpb=r2))
    torch.testing.assert_close(F.natten2dqk(x, x, 3, 2), F.na2d_qk(x, x, (3, 3), (2, 2)))
    a = torch.randn(1, 2, 6, 7, 9, dtype=F64)
    torch.testing.assert_close(F.natten2dav(a, x, 3, 2), F.na2d_av(a, x, 3, 2))
    x3 = torch.randn(1, 1, 4, 6, 6, 2, dtype=F64)
    r3 = torch.randn(1, 3, 5, 5, dtype=F64)
    torch.testing.assert_close(F.natten3dqkrpb(x3, x3, r3, 2, 3, 1, 2),
                               F.na3d_qk(x3, x3, (2, 3, 3), (1, 2, 2), rpb=r3))
    a3 = torch.randn(1, 1, 4, 6, 6, 18, dtype=F64)
    torch.testing.assert_close(F.natten3dav(a3, x3, 2, 3, 1, 2),
                               F.na3d_av(a3, x3, (2, 3, 3), (1, 2, 2)))


def test_legacy_ops_read_strided_inputs_without_copies():
    """NATTEN modules pass permuted views of one qkv tensor; results equal contiguous ones."""
    qkv = torch.randn(2, 6, 7, 3, 2, 4, dtype=F64)
    q, k, v = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # [B, H, X, Y, D], non-contiguous
    assert not q.is_contiguous()
    rpb = torch.randn(2, 5, 5, dtype=F64)
    attn = F.na2d_qk(q, k, 3, 1, rpb=rpb)
    torch.testing.assert_close(attn, F.na2d_qk(q.contiguous(), k.contiguous(), 3, 1, rpb=rpb))
    torch.testing.assert_close(F.na2d_av(attn, v, 3), F.na2d_av(attn, v.contiguous(), 3))


@pytest.mark.parametrize("call, match", [
    (lambda: F.na1d_qk(torch.randn(1, 1, 5, 2), torch.randn(1, 1, 5, 2), 3, 2), "axis 0"),
    (lambda: F.na1d_qk(torch.randn(1, 5, 2), torch.randn(1, 5, 2), 3), "heads-first"),
    (lambda: F.na1d_qk(torch.randn(1, 1, 5, 2), torch.randn(1, 1, 6, 2), 3), "key.shape"),
    (lambda: F.na2d_qk(torch.randn(1, 2, 5, 5, 2), torch.randn(1, 2, 5, 5, 2), 3,
                       rpb=torch.randn(2, 5, 4)), "rpb.shape"),
    (lambda: F.na1d_av(torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 2), 3), "attn.shape"),
    (lambda: F.na1d_qk(torch.randn(1, 1, 5, 2), torch.randn(1, 1, 5, 2), 3,
                       additional_keys=torch.randn(1, 2, 3, 2)), "additional_keys.shape"),
])
def test_legacy_ops_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- fused rpb == unfused qk -> softmax -> av -----------------------------------------------

FUSED_CASES = [
    dict(spatial=(11,), ks=(3,), ds=(2,), cs=(False,)),
    dict(spatial=(10,), ks=(4,), ds=(1,), cs=(True,)),
    dict(spatial=(7, 9), ks=(3, 4), ds=(2, 1), cs=(False, False)),
    dict(spatial=(6, 8), ks=(5, 3), ds=(1, 2), cs=(True, False)),
    dict(spatial=(4, 5, 6), ks=(2, 3, 3), ds=(1, 1, 2), cs=(False, True, False)),
]


def _heads_last(t):
    return t.movedim(1, -2)


@needs_fused_rpb
@pytest.mark.parametrize("extra", [0, 3])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: f"{c['spatial']}k{c['ks']}")
def test_fused_rpb_equals_unfused_with_all_gradients(case, extra):
    r, H, D = len(case["spatial"]), 2, 5
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, H, *case["spatial"], D, generator=gen, dtype=F64).requires_grad_()
               for _ in range(3))
    rpb = torch.randn(H, *(2 * x - 1 for x in case["ks"]), generator=gen,
                      dtype=F64).requires_grad_()
    ak = av = None
    if extra:
        ak, av = (torch.randn(2, H, extra, D, generator=gen, dtype=F64).requires_grad_()
                  for _ in range(2))
    scale = 0.37
    leaves = [t for t in (q, k, v, rpb, ak, av) if t is not None]
    g = torch.randn(2, H, *case["spatial"], D, generator=gen, dtype=F64)
    attn = getattr(F, f"na{r}d_qk")(q * scale, k, case["ks"], case["ds"], ak, case["cs"], rpb)
    unfused = getattr(F, f"na{r}d_av")(attn.softmax(-1), v, case["ks"], case["ds"], av,
                                       case["cs"])
    fused = nattn.neighborhood_attention(
        _heads_last(q), _heads_last(k), _heads_last(v), case["ks"], 1, case["ds"], case["cs"],
        scale, None if ak is None else ak.transpose(1, 2),
        None if av is None else av.transpose(1, 2), rpb=rpb)
    torch.testing.assert_close(_heads_last(unfused), fused, rtol=0, atol=1e-10)
    want = torch.autograd.grad((unfused * g).sum(), leaves)
    got = torch.autograd.grad((fused * _heads_last(g)).sum(), leaves)
    for name, a, b in zip("q k v rpb ak av".split(), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


# ---- NAT-Tiny and DiNAT-Tiny backbones on the 0.17-form modules -----------------------------

class _Mlp(nn.Sequential):
    def __init__(self, dim, ratio):
        super().__init__(nn.Linear(dim, int(dim * ratio)), nn.GELU(),
                         nn.Linear(int(dim * ratio), dim))


class _Block(nn.Module):
    """NAT/DiNAT layer (pre-norm): x + NA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, heads, kernel, dilation):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nt.legacy.NeighborhoodAttention2D(dim, heads, kernel, dilation)
        self.mlp = _Mlp(dim, 3.0)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Backbone(nn.Module):
    """NAT (arXiv 2204.07143) / DiNAT (2209.15001): conv tokenizer (two 3x3 stride-2 convs),
    four stages joined by 3x3 stride-2 conv downsamplers, classifier head. Tiny: embedding 64,
    depths 3/4/18/5, heads 2/4/8/16, kernel 7, MLP ratio 3; DiNAT alternates dilation 1 and
    8/4/2/1 by stage (DESIGN.md section 6)."""

    def __init__(self, dilations, depths=(3, 4, 18, 5), heads=(2, 4, 8, 16), dim=64, kernel=7):
        super().__init__()
        self.tokenizer = nn.Sequential(nn.Conv2d(3, dim // 2, 3, 2, 1),
                                       nn.Conv2d(dim // 2, dim, 3, 2, 1))
        self.tok_norm = nn.LayerNorm(dim)
        self.stages, self.downs = nn.ModuleList(), nn.ModuleList()
        for s, (depth, h) in enumerate(zip(depths, heads)):
            c = dim * 2 ** s
            self.stages.append(nn.Sequential(*(
                _Block(c, h, kernel, 1 if b % 2 == 0 else dilations[s]) for b in range(depth))))
            if s < 3:
                self.downs.append(nn.ModuleList([nn.Conv2d(c, 2 * c, 3, 2, 1),
                                                 nn.LayerNorm(2 * c)]))
        self.norm = nn.LayerNorm(dim * 8)
        self.head = nn.Linear(dim * 8, 10)

    def forward(self, img):
        x = self.tok_norm(self.tokenizer(img).permute(0, 2, 3, 1))
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if s < 3:
                conv, norm = self.downs[s]
                x = norm(conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return self.head(self.norm(x).mean(dim=(1, 2)))


@pytest.mark.parametrize("name, dilations", [("nat-tiny", (1, 1, 1, 1)),
                                              ("dinat-tiny", (8, 4, 2, 1))])
def test_nat_dinat_tiny_fused_and_unfused_agree(name, dilations):
    # float32: 28M parameters in fp64 cost twice the time for no extra check here (the op-level
    # fp64 comparison is test_fused_rpb_equals_unfused_with_all_gradients).
    torch.manual_seed(3)
    model = _Backbone(dilations)
    img = torch.randn(1, 3, 32, 32)  # 8x8 tokens; blocks pad to kernel * dilation
    runs = []
    paths = (False, True) if HAS_FUSED_RPB else (False,)
    for fused in paths:
        nctx.use_fused_na(fused)
        try:
            model.zero_grad()
            logits = model(img)
            logits.square().sum().backward()
        finally:
            nctx.use_fused_na(True)
        runs.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
        assert torch.isfinite(logits).all()
        assert all(torch.isfinite(g).all() for g in runs[-1][1])
    assert all(p.grad is not None for p in model.parameters())
    if len(runs) == 2:
        (l0, g0), (l1, g1) = runs
        torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-5)
        for (n, _), a, b in zip(model.named_parameters(), g1, g0):
            assert (a - b).norm() <= 1e-4 * b.norm() + 1e-6, n


# ---- modules and state_dicts ----------------------------------------------------------------

def test_legacy_module_state_dict_loads_strictly_with_natten_keys():
    m = nt.legacy.NeighborhoodAttention2D(32, 4, 7, 2)
    shapes = {"qkv.weight": (96, 32), "qkv.bias": (96,), "rpb": (4, 13, 13),
              "proj.weight": (32, 32), "proj.bias": (32,)}
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == shapes
    ckpt = {k: torch.randn(s) for k, s in shapes.items()}  # as a NATTEN 0.14-0.17 checkpoint
    m2 = nt.legacy.NeighborhoodAttention2D(dim=32, num_heads=4, kernel_size=7, dilation=2)
    m2.load_state_dict(ckpt, strict=True)
    assert torch.equal(m2.rpb, ckpt["rpb"])
    no_bias = nt.legacy.NeighborhoodAttention3D(16, 2, (3, 5, 5), rel_pos_bias=False)
    assert no_bias.rpb is None and "rpb" not in no_bias.state_dict()
    m1 = nt.legacy.NeighborhoodAttention1D(16, 2, 5, 1, True, False, 0.5, 0.0, 0.0)
    assert m1.qkv.bias is None and m1.scale == 0.5 and m1.rpb.shape == (2, 9)


def test_current_module_state_dict_and_positional_arguments():
    m = nt.NeighborhoodAttention2D(64, 4, 7, 1, 2)  # stride=1, dilation=2 positionally
    assert m.stride == 1 and m.dilation == 2
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "qkv.weight": (192, 64), "qkv.bias": (192,), "proj.weight": (64, 64),
        "proj.bias": (64,)}
    m2 = nt.NeighborhoodAttention2D(embed_dim=64, num_heads=4, kernel_size=7, dilation=2,
                                    is_causal=None, qk_scale=0.25, proj_drop=0.0)
    m2.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(1, 14, 15, 64)
    ref = nattn.NeighborhoodAttention2D(64, 4, 7, dilation=2)
    ref.load_state_dict(m.state_dict(), strict=True)
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)
    assert m2.scale == 0.25
    m3 = nt.NeighborhoodAttention3D(32, 2, (2, 3, 3), (1, 1, 2), 1, (True, False, False),
                                    False)
    assert m3.qkv.bias is None and m3.is_causal == (True, False, False)


def test_legacy_module_unfused_path_matches_fused_without_rpb():
    m = nt.legacy.NeighborhoodAttention2D(16, 2, 5, 2, bias=False).to(F64)
    x = torch.randn(2, 11, 12, 16, dtype=F64)
    nctx.use_fused_na(False)
    try:
        unfused = m(x)
    finally:
        nctx.use_fused_na(True)
    torch.testing.assert_close(m(x), unfused, rtol=0, atol=1e-12)


def test_legacy_module_keeps_attention_dropout_in_training():
    m = nt.legacy.NeighborhoodAttention1D(8, 2, 3, attn_drop=0.5).to(F64)
    x = torch.randn(1, 9, 8, dtype=F64)
    m.eval()
    torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)
    m.train()
    torch.manual_seed(1)
    a = m(x)
    assert not torch.allclose(a, m(x))  # dropout on the weights: the unfused path ran
    with pytest.raises(ValueError, match="x.shape"):
        m(torch.randn(1, 9, 9, 8, dtype=F64))


def test_legacy_module_pads_small_inputs_like_natten_014():
    m = nt.legacy.NeighborhoodAttention2D(8, 2, 5, 2, bias=False).to(F64)
    x = torch.randn(1, 6, 12, 8, dtype=F64)
    padded = nn.functional.pad(x, (0, 0, 0, 0, 0, 4))
    torch.testing.assert_close(m(x), m(padded)[:, :6], rtol=0, atol=1e-12)


# ---- the current functional API --------------------------------------------------------------

def test_current_api_accepts_natten_defaults_names_and_hints():
    q, k, v = (torch.randn(1, 9, 10, 2, 8, dtype=F64) for _ in range(3))
    want = nattn.na2d(q, k, v, 3, dilation=2)
    for backend in (None, "flex-fna", "auto", "cpu"):
        got = nt.na2d(q, k, v, 3, 1, 2, None, backend=backend, q_tile_shape=(8, 8),
                      kv_tile_shape=(8, 8), backward_q_tile_shape=(4, 4),
                      backward_kv_tile_shape=(4, 4), backward_kv_splits=(2, 1),
                      backward_use_pt_reduction=True, run_persistent_kernel=False,
                      kernel_schedule="coop", torch_compile=True, attention_kwargs={})
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    got = F.neighborhood_attention_generic(q, k, v, (3, 3), dilation=(2, 2))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="'cutlass-fna' .*nattn's 'cuda'"):
        nt.na2d(q, k, v, 3, backend="cutlass-fna")  # CPU tensors: the CUDA kernels refuse
    with pytest.raises(ValueError, match="unknown"):
        nt.na2d(q, k, v, 3, backend="bogus-fna")
    with pytest.raises(TypeError, match="q_tile_shape"):
        nt.na2d(q, k, v, 3, q_tile_shape="big")


def _dense_attention(q, k, v, causal):
    s = torch.einsum("bshd,bthd->bhst", q, k) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhst,bthd->bshd", s.softmax(-1), v), torch.logsumexp(s, -1)


def test_attention_plain_causal_cross_and_varlen():
    q, k, v = (torch.randn(2, 12, 2, 4, dtype=F64) for _ in range(3))
    for causal in (False, True):
        out, lse = nt.attention(q, k, v, is_causal=causal, return_lse=True)
        want, want_lse = _dense_attention(q, k, v, causal)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(lse.double(), want_lse.transpose(1, 2), rtol=0, atol=1e-6)
    kc, vc = torch.randn(2, 5, 2, 4, dtype=F64), torch.randn(2, 5, 2, 4, dtype=F64)
    torch.testing.assert_close(nt.attention(q, kc, vc), _dense_attention(q, kc, vc, False)[0])
    lens_q, lens_kv = torch.tensor([5, 7]), torch.tensor([5, 7])
    packed = [t[:1] for t in (q, k, v)]
    out = nt.attention(*packed, seqlens_Q=lens_q, seqlens_KV=lens_kv)
    for a, b in ((0, 5), (5, 12)):
        want = _dense_attention(*(t[:, a:b] for t in packed), False)[0]
        torch.testing.assert_close(out[:, a:b], want, rtol=0, atol=1e-12)
    cu = torch.tensor([0, 5, 12])
    torch.testing.assert_close(
        nt.attention(*packed, cumulative_seqlen_Q=cu, cumulative_seqlen_KV=cu, max_seqlen_Q=7,
                     max_seqlen_KV=7), out)
    with pytest.raises(ValueError, match="add up"):
        nt.attention(*packed, seqlens_Q=torch.tensor([5, 6]), seqlens_KV=lens_kv)
    with pytest.raises(NotImplementedError, match="causal"):
        nt.attention(q, kc, vc, is_causal=True)


def test_merge_attentions_equals_attention_over_all_keys_with_gradients():
    q = torch.randn(1, 7, 2, 4, dtype=F64, requires_grad=True)
    kv = [torch.randn(1, 7, 2, 4, dtype=F64, requires_grad=True) for _ in range(4)]
    o1, l1 = nt.attention(q, kv[0], kv[1], return_lse=True)
    o2, l2 = nt.attention(q, kv[2], kv[3], return_lse=True)
    out, lse = nattn.merge_attentions([o1, o2], [l1, l2])
    want, want_lse = _dense_attention(q, torch.cat([kv[0], kv[2]], 1),
                                      torch.cat([kv[1], kv[3]], 1), False)
    # The parts' lse are fp32 (the kernels'), so the merge is fp32-accurate; it runs in fp64.
    assert lse.dtype == F64
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, want_lse.transpose(1, 2), rtol=0, atol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), [q] + kv)
    ref = torch.autograd.grad((want * g).sum(), [q] + kv)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    o, l = nt.merge_attentions([o1, o2], [l1, l2], torch_compile=False)
    torch.testing.assert_close(o, out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least two"):
        nattn.merge_attentions([o1], [l1])
    with pytest.raises(ValueError, match="lses\\[1\\].shape"):
        nattn.merge_attentions([o1, o2], [l1, l2[:, :3]])


def test_context_switches_record_and_validate():
    nt.use_deterministic_algorithms(True)
    assert nt.are_deterministic_algorithms_enabled()
    nt.use_deterministic_algorithms(False)
    nt.allow_flex_compile(True, backprop=True)
    assert nt.is_flex_compile_allowed() and nt.is_flex_compile_backprop_allowed()
    nt.disable_flex_compile()
    assert not nt.is_flex_compile_allowed()
    with pytest.raises(ValueError, match="pref"):
        nt.set_memory_usage_preference("huge")
    assert isinstance(nt.HAS_LIBNATTEN, bool) and nt.HAS_LIBNATTEN


# ---- install_as_natten -----------------------------------------------------------------------

SCRIPTS = Path(__file__).parent / "compat_scripts"


@pytest.mark.parametrize("script, version", [("natten_021_user.py", "0.21.7"),
                                             ("natten_017_user.py", "0.17.5")])
def test_install_as_natten_runs_natten_user_scripts_unchanged(script, version):
    env = _subprocess_env()
    code = ("import runpy, nattn.compat as c; c.install_as_natten(%r); "
            "runpy.run_path(%r, run_name='__main__')" % (version, str(SCRIPTS / script)))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK" in res.stdout


def _subprocess_env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(nattn.__file__).parents[1])] + sys.path))


REAL_NATTEN = importlib.machinery.PathFinder.find_spec("natten") is not None


@pytest.mark.skipif(not REAL_NATTEN, reason="no real NATTEN installed (CI does not install it)")
def test_against_a_real_natten_when_installed():
    res = subprocess.run([sys.executable, str(SCRIPTS / "against_real_natten.py")],
                         env=_subprocess_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK" in res.stdout


def test_install_as_natten_refuses_a_real_natten(monkeypatch):
    fake = types.ModuleType("natten")
    fake.__version__, fake.__file__ = "0.21.7", "/site-packages/natten/__init__.py"
    monkeypatch.setitem(sys.modules, "natten", fake)
    with pytest.raises(RuntimeError, match="real NATTEN"):
        install_as_natten()
    assert sys.modules["natten"] is fake


def test_install_as_natten_registers_and_uninstalls(monkeypatch):
    monkeypatch.delitem(sys.modules, "natten", raising=False)
    try:
        mod = install_as_natten()
        import natten  # noqa: F401
        from natten.functional import na2d_qk  # noqa: F401

        assert sys.modules["natten"] is mod and mod.__version__ == "0.21.7"
        assert install_as_natten() is mod
        legacy = install_as_natten("0.14.6")
        assert legacy.__version__ == "0.14.6"
        from natten.natten2d import NeighborhoodAttention2D

        assert NeighborhoodAttention2D is nt.legacy.NeighborhoodAttention2D
        with pytest.raises(ValueError, match="version"):
            install_as_natten("latest")
    finally:
        uninstall_as_natten()
    assert "natten" not in sys.modules
