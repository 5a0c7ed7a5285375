"""``natten.functional`` on nattn: NATTEN's current functional API (0.20+: ``na1d/na2d/na3d``,
``neighborhood_attention_generic``, ``attention``, ``merge_attentions``) and its legacy unfused
ops (0.17's ``na*d_qk`` / ``na*d_av`` and the older ``natten*dqkrpb`` / ``natten*dqk`` /
``natten*dav``), with NATTEN's names, argument orders and layouts. See docs/natten.md."""

from __future__ import annotations

from typing import List, Optional

import torch

from ... import functional as _nf
from ... import merge as _merge
from .. import _unfused
from . import _args

__all__ = [
    "na1d", "na2d", "na3d", "neighborhood_attention_generic", "attention", "merge_attentions",
    "na1d_qk", "na1d_av", "na2d_qk", "na2d_av", "na3d_qk", "na3d_av",
    "natten1dqkrpb", "natten1dqk", "natten1dav", "natten2dqkrpb", "natten2dqk", "natten2dav",
    "natten3dqkrpb", "natten3dqk", "natten3dav",
]

_HINTS_DOC = """
    NATTEN's tuning keywords (``q_tile_shape``, ``kv_tile_shape``, ``backward_q_tile_shape``,
    ``backward_kv_tile_shape``, ``backward_kv_splits``, ``backward_use_pt_reduction``,
    ``run_persistent_kernel``, ``kernel_schedule``, ``torch_compile``, ``attention_kwargs``) are
    accepted and type-checked, and ignored: nattn's planner picks tiles and schedules, and no
    hint changes the result. ``backend`` takes NATTEN's names (mapped as in
    ``nattn.compat.natten._args.BACKENDS``; ``None`` = ``"auto"``) or nattn's own.
    ``is_causal=None`` means not causal. ``rpb`` (keyword, a nattn extension of this API) is a
    relative positional bias ``[H, 2*K_0-1, ...]`` fused into the kernels (NATTEN 0.17
    semantics, DESIGN.md section 7).
"""


def neighborhood_attention_generic(
    query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
    additional_keys=None, additional_values=None, attention_kwargs=None, backend=None,
    q_tile_shape=None, kv_tile_shape=None, backward_q_tile_shape=None,
    backward_kv_tile_shape=None, backward_kv_splits=None, backward_use_pt_reduction=False,
    run_persistent_kernel=True, kernel_schedule=None, torch_compile=False, return_lse=False,
    *, rpb: Optional[torch.Tensor] = None, _rank: Optional[int] = None,
):
    """NATTEN's ``neighborhood_attention_generic``: ``nattn.neighborhood_attention`` with
    NATTEN's argument names; q/k/v heads-last ``[B, *spatial, H, D]``, additional tokens
    ``[B, M, H_kv, D]``. Returns ``out`` or ``(out, lse)``. Raises what
    ``nattn.neighborhood_attention`` raises, and TypeError for a hint of the wrong kind.
    """
    _args.tuning_hints(
        attention_kwargs=attention_kwargs, q_tile_shape=q_tile_shape, kv_tile_shape=kv_tile_shape,
        backward_q_tile_shape=backward_q_tile_shape,
        backward_kv_tile_shape=backward_kv_tile_shape, backward_kv_splits=backward_kv_splits,
        backward_use_pt_reduction=backward_use_pt_reduction,
        run_persistent_kernel=run_persistent_kernel, kernel_schedule=kernel_schedule,
        torch_compile=torch_compile,
    )
    fn = _nf.neighborhood_attention if _rank is None else getattr(_nf, f"na{_rank}d")
    extra = {} if rpb is None else {"rpb": rpb.to(query.dtype)}
    name = _args.backend(backend)
    try:
        return fn(query, key, value, kernel_size, stride, dilation, _args.causal(is_causal),
                  scale, additional_keys, additional_values, return_lse, name, **extra)
    except ValueError as exc:
        if name == backend or backend is None or "backend=" not in str(exc):
            raise
        raise ValueError(f"backend={backend!r} (NATTEN's name for nattn's {name!r}): {exc}") \
            from None


neighborhood_attention_generic.__doc__ += _HINTS_DOC


def _ranked(rank: int):
    def na(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
           additional_keys=None, additional_values=None, attention_kwargs=None, backend=None,
           q_tile_shape=None, kv_tile_shape=None, backward_q_tile_shape=None,
           backward_kv_tile_shape=None, backward_kv_splits=None, backward_use_pt_reduction=False,
           run_persistent_kernel=True, kernel_schedule=None, torch_compile=False,
           return_lse=False, *, rpb=None):
        return neighborhood_attention_generic(
            query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
            additional_values, attention_kwargs, backend, q_tile_shape, kv_tile_shape,
            backward_q_tile_shape, backward_kv_tile_shape, backward_kv_splits,
            backward_use_pt_reduction, run_persistent_kernel, kernel_schedule, torch_compile,
            return_lse, rpb=rpb, _rank=rank,
        )

    na.__name__ = na.__qualname__ = f"na{rank}d"
    na.__doc__ = (
        f"NATTEN's ``na{rank}d`` (0.20+ signature): ``nattn.na{rank}d`` on heads-last inputs "
        f"``[B, {', '.join(f'X{i}' for i in range(rank))}, H, D]``." + _HINTS_DOC
    )
    return na


na1d, na2d, na3d = _ranked(1), _ranked(2), _ranked(3)


def _varlen_bounds(name_q, seqlens_q, name_kv, seqlens_kv, cu_q, cu_kv, max_q, max_kv, total_q,
                   total_kv):
    """(query start, query end, kv start, kv end) of every sequence of a packed batch."""
    given_lens = seqlens_q is not None or seqlens_kv is not None
    given_cu = any(x is not None for x in (cu_q, cu_kv, max_q, max_kv))
    if given_lens and given_cu:
        raise ValueError("give either seqlens_Q/seqlens_KV or cumulative_seqlen_{Q,KV} with "
                         "max_seqlen_{Q,KV}, not both")
    if given_lens:
        if seqlens_q is None or seqlens_kv is None:
            raise ValueError("seqlens_Q and seqlens_KV must be given together")
        lens = []
        for name, t in ((name_q, seqlens_q), (name_kv, seqlens_kv)):
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point():
                raise ValueError(f"{name} must be a 1-D integer tensor, got {t!r}")
            lens.append(t.tolist())
        if len(lens[0]) != len(lens[1]):
            raise ValueError(f"seqlens_Q has {len(lens[0])} entries, seqlens_KV {len(lens[1])}")
        cq, ckv = [0], [0]
        for a, b in zip(*lens):
            cq.append(cq[-1] + a)
            ckv.append(ckv[-1] + b)
    else:
        if any(x is None for x in (cu_q, cu_kv, max_q, max_kv)):
            raise ValueError("cumulative_seqlen_Q, cumulative_seqlen_KV, max_seqlen_Q and "
                             "max_seqlen_KV must be given together")
        for name, t in (("cumulative_seqlen_Q", cu_q), ("cumulative_seqlen_KV", cu_kv)):
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point():
                raise ValueError(f"{name} must be a 1-D integer tensor, got {t!r}")
        cq, ckv = cu_q.tolist(), cu_kv.tolist()
        if len(cq) != len(ckv) or len(cq) < 2 or cq[0] != 0 or ckv[0] != 0:
            raise ValueError("cumulative_seqlen_Q and cumulative_seqlen_KV must both be "
                             "[0, ...] of length batch + 1")
    for name, c, total in (("Q", cq, total_q), ("KV", ckv, total_kv)):
        if any(b < a for a, b in zip(c, c[1:])) or c[-1] != total:
            raise ValueError(
                f"sequence lengths of {name} must be >= 0 and add up to the packed length "
                f"{total}, got cumulative {c}"
            )
    return [(cq[i], cq[i + 1], ckv[i], ckv[i + 1]) for i in range(len(cq) - 1)]


def _dense(q, k, v, is_causal, scale):
    """Plain attention for a query length other than the key length (nattn's kernels run
    self-shaped problems only): scores materialized, ``[B, S, H, D]`` -> (out, lse fp32)."""
    if is_causal:
        raise NotImplementedError(
            f"attention(is_causal=True) with {q.shape[1]} queries and {k.shape[1]} keys: nattn "
            "runs causal attention for equal query and key lengths only (nattn.na1d with "
            "kernel_size = length, is_causal=True)"
        )
    group = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group, dim=2) if group > 1 else t for t in (k, v))
    scores = torch.einsum("bshd,bthd->bhst", q, k) * scale
    lse = torch.logsumexp(scores.float() if q.dtype != torch.float64 else scores, dim=-1)
    out = torch.einsum("bhst,bthd->bshd", torch.softmax(scores, dim=-1), v)
    return out, lse.transpose(1, 2).to(torch.float32)


def _attention_one(q, k, v, is_causal, scale, backend):
    if q.shape[1] == k.shape[1] and q.shape[1] > 0:
        # Self-shaped: attention is neighborhood attention with the window = the sequence.
        return _nf.na1d(q, k, v, q.shape[1], 1, 1, is_causal, scale, return_lse=True,
                        backend=backend)
    return _dense(q, k, v, is_causal, scale if scale is not None else q.shape[-1] ** -0.5)


def attention(
    query, key, value, is_causal=False, scale=None, seqlens_Q=None, seqlens_KV=None,
    cumulative_seqlen_Q=None, cumulative_seqlen_KV=None, max_seqlen_Q=None, max_seqlen_KV=None,
    backend=None, q_tile_size=None, kv_tile_size=None, backward_q_tile_size=None,
    backward_kv_tile_size=None, backward_kv_splits=None, backward_use_pt_reduction=False,
    run_persistent_kernel=True, kernel_schedule=None, torch_compile=False, return_lse=False,
):
    """NATTEN's ``attention``: plain (optionally causal) dot-product attention, heads-last
    ``query [B, S, H, D]``, ``key [B, S_kv, H_kv, D]``, ``value [B, S_kv, H_kv, D_v]``
    (GQA: ``H % H_kv == 0``). Returns ``out [B, S, H, D_v]`` or ``(out, lse [B, S, H] fp32)``.

    With ``S == S_kv`` it runs on nattn's kernels as 1-D neighborhood attention whose window is
    the whole sequence (``is_causal`` gives the causal mask). With ``S != S_kv`` (cross
    attention) it runs as materialized torch math (``O(S * S_kv)`` memory); causal cross
    attention raises NotImplementedError.

    Varlen (NATTEN's sequence-packed layout, batch 1): ``seqlens_Q`` and ``seqlens_KV``, or
    ``cumulative_seqlen_Q``/``cumulative_seqlen_KV`` (``[0, ...]``, length batch + 1) with
    ``max_seqlen_Q``/``max_seqlen_KV``; each sequence attends within itself only. The tuning
    keywords are type-checked hints with no effect; ``backend`` maps as for ``na*d``.

    Raises:
        ValueError: bad shapes or varlen arguments (inconsistent, not summing to the packed
            length, batch != 1), or what ``nattn.na1d`` raises.
        NotImplementedError: causal attention with ``S != S_kv``.
        TypeError: a hint of the wrong kind.
    """
    _args.tuning_hints(
        q_tile_shape=q_tile_size, kv_tile_shape=kv_tile_size,
        backward_q_tile_shape=backward_q_tile_size, backward_kv_tile_shape=backward_kv_tile_size,
        backward_kv_splits=backward_kv_splits, backward_use_pt_reduction=backward_use_pt_reduction,
        run_persistent_kernel=run_persistent_kernel, kernel_schedule=kernel_schedule,
        torch_compile=torch_compile,
    )
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, seqlen, heads, head_dim], "
                             f"got {getattr(t, 'shape', t)!r}")
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(f"key.shape={tuple(key.shape)} and value.shape={tuple(value.shape)} "
                         "must agree in batch, seqlen and heads")
    if query.shape[0] != key.shape[0]:
        raise ValueError(f"query batch {query.shape[0]} != key batch {key.shape[0]}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse={return_lse!r} must be a bool")
    is_causal = bool(_args.causal(is_causal))
    name = _args.backend(backend)
    varlen = any(x is not None for x in (seqlens_Q, seqlens_KV, cumulative_seqlen_Q,
                                         cumulative_seqlen_KV, max_seqlen_Q, max_seqlen_KV))
    if not varlen:
        out, lse = _attention_one(query, key, value, is_causal, scale, name)
        return (out, lse) if return_lse else out
    if query.shape[0] != 1:
        raise ValueError(f"varlen attention takes the sequence-packed layout with batch 1, got "
                         f"query.shape={tuple(query.shape)}")
    bounds = _varlen_bounds("seqlens_Q", seqlens_Q, "seqlens_KV", seqlens_KV,
                            cumulative_seqlen_Q, cumulative_seqlen_KV, max_seqlen_Q,
                            max_seqlen_KV, query.shape[1], key.shape[1])
    outs, lses = [], []
    for q0, q1, k0, k1 in bounds:
        if q1 == q0:
            continue
        if k1 == k0:
            raise ValueError(f"a sequence with {q1 - q0} queries has no keys (kv range "
                             f"{k0}:{k1}): its softmax would be empty")
        o, l = _attention_one(query[:, q0:q1], key[:, k0:k1], value[:, k0:k1], is_causal, scale,
                              name)
        outs.append(o)
        lses.append(l)
    out, lse = torch.cat(outs, dim=1), torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out


def merge_attentions(outputs: List[torch.Tensor], lse_tensors: List[torch.Tensor],
                     torch_compile: bool = True, use_autograd_fix: bool = True):
    """NATTEN's ``merge_attentions``: ``nattn.merge_attentions(outputs, lse_tensors)``, which
    returns ``(output, lse)``. Plain autograd gives the exact gradients, so
    ``use_autograd_fix`` and ``torch_compile`` are accepted hints without effect."""
    _args.tuning_hints(torch_compile=torch_compile, backward_use_pt_reduction=use_autograd_fix)
    return _merge.merge_attentions(list(outputs), list(lse_tensors))


# ---- NATTEN 0.17's unfused ops (heads-first [B, H, *spatial, D]) ----------------------------

_QK_DOC = """NATTEN 0.17's ``{name}``: unfused scores of {rank}-D neighborhood attention.

    ``attn[b, h, *i, t] = query_i . key_(j_t(i)) + rpb[h, (j_t - i) / dilation + K - 1]`` for
    the window slots t of query i in row-major order (last axis fastest), then
    ``query_i . additional_keys[b, h, m]``. Neither scale nor softmax is applied (callers scale
    ``query`` first). Slots outside a causal window are ``-inf``. Any even or odd kernel size,
    RPB with causal axes included (NATTEN rejected those; nattn's definition covers them).

    Args:
        query, key: ``[B, H, *spatial, D]`` ({rank} spatial axes), one dtype and device.
        kernel_size, dilation: int or one per axis; ``K * d <= length``.
        additional_keys: ``[B, H, M, D]`` or None.
        is_causal: bool or one per axis (None: False).
        rpb: ``[H, 2*K-1 per axis]`` or None; cast to query's dtype.

    Returns: ``[B, H, *spatial, prod(K) + M]``, differentiable in query, key, rpb and
    additional_keys.

    Raises: TypeError / ValueError naming the argument for bad types, shapes or windows.
"""

_AV_DOC = """NATTEN 0.17's ``{name}``: applies unfused {rank}-D attention weights to values.

    ``out_i = sum_t attn[i, t] value_(j_t(i)) + sum_m attn[i, prod(K) + m]
    additional_values[b, h, m]``; masked causal slots contribute nothing.

    Args:
        attn: ``[B, H, *spatial, prod(K) + M]`` (cast to value's dtype).
        value: ``[B, H, *spatial, D]``.
        kernel_size, dilation, is_causal: as for the matching ``qk``.
        additional_values: ``[B, H, M, D]`` or None.

    Returns: ``[B, H, *spatial, D]``, differentiable in attn, value and additional_values.

    Raises: TypeError / ValueError naming the argument for bad types, shapes or windows.
"""


def _legacy_pair(rank: int):
    def qk(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None):
        return _unfused.qk(f"na{rank}d_qk", rank, query, key, kernel_size, dilation,
                           additional_keys, is_causal, rpb)

    def av(attn, value, kernel_size, dilation=1, additional_values=None, is_causal=False):
        return _unfused.av(f"na{rank}d_av", rank, attn, value, kernel_size, dilation,
                           additional_values, is_causal)

    for fn, kind, doc in ((qk, "qk", _QK_DOC), (av, "av", _AV_DOC)):
        fn.__name__ = fn.__qualname__ = f"na{rank}d_{kind}"
        fn.__doc__ = doc.format(name=fn.__name__, rank=rank)
    return qk, av


na1d_qk, na1d_av = _legacy_pair(1)
na2d_qk, na2d_av = _legacy_pair(2)
na3d_qk, na3d_av = _legacy_pair(3)


# The pre-0.17.5 names take one int kernel size and dilation for all axes (the 3-D forms one
# for the depth axis and one for the two others).
def natten1dqkrpb(query, key, rpb, kernel_size: int, dilation: int):
    """NATTEN's ``natten1dqkrpb(query, key, rpb, kernel_size, dilation)`` = ``na1d_qk``."""
    return na1d_qk(query, key, kernel_size, dilation, rpb=rpb)


def natten1dqk(query, key, kernel_size: int, dilation: int):
    """NATTEN's ``natten1dqk`` = ``na1d_qk`` without bias."""
    return na1d_qk(query, key, kernel_size, dilation)


def natten1dav(attn, value, kernel_size: int, dilation: int):
    """NATTEN's ``natten1dav`` = ``na1d_av``."""
    return na1d_av(attn, value, kernel_size, dilation)


def natten2dqkrpb(query, key, rpb, kernel_size: int, dilation: int):
    """NATTEN's ``natten2dqkrpb(query, key, rpb, kernel_size, dilation)``: ``na2d_qk`` with a
    square kernel and dilation."""
    return na2d_qk(query, key, (kernel_size,) * 2, (dilation,) * 2, rpb=rpb)


def natten2dqk(query, key, kernel_size: int, dilation: int):
    """NATTEN's ``natten2dqk`` = ``natten2dqkrpb`` without bias."""
    return na2d_qk(query, key, (kernel_size,) * 2, (dilation,) * 2)


def natten2dav(attn, value, kernel_size: int, dilation: int):
    """NATTEN's ``natten2dav`` = ``na2d_av`` with a square kernel and dilation."""
    return na2d_av(attn, value, (kernel_size,) * 2, (dilation,) * 2)


def natten3dqkrpb(query, key, rpb, kernel_size_d: int, kernel_size: int, dilation_d: int,
                  dilation: int):
    """NATTEN's ``natten3dqkrpb(query, key, rpb, kernel_size_d, kernel_size, dilation_d,
    dilation)``: ``na3d_qk`` with kernel ``(kernel_size_d, kernel_size, kernel_size)`` and
    dilation ``(dilation_d, dilation, dilation)``."""
    return na3d_qk(query, key, (kernel_size_d, kernel_size, kernel_size),
                   (dilation_d, dilation, dilation), rpb=rpb)


def natten3dqk(query, key, kernel_size_d: int, kernel_size: int, dilation_d: int, dilation: int):
    """NATTEN's ``natten3dqk`` = ``natten3dqkrpb`` without bias."""
    return na3d_qk(query, key, (kernel_size_d, kernel_size, kernel_size),
                   (dilation_d, dilation, dilation))


def natten3dav(attn, value, kernel_size_d: int, kernel_size: int, dilation_d: int, dilation: int):
    """NATTEN's ``natten3dav``: ``na3d_av`` with the 3-D kernel/dilation of ``natten3dqkrpb``."""
    return na3d_av(attn, value, (kernel_size_d, kernel_size, kernel_size),
                   (dilation_d, dilation, dilation))
