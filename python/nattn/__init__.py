"""nattn: fused neighborhood attention (NA, dilated NA, strided/blocked GNA, per-axis causal) for
PyTorch, over 1-D, 2-D and 3-D token layouts.

    import nattn
    out = nattn.na2d(q, k, v, kernel_size=7)          # q, k, v: [B, H_img, W_img, heads, dim]

See ``nattn.neighborhood_attention`` for the arguments and docs/ for the semantics.
"""

from . import backends, distributed, reference
from .functional import na1d, na2d, na3d, neighborhood_attention
from .merge import merge_attentions
from .modules import (
    NeighborhoodAttention,
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)

__version__ = "0.1.0"

__all__ = [
    "neighborhood_attention",
    "na1d",
    "na2d",
    "na3d",
    "merge_attentions",
    "NeighborhoodAttention",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "backends",
    "distributed",
    "reference",
]
