"""A small program written against NATTEN 0.21's documented API (natten.na2d, natten.attention,
natten.merge_attentions, the modules and context switches). tests/test_compat.py runs it
unchanged after nattn.compat.install_as_natten()."""

import torch

import natten
from natten import NeighborhoodAttention2D
from natten.functional import na1d, na2d, na3d

assert tuple(int(x) for x in natten.__version__.split(".")[:2]) >= (0, 20)
assert natten.HAS_LIBNATTEN
natten.use_deterministic_algorithms(True)
natten.allow_flex_compile(False)

q, k, v = (torch.randn(2, 16, 16, 4, 32) for _ in range(3))
out = na2d(q, k, v, kernel_size=7, stride=2, dilation=2, is_causal=None, backend=None)
assert out.shape == (2, 16, 16, 4, 32)
out, lse = na2d(q, k, v, kernel_size=(5, 7), return_lse=True, backend="flex-fna",
                q_tile_shape=(8, 8), kv_tile_shape=(8, 8), torch_compile=False)
assert lse.shape == (2, 16, 16, 4)

x = torch.randn(1, 64, 2, 16)
assert na1d(x, x, x, kernel_size=8, is_causal=True).shape == x.shape
x3 = torch.randn(1, 6, 8, 8, 2, 16)
assert na3d(x3, x3, x3, kernel_size=(3, 5, 5), stride=(1, 2, 2)).shape == x3.shape

# Cross-neighborhood attention the NATTEN way: NA and plain attention merged by lse.
ctx_k, ctx_v = torch.randn(2, 10, 4, 32), torch.randn(2, 10, 4, 32)
na_out, na_lse = na2d(q, k, v, kernel_size=7, return_lse=True)
x_out, x_lse = natten.attention(q.flatten(1, 2), ctx_k, ctx_v, return_lse=True)
merged, _ = natten.merge_attentions([na_out.flatten(1, 2), x_out], [na_lse.flatten(1, 2),
                                                                    x_lse])
fused = na2d(q, k, v, kernel_size=7, additional_keys=ctx_k, additional_values=ctx_v)
assert torch.allclose(merged, fused.flatten(1, 2), atol=1e-5)

layer = NeighborhoodAttention2D(64, 4, 7, 1, 2)  # embed_dim, heads, kernel, stride, dilation
layer2 = NeighborhoodAttention2D(embed_dim=64, num_heads=4, kernel_size=7, dilation=2,
                                 qk_scale=None, proj_drop=0.1)
layer2.load_state_dict(layer.state_dict(), strict=True)
y = layer(torch.randn(1, 14, 14, 64, requires_grad=True))
y.sum().backward()
print("OK")
