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
