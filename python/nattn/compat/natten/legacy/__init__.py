"""NATTEN <= 0.17 as a namespace: what ``import natten`` gave then, on nattn.

``install_as_natten(version="0.17.5")`` (any version below 0.20) registers this namespace as
``natten``: its ``NeighborhoodAttention1D/2D/3D`` are the 0.17-form modules (``dim, num_heads,
kernel_size, dilation, bias, ...`` with parameters ``qkv``, ``rpb``, ``proj``), its
``functional`` has 0.17's fused ``na*d`` signature (dilation fourth, ``rpb``), and the 0.17
context switches (``use_fused_na`` ...) are here. The current namespace is
``nattn.compat.natten``; the two differ only where NATTEN's generations conflict.
"""

from ..context import (  # noqa: F401
    are_deterministic_algorithms_enabled, get_memory_usage_preference, has_bfloat, has_cuda,
    has_fna, has_fused_na, has_half, is_fna_enabled, is_fused_na_enabled,
    is_kv_parallelism_in_fused_na_enabled, is_memory_usage_default, is_memory_usage_strict,
    is_memory_usage_unrestricted, set_memory_usage_preference, use_deterministic_algorithms,
    use_fna, use_fused_na, use_kv_parallelism_in_fused_na,
)
from ..modules import LegacyNeighborhoodAttention1D as NeighborhoodAttention1D
from ..modules import LegacyNeighborhoodAttention2D as NeighborhoodAttention2D
from ..modules import LegacyNeighborhoodAttention3D as NeighborhoodAttention3D
from . import functional  # noqa: F401

__version__ = "0.17.5"

__all__ = [
    "NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D",
    "functional", "use_fused_na", "is_fused_na_enabled", "use_fna", "is_fna_enabled",
    "use_deterministic_algorithms", "are_deterministic_algorithms_enabled",
    "use_kv_parallelism_in_fused_na", "is_kv_parallelism_in_fused_na_enabled",
    "set_memory_usage_preference", "get_memory_usage_preference", "is_memory_usage_default",
    "is_memory_usage_strict", "is_memory_usage_unrestricted", "has_cuda", "has_fna",
    "has_fused_na", "has_half", "has_bfloat",
]
