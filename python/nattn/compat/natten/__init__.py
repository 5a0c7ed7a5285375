"""NATTEN's API on nattn (``nattn.compat.natten``): what ``import natten`` gives with NATTEN
0.20+ (``na1d/na2d/na3d``, ``attention``, ``merge_attentions``, the modules, the context
switches, ``HAS_LIBNATTEN``), plus NATTEN 0.17's unfused ops in ``functional`` and the 0.17
namespace in ``legacy``. ``nattn.compat.install_as_natten()`` registers it as ``natten`` for
third-party code. docs/natten.md maps every name."""

from . import context, functional, legacy, modules  # noqa: F401
from .context import (  # noqa: F401
    HAS_LIBNATTEN, allow_flex_compile, allow_flex_compile_backprop,
    are_deterministic_algorithms_enabled, disable_flex_compile, disable_flex_compile_backprop,
    get_memory_usage_preference, is_flex_compile_allowed, is_flex_compile_backprop_allowed,
    is_kv_parallelism_in_fused_na_enabled, is_memory_usage_default, is_memory_usage_strict,
    is_memory_usage_unrestricted, set_memory_usage_preference, use_deterministic_algorithms,
    use_kv_parallelism_in_fused_na,
)
from .functional import attention, merge_attentions, na1d, na2d, na3d  # noqa: F401
from .modules import (  # noqa: F401
    NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D,
)

# The NATTEN release whose current API this namespace follows; code that checks
# ``natten.__version__`` sees a version with these names.
__version__ = "0.21.7"

__all__ = [
    "__version__", "HAS_LIBNATTEN", "NeighborhoodAttention1D", "NeighborhoodAttention2D",
    "NeighborhoodAttention3D", "na1d", "na2d", "na3d", "attention", "merge_attentions",
    "use_deterministic_algorithms", "are_deterministic_algorithms_enabled",
    "use_kv_parallelism_in_fused_na", "is_kv_parallelism_in_fused_na_enabled",
    "set_memory_usage_preference", "get_memory_usage_preference", "is_memory_usage_default",
    "is_memory_usage_strict", "is_memory_usage_unrestricted", "is_flex_compile_allowed",
    "is_flex_compile_backprop_allowed", "allow_flex_compile", "allow_flex_compile_backprop",
    "disable_flex_compile", "disable_flex_compile_backprop", "functional", "modules",
    "context", "legacy",
]
