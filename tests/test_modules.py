import pytest
import torch

import nattn


def test_module_matches_functional_composition():
    layer = nattn.NeighborhoodAttention2D(32, 4, kernel_size=3, dilation=2, num_kv_heads=2)
    x = torch.randn(2, 7, 9, 32)
    q, k, v = layer.qkv(x).split([32, 16, 16], dim=-1)
    out = nattn.reference.neighborhood_attention(
        q.unflatten(-1, (4, 8)), k.unflatten(-1, (2, 8)), v.unflatten(-1, (2, 8)), 3, dilation=2
    )
    torch.testing.assert_close(layer(x), layer.proj(out.flatten(-2)))


def test_module_backward_reaches_weights():
    layer = nattn.NeighborhoodAttention1D(16, 2, kernel_size=5, is_causal=True)
    layer(torch.randn(1, 12, 16)).sum().backward()
    assert layer.qkv.weight.grad is not None and layer.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs,pattern",
    [(dict(embed_dim=30, num_heads=4), "embed_dim=30 must be a positive multiple"),
     (dict(embed_dim=32, num_heads=4, num_kv_heads=3), "num_kv_heads=3 must divide"),
     (dict(embed_dim=32, num_heads=4, rank=4), "rank=4 must be 1, 2 or 3")],
)
def test_module_construction_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        nattn.NeighborhoodAttention(kernel_size=3, **kwargs)


def test_module_rejects_wrong_input():
    layer = nattn.NeighborhoodAttention3D(16, 2, kernel_size=3)
    with pytest.raises(ValueError, match=r"x.shape=\(1, 4, 4, 16\) must be"):
        layer(torch.randn(1, 4, 4, 16))
    with pytest.raises(ValueError, match="kernel_size \\* dilation = 3 on axis 0"):
        layer(torch.randn(1, 2, 4, 4, 16))
