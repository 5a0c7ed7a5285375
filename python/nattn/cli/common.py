"""Shared pieces of the CLI: problem flags, device choice, inputs, timing, and the runners of
every implementation a benchmark compares (nattn backends, PyTorch SDPA with the dense mask,
FlexAttention with the same mask)."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import perf, reference
from ..problems import NamedProblem

DTYPES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}

# Dense baselines that materialize B * H * N * (N + M) scores (the reference; SDPA when PyTorch
# picks its math path) are skipped past this many bytes, with the reason in their row. SDPA's
# fused CPU kernel (a flash kernel that takes the mask) holds only the N x (N + M) mask.
DENSE_BYTES_LIMIT = {"cpu": 2 << 30, "cuda": 24 << 30}


def best_device() -> torch.device:
    """cuda when a CUDA device is available, else cpu."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: Optional[str], device: torch.device, problem_dtype=None) -> torch.dtype:
    """The dtype flag, or by default: the problem's own dtype on CUDA, float32 on CPU (CPU
    half-precision matmuls in the baselines are emulated and would dominate every row)."""
    if name is not None and name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return problem_dtype or torch.bfloat16
    return torch.float32


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "t", "yes", "y"):
        return True
    if t in ("0", "false", "f", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a bool (true/false/1/0)")


def add_problem_args(p: argparse.ArgumentParser) -> None:
    """Problem flags shared by ``profile`` and ``sol`` (NATTEN-profiler style)."""
    g = p.add_argument_group("problem")
    g.add_argument("-i", "--input-size", type=int, nargs="+", default=None,
                   help="spatial shape, 1 to 3 extents (e.g. 56 56); required, no default")
    g.add_argument("-b", "--batch-size", type=int, default=1, help="batch size (default: 1)")
    g.add_argument("-n", "--heads", type=int, default=1, help="query heads (default: 1)")
    g.add_argument("--kv-heads", type=int, default=None,
                   help="key/value heads (default: --heads; GQA/MQA when fewer)")
    g.add_argument("-d", "--dim", type=int, default=64, help="head dim (default: 64)")
    g.add_argument("--dim-value", type=int, default=None, help="value head dim (default: --dim)")
    g.add_argument("-w", "--window-size", type=int, nargs="+", default=None,
                   help="kernel size per axis (one value: all axes); required, no default")
    g.add_argument("-s", "--stride", type=int, nargs="+", default=[1],
                   help="stride per axis, one value: all axes (default: 1)")
    g.add_argument("--dilation", type=int, nargs="+", default=[1],
                   help="dilation per axis, one value: all axes (default: 1)")
    g.add_argument("--causal", type=_bool, nargs="*", default=None,
                   help="per-axis bools; the flag alone makes every axis causal (default: no "
                        "axis causal)")
    g.add_argument("--additional-kv", type=int, default=0,
                   help="additional key/value tokens every query attends to (default: 0)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="element type (default: bfloat16 on CUDA, float32 on CPU)")


def _per_axis(values: Sequence, rank: int, name: str) -> tuple:
    values = list(values)
    if len(values) == 1:
        values = values * rank
    if len(values) != rank:
        raise SystemExit(f"error: --{name} needs 1 or {rank} values, got {len(values)}")
    return tuple(values)


def problem_from_args(args, device: torch.device) -> NamedProblem:
    """A ``NamedProblem`` named "custom" from the problem flags; exits with the window rule that
    is broken if any (checked by window.h through ``_C.axis_params_error``)."""
    if args.input_size is None or args.window_size is None:
        raise SystemExit("error: --input-size and --window-size are required")
    shape = tuple(args.input_size)
    rank = len(shape)
    if not 1 <= rank <= 3:
        raise SystemExit(f"error: --input-size needs 1 to 3 extents, got {rank}")
    causal = args.causal
    causal = (False,) * rank if causal is None else (True,) * rank if causal == [] else \
        _per_axis(causal, rank, "causal")
    problem = NamedProblem(
        name="custom", spatial_shape=shape, heads=args.heads, kv_heads=args.kv_heads or args.heads,
        head_dim=args.dim, value_dim=args.dim_value or args.dim,
        kernel_size=_per_axis(args.window_size, rank, "window-size"),
        stride=_per_axis(args.stride, rank, "stride"),
        dilation=_per_axis(args.dilation, rank, "dilation"), is_causal=causal,
        source="command line", batch=args.batch_size, num_additional=args.additional_kv,
        dtype=resolve_dtype(args.dtype, device),
    )
    check_problem(problem)
    return problem


def check_problem(problem: NamedProblem) -> None:
    from .._native import _C

    if problem.heads % problem.kv_heads:
        raise SystemExit(f"error: heads={problem.heads} must be a multiple of "
                         f"kv_heads={problem.kv_heads}")
    for a in range(problem.rank):
        err = _C.axis_params_error(problem.spatial_shape[a], problem.kernel_size[a],
                                   problem.stride[a], problem.dilation[a])
        if err:
            raise SystemExit(f"error: axis {a} (length {problem.spatial_shape[a]}, window "
                             f"{problem.kernel_size[a]}, stride {problem.stride[a]}, dilation "
                             f"{problem.dilation[a]}): {err}")


def set_threads(threads: Optional[int]) -> int:
    """Set the CPU thread count (torch's OpenMP pool, which the CPU kernels share when both use
    the system libgomp) and return the count in effect."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def build_info() -> Dict:
    """What the installed native module was built from: ``nattn/_build_info.json``, written by
    setup.py at build time (commit, date, CUDA choice, emulator); {} for a build that did not go
    through setup.py (scripts/dev_build.sh, a CMake build)."""
    import json

    path = Path(__file__).resolve().parents[1] / "_build_info.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def git_commit() -> str:
    """The commit the running package comes from: for a package run from a git checkout (a dev
    build with PYTHONPATH=python, or ``$NATTN_SOURCE_ROOT``, set by scripts that run a copy of
    the package), its short HEAD with "+dirty" when the working tree has changes; otherwise the
    commit recorded at build time (``build_info``); "unknown" when neither is known."""
    root = os.environ.get("NATTN_SOURCE_ROOT") or str(Path(__file__).resolve().parents[3])
    head = ""
    if (Path(root) / ".git").exists():
        try:
            head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True, timeout=10).stdout.strip()
            if head:
                status = subprocess.run(["git", "-C", root, "status", "--porcelain"],
                                        capture_output=True, text=True,
                                        timeout=10).stdout.strip()
                head += "+dirty" if status else ""
        except (OSError, subprocess.SubprocessError):
            head = ""
    return head or build_info().get("commit") or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from .. import _C

        isa = f", kernels: {_C.cpu_isa()}"
    except (ImportError, RuntimeError) as e:  # no native module, or a bad NATTN_CPU_ISA
        isa = f", kernels: unavailable ({e})"
    return f"{cpu} ({torch.get_num_threads()} threads{isa})"


# ---------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Bytes written before each timed GPU call so that it starts with a cold L2 (50 MB on H100,
# 60 MB on H200; 256 MB leaves none of the inputs cached on any current GPU).
L2_FLUSH_BYTES = 256 << 20


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int,
               repeats: int) -> List[float]:
    """Seconds per call of ``fn`` (CUDA events on GPU, perf_counter on CPU), after ``warmup``
    untimed calls. On GPU each timed call starts with a cold L2: a large buffer is overwritten
    just before it, outside the timed events."""
    return perf.time_calls(fn, device, warmup, repeats, flush_bytes=L2_FLUSH_BYTES)


def median(times: Sequence[float]) -> float:
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Inputs and implementations


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    add_k: Optional[torch.Tensor]
    add_v: Optional[torch.Tensor]
    grad_out: torch.Tensor

    def leaves(self, requires_grad: bool) -> List[torch.Tensor]:
        ts = [self.q, self.k, self.v] + ([] if self.add_k is None else [self.add_k, self.add_v])
        return [t.detach().requires_grad_(requires_grad) for t in ts]


def make_inputs(problem: NamedProblem, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> Inputs:
    """Random q, k, v (+ additional tokens) and an output gradient, heads-last and contiguous."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, s = problem.batch, problem.spatial_shape

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    m = problem.num_additional
    return Inputs(
        q=rnd(b, *s, problem.heads, problem.head_dim),
        k=rnd(b, *s, problem.kv_heads, problem.head_dim),
        v=rnd(b, *s, problem.kv_heads, problem.value_dim),
        add_k=rnd(b, m, problem.kv_heads, problem.head_dim) if m else None,
        add_v=rnd(b, m, problem.kv_heads, problem.value_dim) if m else None,
        grad_out=rnd(b, *s, problem.heads, problem.value_dim),
    )


@dataclass
class Impl:
    """One implementation of a problem. ``forward`` runs the forward without autograd;
    ``fwd_bwd`` runs forward and backward. A non-empty ``skip`` means it cannot run at all,
    ``bwd_skip`` that it cannot run the backward. ``setup_s``: one-time preparation that is not
    in the timed calls (FlexAttention's block mask, SDPA's dense mask)."""

    name: str
    kind: str  # "nattn", "sdpa", "flex"
    forward: Optional[Callable[[], object]] = None
    fwd_bwd: Optional[Callable[[], object]] = None
    backward_only: Optional[Callable[[], Callable[[], object]]] = None
    skip: str = ""
    bwd_skip: str = ""
    setup_s: Optional[float] = None
    notes: List[str] = field(default_factory=list)


def _dense_bytes(problem: NamedProblem, dtype: torch.dtype) -> int:
    n = problem.tokens
    elt = torch.empty((), dtype=dtype).element_size()
    return problem.batch * problem.heads * n * (n + problem.num_additional) * max(elt, 4)


def _dense_skip(problem: NamedProblem, dtype: torch.dtype, device: torch.device,
                what: str) -> str:
    need = _dense_bytes(problem, dtype)
    limit = DENSE_BYTES_LIMIT.get(device.type, DENSE_BYTES_LIMIT["cpu"])
    if need > limit:
        return (f"{what} materializes B*H*N*(N+M) scores: {need / 2**30:.1f} GiB > "
                f"{limit / 2**30:.0f} GiB limit")
    return ""


def _autograd_fns(run: Callable[[List[torch.Tensor]], torch.Tensor], inputs: Inputs):
    """(fwd+bwd callable, factory of a backward-only callable) for a function of the leaves."""

    def fwd_bwd():
        leaves = inputs.leaves(True)
        out = run(leaves)
        return torch.autograd.grad(out, leaves, inputs.grad_out)

    def backward_only():
        leaves = inputs.leaves(True)
        out = run(leaves)
        return lambda: torch.autograd.grad(out, leaves, inputs.grad_out, retain_graph=True)

    return fwd_bwd, backward_only


def nattn_impls(problem: NamedProblem, inputs: Inputs, device: torch.device,
                dtype: torch.dtype, backend_names: Optional[Sequence[str]] = None) -> List[Impl]:
    """One ``Impl`` per registered nattn backend (or the given names), in priority order."""
    import nattn
    from nattn import backends

    bproblem = backends.Problem(
        batch=problem.batch, spatial_shape=problem.spatial_shape, heads=problem.heads,
        kv_heads=problem.kv_heads, head_dim=problem.head_dim, value_dim=problem.value_dim,
        kernel_size=problem.kernel_size, stride=problem.stride, dilation=problem.dilation,
        is_causal=problem.is_causal, num_additional=problem.num_additional, dtype=dtype,
        device=device, requires_grad=False)
    impls = []
    for name in backend_names or backends.names(benchmarked_only=True):
        impl = Impl(name=f"nattn:{name}", kind="nattn")
        reasons = backends.get(name).not_supported_reasons(bproblem)
        if name == "reference" and not reasons:
            why = _dense_skip(problem, dtype, device, "the reference")
            reasons = [why] if why else []
        if reasons:
            impl.skip = "; ".join(reasons)
            impls.append(impl)
            continue

        def run(leaves, name=name):
            ak, av = (leaves[3], leaves[4]) if len(leaves) > 3 else (None, None)
            return nattn.neighborhood_attention(
                leaves[0], leaves[1], leaves[2], problem.kernel_size, problem.stride,
                problem.dilation, problem.is_causal, additional_keys=ak, additional_values=av,
                backend=name)

        fixed = inputs.leaves(False)

        def forward(run=run, fixed=fixed):
            with torch.no_grad():
                return run(fixed)

        impl.forward = forward
        impl.fwd_bwd, impl.backward_only = _autograd_fns(run, inputs)
        impls.append(impl)
    return impls


def auto_backend(problem: NamedProblem, device: torch.device, dtype: torch.dtype) -> str:
    """The backend nattn's "auto" picks for this problem."""
    from nattn import backends

    return backends.choose(backends.Problem(
        batch=problem.batch, spatial_shape=problem.spatial_shape, heads=problem.heads,
        kv_heads=problem.kv_heads, head_dim=problem.head_dim, value_dim=problem.value_dim,
        kernel_size=problem.kernel_size, stride=problem.stride, dilation=problem.dilation,
        is_causal=problem.is_causal, num_additional=problem.num_additional, dtype=dtype,
        device=device, requires_grad=False)).name


def _heads_first(t: torch.Tensor, rank: int) -> torch.Tensor:
    """[B, *spatial, H, D] -> [B, H, N, D] (a view)."""
    return t.flatten(1, rank).transpose(1, 2)


def _mask(problem: NamedProblem, device: torch.device) -> torch.Tensor:
    mask = reference.neighborhood_mask(problem.spatial_shape, problem.kernel_size,
                                       problem.stride, problem.dilation, problem.is_causal,
                                       device=device)
    if problem.num_additional:
        extra = torch.ones(mask.shape[0], problem.num_additional, dtype=torch.bool, device=device)
        mask = torch.cat([mask, extra], dim=1)
    return mask


def _sdpa_backend(device: torch.device, dtype: torch.dtype, gqa: bool) -> Optional[str]:
    """Name of the SDPA kernel PyTorch picks for a boolean-masked call of this dtype on this
    device (``torch.nn.attention.SDPBackend`` member name), or None when PyTorch cannot say
    (``torch._fused_sdp_choice`` is private and may change)."""
    try:
        from torch.nn.attention import SDPBackend

        q = torch.zeros(1, 2, 16, 16, dtype=dtype, device=device)
        kv = q[:, :1] if gqa else q
        mask = torch.ones(16, 16, dtype=torch.bool, device=device)
        choice = torch._fused_sdp_choice(q, kv, kv, attn_mask=mask, enable_gqa=gqa)
        return SDPBackend(choice).name
    except Exception:  # noqa: BLE001 - any failure means "unknown", the conservative answer
        return None


def sdpa_impl(problem: NamedProblem, inputs: Inputs, device: torch.device,
              dtype: torch.dtype) -> Impl:
    """PyTorch ``scaled_dot_product_attention`` on [B, H, N, D] views with the dense boolean
    neighborhood mask (built once, not timed: ``setup_s``)."""
    impl = Impl(name="sdpa-dense-mask", kind="sdpa")
    n = problem.tokens
    if n * (n + problem.num_additional) > 2**31:
        impl.skip = f"dense mask of {n} x {n + problem.num_additional} exceeds 2^31 entries"
        return impl
    gqa = problem.heads != problem.kv_heads
    backend = _sdpa_backend(device, dtype, gqa)
    if device.type == "cpu" and backend != "FLASH_ATTENTION":
        why = _dense_skip(problem, dtype, device, "SDPA with a dense mask")
        if why:
            impl.skip = why
            return impl
    t0 = time.perf_counter()
    mask = _mask(problem, device)
    synchronize(device)
    impl.setup_s = time.perf_counter() - t0
    rank = problem.rank
    scale = problem.head_dim**-0.5
    if backend is not None:
        impl.notes.append(f"SDPA kernel: {backend.lower()}")

    def run(leaves):
        q, k, v = (_heads_first(t, rank) for t in leaves[:3])
        if len(leaves) > 3:
            k = torch.cat([k, leaves[3].transpose(1, 2)], dim=2)
            v = torch.cat([v, leaves[4].transpose(1, 2)], dim=2)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2).unflatten(1, problem.spatial_shape)

    fixed = inputs.leaves(False)

    def forward():
        with torch.no_grad():
            return run(fixed)

    impl.forward = forward
    impl.fwd_bwd, impl.backward_only = _autograd_fns(run, inputs)
    if problem.num_additional:
        impl.notes.append("additional tokens concatenated inside the timed call")
    return impl


def neighborhood_mask_mod(problem: NamedProblem):
    """A FlexAttention ``mask_mod`` for the problem, from ``reference.in_window`` (keys at
    flat index >= N are the additional tokens, always attended)."""
    shape, n = problem.spatial_shape, problem.tokens

    def mask_mod(b, h, q_idx, kv_idx):
        kv = torch.clamp(kv_idx, max=n - 1)
        qc = reference.unravel(q_idx, shape)
        kc = reference.unravel(kv, shape)
        keep = kv_idx >= n
        inside = None
        for a, length in enumerate(shape):
            w = reference.in_window(qc[a], kc[a], length, problem.kernel_size[a],
                                    problem.stride[a], problem.dilation[a],
                                    bool(problem.is_causal[a]))
            inside = w if inside is None else inside & w
        return keep | inside

    return mask_mod


def flex_impl(problem: NamedProblem, inputs: Inputs, device: torch.device,
              dtype: torch.dtype, form: str = "arith", mask_mod=None) -> Impl:
    """FlexAttention (``torch.compile``d) with a block mask built by ``create_block_mask`` from
    ``mask_mod`` (default ``neighborhood_mask_mod``; ``form`` names it, ``cli/peers.py`` has the
    other forms). Mask building is ``setup_s``; the first, compiling call is in the warm-up."""
    impl = Impl(name=f"flex:{form}", kind="flex")
    mask_mod = mask_mod or neighborhood_mask_mod(problem)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        impl.skip = f"FlexAttention unavailable in torch {torch.__version__}: {exc}"
        return impl
    # A fresh compile per problem: a benchmark run compiles one kernel per shape and mask, and
    # past dynamo's recompile limit (8) flex_attention silently falls back to an unfused
    # implementation that materializes the scores.
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    n = problem.tokens
    try:
        t0 = time.perf_counter()
        # On GPU the mask is built compiled (torch's _compile knob), which evaluates it block by
        # block instead of materializing N x (N + M) booleans: 13 GB at hunyuan-video's size.
        block_mask = create_block_mask(mask_mod, None, None, n,
                                       n + problem.num_additional, device=str(device),
                                       _compile=device.type == "cuda")
        synchronize(device)
        impl.setup_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001  (any failure becomes the row's reason)
        impl.skip = f"create_block_mask failed: {type(exc).__name__}: {str(exc)[:200]}"
        return impl
    rank = problem.rank
    gqa = problem.heads != problem.kv_heads
    scale = problem.head_dim**-0.5

    def run(leaves):
        q, k, v = (_heads_first(t, rank) for t in leaves[:3])
        if len(leaves) > 3:
            k = torch.cat([k, leaves[3].transpose(1, 2)], dim=2)
            v = torch.cat([v, leaves[4].transpose(1, 2)], dim=2)
        out = compiled(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2).unflatten(1, problem.spatial_shape)

    fixed = inputs.leaves(False)

    def forward():
        with torch.no_grad():
            return run(fixed)

    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            forward()
        synchronize(device)
        impl.notes.append(f"first call (compile) {time.perf_counter() - t0:.1f} s")
        if any("without torch.compile" in str(w.message) for w in caught):
            impl.skip = "flex_attention fell back to its unfused implementation (not compiled)"
            return impl
    except Exception as exc:  # noqa: BLE001
        impl.skip = f"flex_attention failed on {device.type}: {type(exc).__name__}: " \
                    f"{str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return impl
    impl.forward = forward
    if device.type == "cpu":
        impl.bwd_skip = "FlexAttention has no backward on CPU (torch raises NotImplementedError)"
    else:
        impl.fwd_bwd, impl.backward_only = _autograd_fns(run, inputs)
    return impl


def measure(impl: Impl, device: torch.device, warmup: int, repeats: int,
            backward: bool) -> Dict:
    """Median seconds of ``impl``'s forward (and forward+backward), with the error text when a
    call fails; on CUDA also the peak memory above what was allocated before the calls."""
    row: Dict = {"impl": impl.name, "kind": impl.kind, "status": "ok", "reason": impl.skip,
                 "setup_s": impl.setup_s, "notes": list(impl.notes)}
    if impl.skip:
        row["status"] = "skipped"
        return row
    cuda = device.type == "cuda"
    for key, fn, skip in (("fwd", impl.forward, ""),
                          ("fwd_bwd", impl.fwd_bwd if backward else None, impl.bwd_skip)):
        if key == "fwd_bwd" and not backward:
            continue
        if skip or fn is None:
            row[f"{key}_reason"] = skip or "not available"
            continue
        try:
            if cuda:
                torch.cuda.synchronize(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            times = time_calls(fn, device, warmup, repeats)
            row[f"{key}_s"] = median(times)
            row[f"{key}_times"] = times
            if cuda:
                row[f"{key}_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        except Exception as exc:  # noqa: BLE001  (a failing implementation is a row, not a crash)
            row[f"{key}_reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" \
                if str(exc) else type(exc).__name__
            if key == "fwd":
                row["status"] = "error"
                row["reason"] = row["fwd_reason"]
    return row


def flops_rate_unit(device: torch.device):
    """(divisor, label) for FLOP/s columns: TFLOP/s on GPU, GFLOP/s on CPU."""
    return (1e12, "TFLOP/s") if device.type == "cuda" else (1e9, "GFLOP/s")


def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_count(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def dataclass_problem_dict(problem: NamedProblem) -> Dict:
    return {
        "name": problem.name, "spatial_shape": list(problem.spatial_shape),
        "batch": problem.batch, "heads": problem.heads, "kv_heads": problem.kv_heads,
        "head_dim": problem.head_dim, "value_dim": problem.value_dim,
        "kernel_size": list(problem.kernel_size), "stride": list(problem.stride),
        "dilation": list(problem.dilation), "is_causal": list(problem.is_causal),
        "num_additional": problem.num_additional, "tokens": problem.tokens,
        "describe": problem.describe(),
    }

