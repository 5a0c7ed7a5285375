"""Compatibility with other libraries' APIs, mapped onto nattn's own (no kernels of its own).

- ``nattn.compat.natten``: NATTEN's API (current and legacy); see docs/natten.md.
- ``install_as_natten()``: make ``import natten`` give that namespace.
"""

from __future__ import annotations

import re
import sys
import types

from . import natten
from .natten import legacy as _legacy
from .natten import modules as _modules

__all__ = ["natten", "install_as_natten", "uninstall_as_natten"]

_MARK = "__nattn_compat__"


def _version_tuple(version: str):
    m = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?", version) if isinstance(version, str) else None
    if m is None:
        raise ValueError(f"version={version!r} must be a NATTEN release like '0.21.7' or '0.14.6'")
    return tuple(int(x) for x in m.groups(default="0"))


def _module(name: str, source, version=None, doc=None) -> types.ModuleType:
    mod = types.ModuleType(name, doc or source.__doc__)
    for key, value in vars(source).items():
        if not key.startswith("__"):
            setattr(mod, key, value)
    if version is not None:
        mod.__version__ = version
    mod.__all__ = list(getattr(source, "__all__", ()))
    setattr(mod, _MARK, True)
    return mod


def install_as_natten(version: str = natten.__version__) -> types.ModuleType:
    """Register nattn's NATTEN namespace as the module ``natten`` (and ``natten.functional``,
    ``natten.modules``, ``natten.context``), so that code written against NATTEN runs on nattn
    unchanged. Call it before that code imports natten.

    Args:
        version: the NATTEN release to present, as ``natten.__version__`` reports it. From
            0.20 on (default "0.21.7") the namespace is NATTEN's current API
            (``nattn.compat.natten``); below 0.20 it is the 0.17 namespace
            (``nattn.compat.natten.legacy``: 0.17-form modules with ``rpb``, 0.17's fused
            ``na*d`` signature), with ``natten.na1d``/``na2d``/``na3d`` and
            ``natten.natten1d``/``2d``/``3d`` also importable as the module paths of that time.
            Both have the unfused ``na*d_qk``/``na*d_av`` and ``natten*d*`` ops.

    Returns:
        the ``natten`` module now in ``sys.modules``. Installing again with the same version
        returns it; a different version replaces it.

    Raises:
        RuntimeError: a real NATTEN is already imported (``sys.modules['natten']`` is not
            nattn's): two implementations under one name would mix; import nattn's first, or
            use ``nattn.compat.natten`` directly.
        ValueError: ``version`` is not of the form ``X.Y[.Z]``.
    """
    wanted = _version_tuple(version)
    existing = sys.modules.get("natten")
    if existing is not None and not getattr(existing, _MARK, False):
        where = getattr(existing, "__file__", None) or "an unknown location"
        raise RuntimeError(
            f"a real NATTEN (version {getattr(existing, '__version__', '?')}, from {where}) is "
            "already imported as 'natten'; nattn will not replace it. Call "
            "nattn.compat.install_as_natten() before anything imports natten, or use "
            "nattn.compat.natten directly"
        )
    if existing is not None:
        if existing.__version__ == version:
            return existing
        uninstall_as_natten()
    legacy = wanted < (0, 20, 0)
    source = _legacy if legacy else natten
    top = _module("natten", source, version)
    entries = {
        "natten": top,
        "natten.functional": _module("natten.functional", source.functional),
        "natten.context": _module("natten.context", natten.context),
    }
    if legacy:
        for rank in (1, 2, 3):
            cls = getattr(_legacy, f"NeighborhoodAttention{rank}D")
            for path in (f"natten.na{rank}d", f"natten.natten{rank}d"):
                mod = types.ModuleType(path, f"NATTEN <= 0.17's module path of {cls.__name__}")
                setattr(mod, cls.__name__, cls)
                mod.__all__ = [cls.__name__]
                setattr(mod, _MARK, True)
                entries[path] = mod
    else:
        entries["natten.modules"] = _modules_namespace()
    for name, mod in entries.items():
        if name != "natten":
            setattr(top, name[len("natten."):], mod)
    sys.modules.update(entries)
    return top


def _modules_namespace() -> types.ModuleType:
    mod = types.ModuleType("natten.modules", "NATTEN 0.20+'s natten.modules on nattn")
    for name in ("NeighborhoodAttentionGeneric", "NeighborhoodAttention1D",
                 "NeighborhoodAttention2D", "NeighborhoodAttention3D"):
        setattr(mod, name, getattr(_modules, name))
    mod.__all__ = ["NeighborhoodAttentionGeneric", "NeighborhoodAttention1D",
                   "NeighborhoodAttention2D", "NeighborhoodAttention3D"]
    setattr(mod, _MARK, True)
    return mod


def uninstall_as_natten() -> None:
    """Remove what ``install_as_natten`` registered (nothing else: a real NATTEN in
    ``sys.modules`` is left alone)."""
    for name in [n for n in sys.modules if n == "natten" or n.startswith("natten.")]:
        if getattr(sys.modules[name], _MARK, False):
            del sys.modules[name]
