"""NATTEN argument conventions mapped onto nattn's: backend names, ``None`` defaults and the
tuning keywords nattn's planner decides for itself."""

from __future__ import annotations

import numbers

from ... import backends as _backends

# NATTEN backend name -> nattn backend name. NATTEN's CUTLASS 2.x kernels ("cutlass-*") are its
# SM50+ portable path, as nattn's "cuda" (SM80 tensor cores and SIMT) is; "hopper-*" are the
# SM90 wgmma/TMA kernels, nattn's "hopper" (opt-in until validated on a GPU, see
# docs/backends.md); nattn has no Blackwell kernels, and its portable CUDA kernels run there;
# Flex Attention is NATTEN's any-device fallback, so it maps to nattn's own choice for the
# device ("auto": CUDA kernels on a GPU, CPU kernels on the CPU).
BACKENDS = {
    "cutlass-fna": "cuda",
    "cutlass-fmha": "cuda",
    "hopper-fna": "hopper",
    "hopper-fmha": "hopper",
    "blackwell-fna": "cuda",
    "blackwell-fmha": "cuda",
    "flex-fna": "auto",
    "flex-fmha": "auto",
}


def backend(name) -> str:
    """nattn's backend for NATTEN's ``backend`` argument (``None``: NATTEN's default, "pick
    the best" = nattn's ``"auto"``); nattn's own names pass through."""
    if name is None:
        return "auto"
    if not isinstance(name, str):
        raise TypeError(f"backend={name!r} must be None or a str")
    if name in BACKENDS:
        return BACKENDS[name]
    if name == "auto" or name in _backends.names():
        return name
    raise ValueError(
        f"backend={name!r} is unknown: NATTEN's names map to nattn's as {BACKENDS}; nattn's own "
        f"are {['auto'] + _backends.names()}"
    )


def causal(value):
    """NATTEN's ``is_causal=None`` means not causal."""
    return False if value is None else value


def _shape_hint(name: str, value) -> None:
    if value is None:
        return
    values = value if isinstance(value, (tuple, list)) else (value,)
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
               for v in values):
        raise TypeError(f"{name}={value!r} must be None, a positive int or a tuple of them")


def tuning_hints(**hints) -> None:
    """Check NATTEN's tuning keywords (tile shapes, kv splits, kernel schedule, persistence,
    torch_compile, PyTorch reduction). nattn's planner chooses tiles and schedules itself, so
    these are hints it ignores: they never change which function is computed, and a value of
    the wrong kind still raises TypeError as in NATTEN."""
    for name, value in hints.items():
        if name in ("backward_use_pt_reduction", "run_persistent_kernel", "torch_compile"):
            if not isinstance(value, bool):
                raise TypeError(f"{name}={value!r} must be a bool")
        elif name == "kernel_schedule":
            if value is not None and not isinstance(value, str) and not hasattr(value, "value"):
                raise TypeError(f"kernel_schedule={value!r} must be None, a str or a schedule")
        elif name == "attention_kwargs":
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"attention_kwargs={value!r} must be None or a dict")
        else:
            _shape_hint(name, value)
