"""The up-front check of a context-parallel call: one ``all_gather_object`` of each rank's
shapes, dtypes and arguments, then the same rules evaluated on every rank, so that a bad call
raises the same error on every rank instead of leaving some of them waiting in an exchange.

Nothing here raises before the collective: a rank whose inputs are malformed still takes part,
describing what it got.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import _checks
from ._plan import STRATEGIES, Layout

_TENSORS = ("query", "key", "value", "additional_keys", "additional_values")
# arguments that must be identical on every rank (compared by repr)
_ARGS = ("kernel_size", "stride", "dilation", "is_causal", "scale", "return_lse", "backend",
         "axis", "strategy")


def _describe(tensors: Dict[str, object], args: Dict[str, object]) -> Dict:
    desc = {"tensors": {}, "args": {name: repr(value) for name, value in args.items()},
            "requires_grad": False, "grad": {}}
    for name, t in tensors.items():
        if t is None:
            desc["tensors"][name] = None
        elif isinstance(t, torch.Tensor):
            desc["tensors"][name] = (tuple(t.shape), str(t.dtype), t.device.type)
            grad = bool(torch.is_grad_enabled() and t.requires_grad)
            desc["requires_grad"] = desc["requires_grad"] or grad
            desc["grad"][name] = grad
        else:
            desc["tensors"][name] = type(t).__name__
    return desc


class _Fail(Exception):
    pass


def _raise(exc_type, rank: Optional[int], message: str):
    where = f"rank {rank}: " if rank is not None else ""
    raise exc_type(f"nattn.distributed.neighborhood_attention: {where}{message}")


def check_call(query, key, value, additional_keys, additional_values, *, kernel_size, stride,
               dilation, is_causal, scale, return_lse, backend, axis, strategy,
               group) -> Tuple[Layout, _checks.NAArgs]:
    """Validate a call on every rank of ``group`` (collective) and return the global layout and
    the normalized window arguments. Raises the same ``TypeError``/``ValueError`` on every rank,
    naming the first offending rank and the rule."""
    tensors = dict(zip(_TENSORS, (query, key, value, additional_keys, additional_values)))
    args = dict(kernel_size=kernel_size, stride=stride, dilation=dilation, is_causal=is_causal,
                scale=scale, return_lse=return_lse, backend=backend, axis=axis,
                strategy=strategy)
    world = dist.get_world_size(group)
    gathered: List[Dict] = [None] * world
    dist.all_gather_object(gathered, _describe(tensors, args), group=group)
    return _evaluate(gathered, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                     additional_values, axis, strategy, return_lse)


def _evaluate(gathered, kernel_size, stride, dilation, is_causal, scale, additional_keys,
              additional_values, axis, strategy, return_lse):
    first = gathered[0]
    for r, desc in enumerate(gathered):
        for name in ("query", "key", "value"):
            if not isinstance(desc["tensors"][name], tuple):
                _raise(TypeError, r, f"{name} must be a torch.Tensor, got "
                       f"{desc['tensors'][name]}")
        for name in ("additional_keys", "additional_values"):
            got = desc["tensors"][name]
            if got is not None and not isinstance(got, tuple):
                _raise(TypeError, r, f"{name} must be a torch.Tensor or None, got {got}")
    for r, desc in enumerate(gathered):
        for name in _ARGS:
            if desc["args"][name] != first["args"][name]:
                _raise(ValueError, r, f"{name}={desc['args'][name]} differs from rank 0's "
                       f"{name}={first['args'][name]}: every rank must pass the same arguments")
    for r, desc in enumerate(gathered):
        for name, grad in desc["grad"].items():
            if grad != first["grad"].get(name, grad):
                _raise(ValueError, r, f"{name} {'requires' if grad else 'does not require'} grad "
                       f"here but {'does' if first['grad'][name] else 'does not'} on rank 0: the "
                       "backward is collective, so every rank or none must differentiate it")
    if strategy not in STRATEGIES:
        _raise(ValueError, None, f"strategy={strategy!r} must be one of {', '.join(STRATEGIES)}")
    if not isinstance(return_lse, bool):
        _raise(TypeError, None, f"return_lse={return_lse!r} must be a bool")
    q0 = first["tensors"]["query"][0]
    if not 4 <= len(q0) <= 6:
        _raise(ValueError, 0, f"query.shape={q0} must have 4 to 6 dims "
               "[batch, 1-3 spatial axes, heads, head_dim]")
    spatial_rank = len(q0) - 3
    if isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis < spatial_rank:
        _raise(ValueError, None, f"axis={axis!r} must be a spatial axis of the layout, an int in "
               f"[0, {spatial_rank}) for query.shape={q0} (axis 0 is the first spatial axis)")
    dim = axis + 1
    lengths = []
    for r, desc in enumerate(gathered):
        shapes = {n: desc["tensors"][n] for n in _TENSORS if desc["tensors"][n] is not None}
        for name, (shape, dtype, device) in shapes.items():
            ref = first["tensors"].get(name)
            if ref is None:
                _raise(ValueError, r, f"{name} is given here but not on rank 0: additional "
                       "tokens must be given on every rank or on none")
            ref_shape, ref_dtype, ref_device = ref
            if len(shape) != len(ref_shape):
                _raise(ValueError, r, f"{name}.shape={shape} has {len(shape)} dims but rank 0's "
                       f"is {ref_shape}: every rank holds a slab of the same layout")
            sharded = name in ("query", "key", "value")
            other = [i for i in range(len(shape)) if not (sharded and i == dim)]
            if any(shape[i] != ref_shape[i] for i in other):
                what = (f"all dims except the sharded axis {axis} (tensor dim {dim})" if sharded
                        else "all dims (additional tokens are replicated on every rank)")
                _raise(ValueError, r, f"{name}.shape={shape} differs from rank 0's {ref_shape} "
                       f"in {what}")
            if dtype != ref_dtype:
                _raise(ValueError, r, f"{name}.dtype={dtype} differs from rank 0's {ref_dtype}: "
                       "every rank must use the same dtype")
            if device != ref_device:
                _raise(ValueError, r, f"{name} is on a {device} device but rank 0's on "
                       f"{ref_device}")
        for name in ("additional_keys", "additional_values"):
            if first["tensors"][name] is not None and desc["tensors"][name] is None:
                _raise(ValueError, r, f"{name} is missing here but given on rank 0: additional "
                       "tokens must be given on every rank or on none")
        n = desc["tensors"]["query"][0][dim]
        for name in ("key", "value"):
            if desc["tensors"][name][0][dim] != n:
                _raise(ValueError, r, f"{name}.shape={desc['tensors'][name][0]} has "
                       f"{desc['tensors'][name][0][dim]} rows along the sharded axis {axis} but "
                       f"query has {n}")
        if n < 1:
            _raise(ValueError, r, f"query.shape={desc['tensors']['query'][0]}: the slab along "
                   f"the sharded axis {axis} is empty; every rank must hold at least one row")
        lengths.append(n)
    # The global call, checked by the single-process rules on meta tensors of the global shape.
    def meta(name, shape_override=None):
        got = first["tensors"][name]
        if got is None:
            return None
        shape = list(got[0])
        if shape_override is not None:
            shape[dim] = shape_override
        return torch.empty(shape, dtype=getattr(torch, got[1].replace("torch.", "")),
                           device="meta")

    total = sum(lengths)
    try:
        na_args = _checks.normalize(meta("query", total), meta("key", total),
                                    meta("value", total), kernel_size, stride, dilation,
                                    is_causal, scale, meta("additional_keys"),
                                    meta("additional_values"))
    except (TypeError, ValueError) as exc:
        _raise(type(exc), None, f"the global layout (slabs {lengths} along axis {axis}): {exc}")
    q_shape, k_shape, v_shape = (first["tensors"][n][0] for n in ("query", "key", "value"))
    spatial = list(q_shape[1:-2])
    spatial[axis] = total
    num_additional = 0 if na_args.additional_keys is None else \
        first["tensors"]["additional_keys"][0][1]
    element_size = torch.empty((), dtype=getattr(torch, first["tensors"]["query"][1]
                                                 .replace("torch.", ""))).element_size()
    layout = Layout(
        lengths=tuple(lengths), axis=axis, spatial_shape=tuple(spatial), batch=q_shape[0],
        heads=q_shape[-2], kv_heads=k_shape[-2], head_dim=q_shape[-1], value_dim=v_shape[-1],
        num_additional=num_additional, kernel_size=na_args.kernel_size, stride=na_args.stride,
        dilation=na_args.dilation, is_causal=na_args.is_causal, element_size=element_size,
        return_lse=return_lse, requires_grad=any(d["requires_grad"] for d in gathered))
    return layout, na_args
