"""``natten.context`` on nattn: NATTEN's global switches, kept as state that code can set and
read back. None of them changes what nattn computes:

- deterministic algorithms: nattn's backward passes are deterministic on every backend (no
  atomics), with or without this switch;
- KV parallelism, memory-usage preference, Flex compilation: tuning choices of NATTEN's own
  backends, which nattn's planner makes for itself;
- fused NA (0.17, ``use_fused_na``): chooses between the fused op and the unfused qk/softmax/av
  path in the 0.17-form modules (``nattn.compat.natten.legacy``); both compute the same
  function (the unfused path is the one that applies attention dropout).
"""

from __future__ import annotations

from ... import _native

__all__ = [
    "use_deterministic_algorithms", "are_deterministic_algorithms_enabled",
    "use_kv_parallelism_in_fused_na", "is_kv_parallelism_in_fused_na_enabled",
    "set_memory_usage_preference", "get_memory_usage_preference", "is_memory_usage_default",
    "is_memory_usage_strict", "is_memory_usage_unrestricted", "allow_flex_compile",
    "allow_flex_compile_backprop", "disable_flex_compile", "disable_flex_compile_backprop",
    "is_flex_compile_allowed", "is_flex_compile_backprop_allowed", "use_fused_na",
    "is_fused_na_enabled", "use_fna", "is_fna_enabled", "has_cuda", "has_fna", "has_fused_na",
    "has_half", "has_bfloat", "HAS_LIBNATTEN",
]

# Whether nattn's native kernels are importable: NATTEN code reads HAS_LIBNATTEN to decide
# whether its fast kernels (rather than a pure-PyTorch fallback) are there.
HAS_LIBNATTEN: bool = _native.IMPORT_ERROR is None

_state = {
    "deterministic": False,
    "kv_parallel": True,
    "memory": "default",
    "flex_compile": False,
    "flex_compile_backprop": False,
    "fused_na": True,
}
_MEMORY = ("default", "strict", "unrestricted")


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be a bool")
    return value


def use_deterministic_algorithms(mode: bool = True) -> None:
    """Record NATTEN's deterministic mode; nattn's backward is deterministic regardless."""
    _state["deterministic"] = _flag("mode", mode)


def are_deterministic_algorithms_enabled() -> bool:
    return _state["deterministic"]


def use_kv_parallelism_in_fused_na(mode: bool = True) -> None:
    """Record the switch; nattn's kernels choose their own parallel schedule."""
    _state["kv_parallel"] = _flag("mode", mode)


def is_kv_parallelism_in_fused_na_enabled() -> bool:
    return _state["kv_parallel"]


def set_memory_usage_preference(pref: str = "default") -> None:
    """Record NATTEN's memory preference ("default", "strict", "unrestricted"); a hint."""
    if pref not in _MEMORY:
        raise ValueError(f"pref={pref!r} must be one of {_MEMORY}")
    _state["memory"] = pref


def get_memory_usage_preference() -> str:
    return _state["memory"]


def is_memory_usage_default() -> bool:
    return _state["memory"] == "default"


def is_memory_usage_strict() -> bool:
    return _state["memory"] == "strict"


def is_memory_usage_unrestricted() -> bool:
    return _state["memory"] == "unrestricted"


def allow_flex_compile(mode: bool = True, backprop: bool = False) -> None:
    """Record NATTEN's Flex-compilation switches. nattn has no Flex backend: NATTEN's
    ``flex-fna`` maps to nattn's ``auto``, and nattn's own ops work under ``torch.compile``."""
    _state["flex_compile"] = _flag("mode", mode)
    _state["flex_compile_backprop"] = _flag("backprop", backprop) and mode


def allow_flex_compile_backprop(mode: bool = True) -> None:
    _state["flex_compile_backprop"] = _flag("mode", mode)
    if mode:
        _state["flex_compile"] = True


def disable_flex_compile() -> None:
    _state["flex_compile"] = _state["flex_compile_backprop"] = False


def disable_flex_compile_backprop() -> None:
    _state["flex_compile_backprop"] = False


def is_flex_compile_allowed() -> bool:
    return _state["flex_compile"]


def is_flex_compile_backprop_allowed() -> bool:
    return _state["flex_compile_backprop"]


def use_fused_na(mode: bool = True, kv_parallel: bool = True) -> None:
    """NATTEN 0.17's switch between fused and unfused NA in its modules. nattn's 0.17-form
    modules run fused by default (NATTEN's default was unfused; the function is the same)."""
    _state["fused_na"] = _flag("mode", mode)
    use_kv_parallelism_in_fused_na(kv_parallel)


def is_fused_na_enabled() -> bool:
    return _state["fused_na"]


use_fna = use_fused_na
is_fna_enabled = is_fused_na_enabled


def has_cuda() -> bool:
    """Whether nattn's CUDA kernels were built and a CUDA device is usable."""
    import torch

    return HAS_LIBNATTEN and bool(getattr(_native._C, "with_cuda", False)) and \
        torch.cuda.is_available()


def has_fna(device_index=None) -> bool:
    """Fused NA is nattn's only kind: available wherever the native module is."""
    return HAS_LIBNATTEN


has_fused_na = has_fna


def has_half(device_index=None) -> bool:
    return HAS_LIBNATTEN


def has_bfloat(device_index=None) -> bool:
    return HAS_LIBNATTEN
