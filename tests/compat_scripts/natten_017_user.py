"""A small program written against NATTEN 0.14-0.17's documented API: the unfused ops with
relative positional bias (natten2dqkrpb / natten2dav, na2d_qk / na2d_av), the fused na2d with
rpb, and the 0.17-form module with its rpb parameter. tests/test_compat.py runs it unchanged
after nattn.compat.install_as_natten("0.17.5")."""

import torch

import natten
from natten import NeighborhoodAttention2D
from natten.functional import na2d, na2d_av, na2d_qk, natten2dav, natten2dqkrpb
from natten.natten2d import NeighborhoodAttention2D as OldPath

assert natten.__version__.startswith("0.1")
assert OldPath is NeighborhoodAttention2D

B, H, X, Y, D, K = 2, 4, 14, 14, 16, 7
q, k, v = (torch.randn(B, H, X, Y, D, dtype=torch.float64) for _ in range(3))
rpb = torch.randn(H, 2 * K - 1, 2 * K - 1, dtype=torch.float64)
attn = natten2dqkrpb(q * D ** -0.5, k, rpb, K, 2).softmax(dim=-1)
out = natten2dav(attn, v, K, 2)
attn2 = na2d_qk(q * D ** -0.5, k, kernel_size=K, dilation=2, rpb=rpb).softmax(dim=-1)
assert torch.allclose(na2d_av(attn2, v, kernel_size=K, dilation=2), out)
# 0.17's fused na2d: heads-last, (kernel_size, dilation, is_causal, rpb, scale).
heads_last = [t.permute(0, 2, 3, 1, 4) for t in (q, k, v)]
fused = na2d(*heads_last, K, 2, False, rpb, D ** -0.5)
assert torch.allclose(fused, out.permute(0, 2, 3, 1, 4))

natten.use_fused_na(False)
layer = NeighborhoodAttention2D(dim=64, num_heads=4, kernel_size=7, dilation=2)
assert set(layer.state_dict()) == {"qkv.weight", "qkv.bias", "rpb", "proj.weight", "proj.bias"}
x = torch.randn(1, 16, 16, 64)
y = layer(x)
y.sum().backward()
assert layer.rpb.grad is not None
print("OK")
