"""Named benchmark problems (DESIGN.md section 6) as data, and ``scale`` to shrink one for CPU runs.

The NAT/DiNAT rows follow the Tiny variants of the papers: NAT (arXiv 2204.07143) and DiNAT
(arXiv 2209.15001) Tiny use embedding 64 with 2/4/8/16 heads per stage (head dim 32) and kernel
7; a 224 px image becomes 56 x 56 tokens after the stride-4 tokenizer, halved per stage. DiNAT
alternates NA layers (dilation 1) with DiNA layers whose dilation is the largest that fits,
8/4/2/1 by stage at 224 px: 56 = 7 x 8 tokens, so stage 1's dilated window spans the whole
feature map exactly; stage 3 (14 x 14, 8 heads) uses 2. The segmentation row is NAT-Tiny stage 1
on a 1024 px input (256 x 256 tokens). The video rows are the GNA configurations used with real
video models (GNA, arXiv 2504.16922), and the LLM row is sliding-window causal attention with
GQA.

The CPU suite exercises the fused CPU kernels at sizes a 2-core machine runs in seconds
(fp32, batch 1, 4 heads, head dim 64); ``cpu-2d-128`` has 4x the tokens of ``cpu-2d-64`` at the
same window, so its time should be at most ~4.5x (linear scaling in N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Tuple

import torch

__all__ = [
    "NamedProblem", "PROBLEMS", "SUITES", "get", "suite", "scale", "default_cpu_scale",
    "window_sweep",
]


@dataclass(frozen=True)
class NamedProblem:
    """One benchmark problem; its fields mirror ``nattn.backends.Problem`` (plus name, source),
    so ``nattn.perf`` accepts it directly."""

    name: str
    spatial_shape: Tuple[int, ...]
    heads: int
    kv_heads: int
    head_dim: int
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    is_causal: Tuple[bool, ...]
    source: str
    batch: int = 1
    value_dim: int = 0  # 0: same as head_dim
    num_additional: int = 0
    dtype: torch.dtype = torch.bfloat16  # the models' dtype; CPU runs default to fp32

    def __post_init__(self):
        if self.value_dim == 0:
            object.__setattr__(self, "value_dim", self.head_dim)
        rank = len(self.spatial_shape)
        for name in ("kernel_size", "stride", "dilation", "is_causal"):
            if len(getattr(self, name)) != rank:
                raise ValueError(f"{self.name}: {name} needs {rank} entries")

    @property
    def rank(self) -> int:
        return len(self.spatial_shape)

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial_shape)

    def describe(self) -> str:
        def x(v):
            return "x".join(str(int(i)) for i in v)

        causal = "" if not any(self.is_causal) else " causal " + x(self.is_causal)
        gqa = f"/{self.kv_heads}kv" if self.kv_heads != self.heads else ""
        return (f"{x(self.spatial_shape)} B{self.batch} H{self.heads}{gqa} D{self.head_dim} "
                f"w{x(self.kernel_size)} s{x(self.stride)} d{x(self.dilation)}{causal}")


def _p(name, shape, heads, head_dim, window, stride, dilation, source, causal=None,
       kv_heads=None, **kw) -> NamedProblem:
    rank = len(shape)
    return NamedProblem(
        name=name, spatial_shape=tuple(shape), heads=heads, kv_heads=kv_heads or heads,
        head_dim=head_dim, kernel_size=tuple(window), stride=tuple(stride),
        dilation=tuple(dilation), is_causal=tuple(causal or (False,) * rank), source=source, **kw)


_NAT = "NAT-Tiny (arXiv 2204.07143): embed 64, heads 2/4/8/16, head dim 32, kernel 7"
_DINAT = "DiNAT-Tiny (arXiv 2209.15001): NAT-Tiny + dilations 8/4/2/1 by stage at 224 px"
_GNA = "GNA (arXiv 2504.16922) configuration of a video/image generation model"
_CPU = "nattn CPU suite: fp32, B=1, H=4, D=64, 2 threads"

PROBLEMS: Dict[str, NamedProblem] = {
    p.name: p
    for p in [
        _p("nat-t-stage1", (56, 56), 2, 32, (7, 7), (1, 1), (1, 1), _NAT + "; stage 1, 224 px"),
        _p("dinat-t-stage1", (56, 56), 2, 32, (7, 7), (1, 1), (8, 8),
           _DINAT + "; stage 1 DiNA layer, 7 x 8 = 56 spans the map"),
        _p("dinat-t-stage3", (14, 14), 8, 32, (7, 7), (1, 1), (2, 2),
           _DINAT + "; stage 3 DiNA layer"),
        _p("nat-seg-stage1", (256, 256), 2, 32, (7, 7), (1, 1), (1, 1),
           _NAT + "; stage 1 at 1024 px (segmentation)"),
        _p("flux-4k", (256, 256), 24, 128, (80, 80), (16, 16), (1, 1),
           _GNA + ": Flux at 4K"),
        _p("hunyuan-video", (30, 48, 80), 24, 128, (18, 24, 24), (16, 8, 8), (1, 1, 1),
           _GNA + ": HunyuanVideo"),
        _p("cosmos-predict2.5-2b", (24, 44, 80), 16, 128, (24, 12, 24), (1, 4, 8), (1, 1, 1),
           _GNA + ": Cosmos-Predict2.5 2B"),
        _p("llm-sliding-window", (32768,), 32, 128, (4096,), (1,), (1,),
           "LLM sliding-window causal attention, GQA 32 query / 8 kv heads", causal=(True,),
           kv_heads=8),
        _p("cpu-2d-64", (64, 64), 4, 64, (7, 7), (1, 1), (1, 1), _CPU, dtype=torch.float32),
        _p("cpu-2d-128", (128, 128), 4, 64, (7, 7), (1, 1), (1, 1),
           _CPU + "; 4x cpu-2d-64's tokens: time ratio should be <= 4.5", dtype=torch.float32),
        _p("cpu-3d-16", (16, 16, 16), 4, 64, (5, 5, 5), (1, 1, 1), (1, 1, 1), _CPU,
           dtype=torch.float32),
        _p("cpu-3d-1k", (8, 8, 16), 4, 64, (5, 5, 5), (1, 1, 1), (1, 1, 1),
           _CPU + "; a quarter of cpu-3d-16's tokens (its scaling pair)", dtype=torch.float32),
        _p("cpu-1d-4k", (4096,), 4, 64, (255,), (1,), (1,),
           _CPU + "; a quarter of cpu-1d-16k's tokens (its scaling pair)", dtype=torch.float32),
        _p("cpu-1d-16k", (16384,), 4, 64, (255,), (1,), (1,), _CPU, dtype=torch.float32),
    ]
}

SUITES: Dict[str, List[str]] = {
    "models": [n for n in PROBLEMS if not n.startswith("cpu-")],
    "cpu": [n for n in PROBLEMS if n.startswith("cpu-")],
}
SUITES["all"] = SUITES["models"] + SUITES["cpu"]


def get(name: str) -> NamedProblem:
    """The named problem; ``ValueError`` listing the names otherwise."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}: choose from {', '.join(PROBLEMS)}")
    return PROBLEMS[name]


def suite(name: str) -> List[NamedProblem]:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}: choose from {', '.join(SUITES)}")
    return [PROBLEMS[n] for n in SUITES[name]]


def scale(problem: NamedProblem, factor: float) -> NamedProblem:
    """``problem`` with every spatial extent multiplied by ``factor`` (rounded, at least 1),
    keeping the window valid (``kernel_size * dilation <= length``, ``stride <= kernel_size``).

    Per axis, in this order:
      * the window is kept when it still fits;
      * else the dilation shrinks to the largest that fits, ``length // kernel_size`` (DiNAT's own
        rule for its per-stage dilations);
      * else (the window alone is longer than the axis) window and stride shrink by ``factor``
        too, so a large-window GNA problem keeps its stride-to-window proportions and roughly its
        density instead of turning into full attention.

    Heads, head dim, batch and dtype are unchanged. ``factor >= 1`` returns the problem unchanged
    apart from the longer layout.
    """
    if not factor > 0:
        raise ValueError(f"scale factor={factor!r} must be > 0")
    if factor == 1:
        return problem
    shape, kernel, stride, dilation = [], [], [], []
    for length, k, s, d in zip(problem.spatial_shape, problem.kernel_size, problem.stride,
                               problem.dilation):
        new_len = max(1, round(length * factor))
        if k * d > new_len:
            if k <= new_len:
                d = new_len // k
            else:
                d = 1
                k = max(1, min(new_len, round(k * factor)))
                s = max(1, min(k, round(s * factor)))
        shape.append(new_len)
        kernel.append(k)
        stride.append(s)
        dilation.append(d)
    return replace(problem, spatial_shape=tuple(shape), kernel_size=tuple(kernel),
                   stride=tuple(stride), dilation=tuple(dilation))


def default_cpu_scale(problem: NamedProblem, max_flops: float = 2e9,
                      max_scores: float = 6.8e7) -> float:
    """The largest power-of-two factor (at most 1) at which ``scale(problem, factor)`` needs at
    most ``max_flops`` forward FLOPs (about 0.1 to 0.2 s of a fused kernel on 2 cores) and its
    dense score matrix ``B * H * N^2`` has at most ``max_scores`` entries (270 MB in fp32, what
    the SDPA and reference baselines materialize; cpu-2d-64 is just under it). CPU-suite
    problems are sized for the CPU and keep factor 1."""
    from . import perf

    if problem.name.startswith("cpu-"):
        return 1.0
    factor = 1.0
    while factor > 2.0**-10:
        p = scale(problem, factor)
        scores = p.batch * p.heads * float(p.tokens) ** 2
        if perf.needed_flops(p) <= max_flops and scores <= max_scores:
            break
        factor /= 2
    return factor


def window_sweep(rank: int, device_type: str) -> List[NamedProblem]:
    """Problems of one layout at growing window sizes, for the speedup-vs-window plots.

    CPU (fp32, B=1, H=4, D=64): 2-D 48 x 48 with windows 3..47, 3-D 12^3 with windows 3..11,
    small enough that the dense baselines finish in seconds. GPU (bf16, B=1, H=16, D=128): 2-D
    128 x 128 with windows 7..127, 3-D 32^3 with windows 3..31.
    """
    if rank not in (2, 3):
        raise ValueError(f"window sweeps exist for rank 2 and 3, not {rank}")
    cpu = device_type == "cpu"
    if rank == 2:
        extent, windows = (48, (3, 7, 13, 21, 33, 47)) if cpu else (128, (7, 15, 31, 63, 127))
    else:
        extent, windows = (12, (3, 5, 7, 9, 11)) if cpu else (32, (3, 7, 15, 31))
    heads, head_dim = (4, 64) if cpu else (16, 128)
    dtype = torch.float32 if cpu else torch.bfloat16
    return [
        _p(f"sweep-{rank}d-w{w}", (extent,) * rank, heads, head_dim, (w,) * rank, (1,) * rank,
           (1,) * rank, f"window sweep, {rank}-D", dtype=dtype)
        for w in windows
    ]
