"""``natten.functional`` as NATTEN 0.17 had it: the fused ``na1d/na2d/na3d`` with 0.17's
signature ``(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None,
additional_keys=None, additional_values=None, xformers_kwargs=None)`` (heads-last, no stride),
and the unfused ``na*d_qk`` / ``na*d_av`` and older ``natten*d*`` ops of the current namespace."""

from __future__ import annotations

from ..functional import (  # noqa: F401  (re-exported: 0.17 had the same ops)
    merge_attentions, na1d_av, na1d_qk, na2d_av, na2d_qk, na3d_av, na3d_qk, natten1dav,
    natten1dqk, natten1dqkrpb, natten2dav, natten2dqk, natten2dqkrpb, natten3dav, natten3dqk,
    natten3dqkrpb, neighborhood_attention_generic,
)

__all__ = [
    "na1d", "na2d", "na3d", "na1d_qk", "na1d_av", "na2d_qk", "na2d_av", "na3d_qk", "na3d_av",
    "natten1dqkrpb", "natten1dqk", "natten1dav", "natten2dqkrpb", "natten2dqk", "natten2dav",
    "natten3dqkrpb", "natten3dqk", "natten3dav",
]


def _ranked(rank: int):
    def na(query, key, value, kernel_size, dilation=1, is_causal=False, rpb=None, scale=None,
           additional_keys=None, additional_values=None, xformers_kwargs=None):
        if xformers_kwargs is not None and not isinstance(xformers_kwargs, dict):
            raise TypeError(f"xformers_kwargs={xformers_kwargs!r} must be None or a dict")
        return neighborhood_attention_generic(
            query, key, value, kernel_size, 1, dilation, is_causal, scale, additional_keys,
            additional_values, rpb=rpb, _rank=rank,
        )

    na.__name__ = na.__qualname__ = f"na{rank}d"
    na.__doc__ = (
        f"NATTEN 0.17's fused ``na{rank}d(query, key, value, kernel_size, dilation=1, "
        "is_causal=False, rpb=None, scale=None, additional_keys=None, additional_values=None, "
        "xformers_kwargs=None)``: heads-last ``[B, *spatial, H, D]``, additional tokens "
        "``[B, M, H, D]``; ``rpb`` ``[H, 2K-1 per axis]`` is fused (any kernel size, causal "
        "included). ``xformers_kwargs`` is a hint without effect. Returns the output; raises "
        "what ``nattn.neighborhood_attention`` raises."
    )
    return na


na1d, na2d, na3d = _ranked(1), _ranked(2), _ranked(3)
