"""Cross-entropy Hessian-vector product with respect to the logits: checks, then dispatch.

At vocabulary scale this is the only (batch x seq x vocab) work in a GGN matvec: per row with a
target, with p = softmax(logits), the Hessian of the cross-entropy applied to u is
p * u - p * <p, u> (divided by the number of rows with a target for ``reduction="mean"``).
Which backend computes it is decided in one place, ``_ce_hvp_registry.dispatch``.
"""

from __future__ import annotations

import torch

from ._ce_hvp_reference import loss_scale
from ._ce_hvp_registry import FAMILIES, CeHvpCall, dispatch

__all__ = ["ce_hvp"]

_REDUCTIONS = ("mean", "sum")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(
    logits: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    ignore_index: int,
    reduction: str,
    backend: str,
    out: torch.Tensor | None,
    inplace: bool,
) -> torch.dtype:
    """Raise on bad input; return the result dtype."""
    for name, tensor in (("logits", logits), ("u", u)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"ce_hvp: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"ce_hvp: {name} has dtype {tensor.dtype}; use float16, bfloat16, float32 or "
                f"float64 (cast with {name}.float())"
            )
    if logits.dim() not in (2, 3):
        raise ValueError(
            f"ce_hvp: logits must be (N, V) or (B, T, V), got shape {tuple(logits.shape)}"
        )
    if u.shape != logits.shape:
        raise ValueError(
            f"ce_hvp: u has shape {tuple(u.shape)} but logits has {tuple(logits.shape)}; "
            "u is a tangent of the logits and must have the same shape"
        )
    if u.device != logits.device:
        raise ValueError(f"ce_hvp: u is on {u.device} but logits on {logits.device}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"ce_hvp: labels must be a tensor or None, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(
                f"ce_hvp: labels has dtype {labels.dtype}; use an integer dtype (labels.long())"
            )
        if labels.shape != logits.shape[:-1]:
            raise ValueError(
                f"ce_hvp: labels has shape {tuple(labels.shape)}, expected "
                f"{tuple(logits.shape[:-1])} (logits.shape[:-1])"
            )
        if labels.device != logits.device:
            raise ValueError(f"ce_hvp: labels are on {labels.device} but logits on {logits.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ce_hvp: ignore_index must be an int, got {ignore_index!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"ce_hvp: reduction={reduction!r} is not one of {_REDUCTIONS}")
    if backend not in FAMILIES:
        raise ValueError(f"ce_hvp: backend={backend!r} is not one of {FAMILIES}")
    result_dtype = torch.promote_types(logits.dtype, u.dtype)
    if out is not None and inplace:
        raise ValueError("ce_hvp: pass either out=... or inplace=True, not both")
    if out is not None:
        if out.shape != logits.shape or out.dtype != result_dtype or out.device != logits.device:
            raise ValueError(
                f"ce_hvp: out must have shape {tuple(logits.shape)}, dtype {result_dtype} and "
                f"device {logits.device}; got {tuple(out.shape)}, {out.dtype}, {out.device}"
            )
        if out.numel() > 0 and out.data_ptr() == logits.data_ptr():
            raise ValueError("ce_hvp: out must not be the logits buffer (use inplace=True for u)")
    if inplace:
        if u.dtype != result_dtype:
            raise TypeError(
                f"ce_hvp: inplace=True writes into u ({u.dtype}) but the result is {result_dtype}; "
                "pass u in the wider dtype or use out=..."
            )
        if any(stride == 0 and size > 1 for stride, size in zip(u.stride(), u.shape, strict=True)):
            raise ValueError("ce_hvp: inplace=True needs u without broadcast (stride-0) dimensions")
    return result_dtype


def ce_hvp(
    logits: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    out: torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Cross-entropy Hessian (w.r.t. the logits) applied to ``u``, shaped like ``logits``.

    Per row r that has a target, with p = softmax(logits[r]):
    ``result[r] = (p * u[r] - p * <p, u[r]>) / n_valid`` for ``reduction="mean"`` (n_valid = rows
    with a target), without the division for ``"sum"``; the other rows are exact zeros. This is the
    Hessian of ``F.cross_entropy(logits, labels, ignore_index=..., reduction=...)``, which does not
    depend on the label values, only on which rows have one.

    Args:
        logits: (N, V) or (B, T, V), float16/bfloat16/float32/float64, any strides.
        u: tangent with the shape of ``logits``, any float dtype.
        labels: integer targets shaped ``logits.shape[:-1]``; ``None`` means every row has one.
        ignore_index: label value of rows without a target.
        shift: HF causal-LM convention: row t is scored against ``labels[..., t + 1]``, so the last
            position of every sequence has no target. (N, V) inputs count as one sequence.
        reduction: ``"mean"`` or ``"sum"``; with no target at all the result is zero.
        backend: ``"triton"`` (our CUDA kernels: on sm_90 GPUs the cluster kernel for
            contiguous 16-byte-aligned fp32/bf16/fp16 rows of V >= 16384, the Triton two-pass
            kernel otherwise), ``"compile"`` (``torch.compile`` of the eager reference),
            ``"eager"``, or ``"auto"``: the first of these that applies, falling back (with a
            warning, once) when one fails. On CPU, and when autograd must flow through the
            result, ``"auto"`` uses eager. The order and each backend's conditions are
            ``torch_linop.kernels._ce_hvp_registry.BACKENDS``.
        out: optional output tensor (shape of logits, result dtype).
        inplace: write the result into ``u``'s buffer (Triton: no extra (N, V) memory).

    Returns:
        Tensor shaped like ``logits`` in ``torch.promote_types(logits.dtype, u.dtype)``.
        Accumulation is float32 for half-precision and float32 inputs, float64 for float64.
    """
    result_dtype = _check_inputs(
        logits,
        u,
        labels,
        ignore_index=ignore_index,
        reduction=reduction,
        backend=backend,
        out=out,
        inplace=inplace,
    )
    target = u if inplace else out
    if logits.dim() == 2:
        logits3, u3 = logits.unsqueeze(0), u.unsqueeze(0)
        labels2 = labels.unsqueeze(0) if labels is not None else None
        target3 = target.unsqueeze(0) if target is not None else None
    else:
        logits3, u3, labels2, target3 = logits, u, labels, target

    scale = loss_scale(
        labels2,
        logits3.shape[:-1],
        ignore_index=ignore_index,
        shift=shift,
        reduction=reduction,
        device=logits.device,
        dtype=torch.float64 if result_dtype == torch.float64 else torch.float32,
    )
    call = CeHvpCall(
        logits=logits3,
        u=u3,
        labels=labels2,
        out=target3,
        ignore_index=ignore_index,
        shift=shift,
        scale=scale,
        result_dtype=result_dtype,
        requested=backend,
    )
    result3 = dispatch(call)
    if target is not None:
        return target
    return result3.squeeze(0) if logits.dim() == 2 else result3
