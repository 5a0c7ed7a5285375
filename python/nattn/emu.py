"""Settings and counters of the functional CUDA emulator behind ``backend="cuda-emu"``.

The emulator (``csrc/emu``, built into ``nattn._emu`` with ``NATTN_EMU=1``) runs the CUDA
kernels of ``csrc/cuda`` on CPU tensors: each CTA's threads are fibers, warp collectives
(shuffles, ``mma.sync``, ``ldmatrix``) are rendezvous of their lanes, ``cp.async`` copies become
visible at the ``cp.async.wait_group`` that covers them, and shared memory starts as NaN. It is
for verification, not speed (docs/emulator.md).

Environment: ``NATTN_EMU_ARCH`` (``80``, the default, or ``90``) is the compute capability the
dispatcher sees (and so its shared-memory limit: 163 KiB on sm80, 227 KiB on sm90). With ``90``
a forward runs on the Hopper kernels (wgmma, TMA, mbarriers, modeled from the PTX ISA) where
they take the problem, as an H100 would serve it, and on the SM80/SIMT kernels otherwise.
"""

from __future__ import annotations

import os
from typing import Dict, List

from . import _native

ORDERS = ("forward", "reverse", "random")
_configured = False


def _lib():
    if _native._emu is None:
        raise RuntimeError(_native.EMU_IMPORT_ERROR)
    return _native._emu


def configure(arch: int = None, order: str = "forward", seed: int = 0, grid_cap: int = 0) -> None:
    """Set how the emulator runs the next launches.

    Args:
        arch: emulated compute capability, 80 or 90 (default: ``NATTN_EMU_ARCH``, else 80).
        order: order of the CTAs of a grid and of the ready fibers of a CTA: ``"forward"``
            (index order), ``"reverse"`` or ``"random"`` (a permutation drawn from ``seed``).
            Results of a correct kernel do not depend on it: comparing two orders is the race
            check.
        seed: seed of the ``"random"`` order.
        grid_cap: if > 0, grid-stride launches use at most this many CTAs, so each CTA loops
            over several work items.

    Raises:
        ValueError: an arch other than 80/90, an unknown order, or a negative grid_cap.
        RuntimeError: nattn was built without the emulator.
    """
    global _configured
    if arch is None:
        arch = _environment_arch()
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: choose one of {ORDERS}")
    _lib().configure(int(arch), order, int(seed), int(grid_cap))
    _configured = True


def _environment_arch() -> int:
    value = os.environ.get("NATTN_EMU_ARCH", "80")
    if value not in ("80", "90"):
        raise ValueError(f"NATTN_EMU_ARCH={value!r}: the emulator models 80 (sm80) and 90 (sm90)")
    return int(value)


def configure_from_environment() -> None:
    """Apply ``NATTN_EMU_ARCH`` once, unless :func:`configure` was called already."""
    if not _configured:
        configure()


def clear_launches() -> None:
    """Forget the recorded launches."""
    _lib().clear_launches()


def launches() -> List[Dict]:
    """The launches since :func:`clear_launches`, each a dict: ``kernel`` (its C++ name),
    ``grid``, ``block``, ``shared_bytes``, and the counters ``mma`` and ``ldmatrix`` (warp
    instructions), ``wgmma`` (warpgroup instructions), ``cp_async_bytes``, ``tma_bytes`` (TMA
    box bytes written to shared memory) and ``global_store_bytes``."""
    return list(_lib().launches())
