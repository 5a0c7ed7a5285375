import os
from pathlib import Path

import pytest
import torch

# Deterministic, fast CPU runs: two threads as on CI, and no TF32 surprises on a GPU.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cutlass_include():
    """The CUTLASS/CuTe include directory (NATTN_CUTLASS_INCLUDE, else the nvidia-cutlass
    wheel's), or None: the compile checks skip without it."""
    env = os.environ.get("NATTN_CUTLASS_INCLUDE")
    if env and Path(env, "cute").is_dir():
        return env
    try:
        import cutlass_library
    except ImportError:
        return None
    path = Path(cutlass_library.__file__).parent / "source" / "include"
    return str(path) if (path / "cute").is_dir() else None


def run_attention(fn, c, inputs, grads):
    """Forward + lse + gradients of (out . g_out + lse . g_lse) with respect to every input of
    the case ``c`` (kernel_size, stride, dilation, is_causal): [out, lse, *grads]."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    q, k, v, ak, av = leaves
    out, lse = fn(q, k, v, c.kernel_size, stride=c.stride, dilation=c.dilation,
                  is_causal=c.is_causal, additional_keys=ak, additional_values=av,
                  return_lse=True)
    g_out, g_lse = grads
    loss = (out * g_out).sum() + (lse * g_lse).sum()
    params = [t for t in leaves if t is not None]
    return [out, lse] + list(torch.autograd.grad(loss, params))


def cpu_problem(shape, kernel_size, stride=1, dilation=1, is_causal=False, num_additional=0,
                head_dim=1, value_dim=1):
    """A one-head fp32 CPU ``nattn.backends.Problem`` of spatial ``shape``; kernel_size, stride,
    dilation and is_causal are one value for every axis or a tuple per axis."""
    from nattn.backends import Problem

    def per_axis(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x,) * len(shape)

    return Problem(batch=1, spatial_shape=tuple(shape), heads=1, kv_heads=1, head_dim=head_dim,
                   value_dim=value_dim, kernel_size=per_axis(kernel_size),
                   stride=per_axis(stride), dilation=per_axis(dilation),
                   is_causal=per_axis(is_causal), num_additional=num_additional,
                   dtype=torch.float32, device=torch.device("cpu"), requires_grad=False)
