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
