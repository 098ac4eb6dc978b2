"""Plain PyTorch cross-entropy Hessian-vector product: the eager reference and its compiled twin.

Both backends share one core function, so ``backend="compile"`` is exactly ``torch.compile`` of
``backend="eager"``. The helpers that turn labels into a row mask and a loss scale live here too,
because the Triton launcher needs the same scale (computed on the device, without a host sync).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

__all__ = [
    "accumulation_dtype",
    "ce_hvp_compiled",
    "ce_hvp_eager",
    "loss_scale",
    "row_mask",
]


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64, else float32 (half-precision inputs accumulate in fp32)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def row_mask(
    labels: torch.Tensor | None,
    rows_shape: torch.Size,
    *,
    ignore_index: int,
    shift: bool,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean (B, T) mask of rows that have a target; ``None`` when every row has one.

    Under ``shift`` row ``t`` is scored against ``labels[..., t + 1]`` (HF causal-LM loss), so the
    last position of each sequence never has a target.
    """
    if labels is None and not shift:
        return None
    if labels is None:
        has_target = torch.ones(rows_shape, dtype=torch.bool, device=device)
    else:
        has_target = labels != ignore_index
    if not shift:
        return has_target
    shifted = torch.zeros(rows_shape, dtype=torch.bool, device=device)
    shifted[..., :-1] = has_target[..., 1:]
    return shifted


def loss_scale(
    labels: torch.Tensor | None,
    rows_shape: torch.Size,
    *,
    ignore_index: int,
    shift: bool,
    reduction: str,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor | float:
    """Factor applied to every valid row: 1 for ``"sum"``, 1 / n_valid for ``"mean"``.

    Returns a Python float when n_valid is known without looking at the labels, else a 0-dim device
    tensor (no host sync). With no valid row at all the factor is 1: every row is zero anyway, and
    this avoids the 0/0 that ``F.cross_entropy`` would produce.
    """
    if reduction == "sum":
        return 1.0
    num_rows = 1
    for size in rows_shape:
        num_rows *= size
    seq_len = rows_shape[-1]
    if labels is None:
        num_valid = num_rows - (num_rows // seq_len if shift else 0)
        return 1.0 / max(num_valid, 1)
    targets = labels[..., 1:] if shift else labels
    valid_count = (targets != ignore_index).sum()
    return 1.0 / valid_count.clamp_min(1).to(dtype)


def _ce_hvp_core(
    logits: torch.Tensor,
    u: torch.Tensor,
    mask: torch.Tensor | None,
    scale: torch.Tensor | float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """p * u - p * <p, u> per row, scaled, masked rows set to exact zeros."""
    acc_dtype = accumulation_dtype(logits.dtype, u.dtype)
    probs = torch.softmax(logits.to(acc_dtype), dim=-1)
    tangent = u.to(acc_dtype)
    prob_dot_u = (probs * tangent).sum(dim=-1, keepdim=True)
    result = probs * (tangent - prob_dot_u) * scale
    if mask is not None:
        result = torch.where(mask.unsqueeze(-1), result, torch.zeros((), dtype=acc_dtype))
    return result.to(out_dtype)


def ce_hvp_eager(
    logits: torch.Tensor,
    u: torch.Tensor,
    mask: torch.Tensor | None,
    scale: torch.Tensor | float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Eager reference: several (N, V) float32 temporaries, differentiable, runs anywhere."""
    return _ce_hvp_core(logits, u, mask, scale, out_dtype)


_compiled_core: Callable[..., torch.Tensor] | None = None
_compile_lock = threading.Lock()


def ce_hvp_compiled(
    logits: torch.Tensor,
    u: torch.Tensor,
    mask: torch.Tensor | None,
    scale: torch.Tensor | float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``torch.compile`` of the eager reference (compiled lazily, once per process).

    The first call for a new shape or dtype pays the compiler's warm-up (seconds on CPU).
    """
    global _compiled_core
    with _compile_lock:
        if _compiled_core is None:
            _compiled_core = torch.compile(_ce_hvp_core, fullgraph=True, dynamic=None)
    if isinstance(scale, float):
        # A Python float would be baked into the graph and recompile for every batch size.
        scale = torch.full(
            (), scale, dtype=accumulation_dtype(logits.dtype, u.dtype), device=logits.device
        )
    return _compiled_core(logits, u, mask, scale, out_dtype)
