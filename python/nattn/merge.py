"""``merge_attentions``: combine partial attentions over disjoint key sets by their lse."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

__all__ = ["merge_attentions"]


def merge_attentions(
    outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge attention outputs of one query set over disjoint key/value sets into the output the
    concatenated keys/values would give.

    With partial outputs ``o_p`` and log-sum-exps ``l_p`` (natural log of the scaled scores,
    as ``return_lse=True`` returns them): ``l = log(sum_p exp(l_p))`` and
    ``o = sum_p exp(l_p - l) * o_p``. This is the merge step of split-KV / flash-decoding and of
    context parallelism (Milakov and Gimelshein, "Online normalizer calculation for softmax",
    arXiv 1805.02867). It is plain differentiable torch code: gradients flow into every
    ``o_p`` and ``l_p``, so when the parts come from ``nattn.neighborhood_attention(...,
    return_lse=True)`` the gradients equal those of one attention over all keys.

    Args:
        outputs: two or more tensors ``[B, *tokens, H, D]`` of one shape (any number of token
            axes), each of dtype float16, bfloat16, float32 or float64, on one device.
        lses: as many tensors ``[B, *tokens, H]`` (the outputs' shape less the last axis), any
            floating dtype. A part whose lse is -inf for a query (no keys) contributes nothing.

    Returns:
        ``(out, lse)``: ``out`` in the dtype of ``outputs[0]``; the merge runs, and ``lse`` is
        returned, in float64 when the outputs or any lse are float64, else in float32.

    Raises:
        TypeError: ``outputs`` or ``lses`` not a sequence of tensors.
        ValueError: fewer than two outputs, a different number of lses, mismatched shapes,
            dtypes or devices.
    """
    for name, seq in (("outputs", outputs), ("lses", lses)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
        for i, t in enumerate(seq):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    if len(outputs) < 2:
        raise ValueError(f"outputs has {len(outputs)} tensor(s): merging needs at least two")
    if len(lses) != len(outputs):
        raise ValueError(f"got {len(outputs)} outputs but {len(lses)} lses: they must pair up")
    shape, dtype, device = outputs[0].shape, outputs[0].dtype, outputs[0].device
    if outputs[0].dim() < 3:
        raise ValueError(f"outputs[0].shape={tuple(shape)} must be [B, *tokens, H, D]")
    if not dtype.is_floating_point:
        raise TypeError(f"outputs[0].dtype={dtype} must be a floating dtype")
    for i, (o, l) in enumerate(zip(outputs, lses)):
        if o.shape != shape:
            raise ValueError(
                f"outputs[{i}].shape={tuple(o.shape)} differs from outputs[0].shape={tuple(shape)}"
            )
        if o.dtype != dtype:
            raise ValueError(f"outputs[{i}].dtype={o.dtype} differs from outputs[0].dtype={dtype}")
        if l.shape != shape[:-1]:
            raise ValueError(
                f"lses[{i}].shape={tuple(l.shape)} must be the outputs' shape less the last "
                f"axis, {tuple(shape[:-1])}"
            )
        if not l.dtype.is_floating_point:
            raise TypeError(f"lses[{i}].dtype={l.dtype} must be a floating dtype")
        for name, t in (("outputs", o), ("lses", l)):
            if t.device != device:
                raise ValueError(
                    f"{name}[{i}] is on {t.device}, outputs[0] on {device}: one device for all"
                )
    wide = dtype == torch.float64 or any(l.dtype == torch.float64 for l in lses)
    acc = torch.float64 if wide else torch.float32
    stacked_lse = torch.stack([l.to(acc) for l in lses])  # [P, B, *tokens, H]
    lse = torch.logsumexp(stacked_lse, dim=0)
    # All parts empty for a query: lse = -inf; weights 0 there instead of exp(nan).
    finite = torch.isfinite(lse)
    weights = torch.exp(stacked_lse - torch.where(finite, lse, torch.zeros_like(lse)))
    weights = torch.where(finite, weights, torch.zeros_like(weights))
    out = sum(w.unsqueeze(-1) * o.to(acc) for w, o in zip(weights, outputs))
    return out.to(dtype), lse
