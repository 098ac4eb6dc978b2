"""Cross-entropy Hessian-vector product with respect to the logits, with backend dispatch.

At vocabulary scale this is the only (batch x seq x vocab) work in a GGN matvec: per row with a
target, with p = softmax(logits), the Hessian of the cross-entropy applied to u is
p * u - p * <p, u> (divided by the number of rows with a target for ``reduction="mean"``).
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch

from ._ce_hvp_reference import ce_hvp_compiled, ce_hvp_eager, loss_scale, row_mask

__all__ = ["ce_hvp"]

_BACKENDS = ("auto", "triton", "compile", "eager")
_REDUCTIONS = ("mean", "sum")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Backends that raised under backend="auto" in this process, with the reason (not retried).
_failed_backends: dict[str, str] = {}


def _triton_backend() -> ModuleType:
    """The Triton launcher module; raises ImportError when Triton is missing or broken."""
    from . import _ce_hvp_triton

    return _ce_hvp_triton


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
    if backend not in _BACKENDS:
        raise ValueError(f"ce_hvp: backend={backend!r} is not one of {_BACKENDS}")
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


def _backend_order(backend: str, logits: torch.Tensor, u: torch.Tensor) -> list[str]:
    """Backends to try, best first. ``"auto"`` keeps eager on CPU and where autograd must flow."""
    if backend != "auto":
        return [backend]
    needs_grad = torch.is_grad_enabled() and (logits.requires_grad or u.requires_grad)
    if logits.device.type != "cuda" or needs_grad:
        # On CPU torch.compile costs seconds of warm-up per new shape for at most a few passes
        # saved, and Triton only runs there through its (slow) interpreter: eager wins.
        return ["eager"]
    return [name for name in ("triton", "compile") if name not in _failed_backends] + ["eager"]


# Tests of the split kernel's chunk configs and claim path set this; users never need to.
_use_split_kernel = False


# TORCH_LINOP_CE_HVP_CLUSTER=0 keeps every call on the Triton kernels (for comparisons).
CLUSTER_ENV = "TORCH_LINOP_CE_HVP_CLUSTER"
# Why the cluster kernel failed in this process (compilation or launch), if it did: not retried.
_cluster_failure: list[str] = []


def _try_cluster_kernel(
    logits3: torch.Tensor,
    u3: torch.Tensor,
    labels2: torch.Tensor | None,
    target3: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    scale: torch.Tensor | float,
) -> torch.Tensor | None:
    """The Hopper cluster kernel where it applies (``_ce_hvp_cluster.applies``), else None.
    A failure (NVRTC missing, a driver that refuses the launch) warns once and hands this and
    every later call to the Triton kernels."""
    if _cluster_failure or os.environ.get(CLUSTER_ENV, "1") == "0":
        return None
    if not -(2**31) <= ignore_index < 2**31:  # the kernel takes a 32-bit ignore_index
        return None
    from . import _ce_hvp_cluster

    if not _ce_hvp_cluster.applies(logits3, u3, target3):
        return None
    try:
        return _ce_hvp_cluster.ce_hvp_cluster(
            logits3, u3, labels2, target3, ignore_index=ignore_index, shift=shift, scale=scale
        )
    except Exception as error:
        _cluster_failure.append(f"{type(error).__name__}: {error}"[:300])
        warnings.warn(
            f"ce_hvp: the Hopper cluster kernel failed ({_cluster_failure[0]}); using the "
            "Triton kernels for the rest of this process",
            RuntimeWarning,
            stacklevel=4,
        )
        return None


def _run_backend(
    name: str,
    logits3: torch.Tensor,
    u3: torch.Tensor,
    labels2: torch.Tensor | None,
    target3: torch.Tensor | None,
    *,
    ignore_index: int,
    shift: bool,
    reduction: str,
    result_dtype: torch.dtype,
) -> torch.Tensor:
    rows_shape = logits3.shape[:-1]
    scale = loss_scale(
        labels2,
        rows_shape,
        ignore_index=ignore_index,
        shift=shift,
        reduction=reduction,
        device=logits3.device,
        dtype=torch.float64 if result_dtype == torch.float64 else torch.float32,
    )
    if name == "triton":
        triton_backend = _triton_backend()
        if logits3.device.type != "cuda" and not triton_backend.is_interpreter():
            raise ValueError(
                f"ce_hvp: backend='triton' needs CUDA tensors (got {logits3.device}); use "
                "backend='eager', or set TRITON_INTERPRET=1 before importing triton"
            )
        if target3 is None:
            target3 = torch.empty(logits3.shape, dtype=result_dtype, device=logits3.device)
        # float64 (accuracy, not speed) and tests that force a chunk config: the split kernel
        if torch.float64 in (logits3.dtype, u3.dtype) or _use_split_kernel:
            return triton_backend.ce_hvp_triton(
                logits3, u3, labels2, target3, ignore_index=ignore_index, shift=shift, scale=scale
            )
        cluster_result = _try_cluster_kernel(
            logits3, u3, labels2, target3, ignore_index=ignore_index, shift=shift, scale=scale
        )
        if cluster_result is not None:
            return cluster_result
        from ._ce_hvp_two_pass import ce_hvp_two_pass

        return ce_hvp_two_pass(
            logits3, u3, labels2, target3, ignore_index=ignore_index, shift=shift, scale=scale
        )
    mask = row_mask(
        labels2, rows_shape, ignore_index=ignore_index, shift=shift, device=logits3.device
    )
    reference = ce_hvp_compiled if name == "compile" else ce_hvp_eager
    result = reference(logits3, u3, mask, scale, result_dtype)
    if target3 is None:
        return result
    return target3.copy_(result)


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
        backend: ``"triton"`` (our CUDA kernels: on sm_90 GPUs a cluster kernel for contiguous
            16-byte-aligned fp32/bf16/fp16 rows of V >= 16384, see ``_ce_hvp_cluster``; the
            Triton kernels otherwise), ``"compile"`` (``torch.compile`` of the eager reference),
            ``"eager"``, or ``"auto"``: Triton on CUDA, else compile, else eager, falling back
            (with a warning, once) when one fails. On CPU, and when autograd must flow through
            the result, ``"auto"`` uses eager.
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

    order = _backend_order(backend, logits, u)
    for position, name in enumerate(order):
        try:
            result3 = _run_backend(
                name,
                logits3,
                u3,
                labels2,
                target3,
                ignore_index=ignore_index,
                shift=shift,
                reduction=reduction,
                result_dtype=result_dtype,
            )
        except Exception as error:
            if backend != "auto" or position == len(order) - 1:
                raise
            _failed_backends[name] = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"ce_hvp: backend {name!r} failed ({_failed_backends[name]}); "
                f"falling back to {order[position + 1]!r} for the rest of this process",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        if target is not None:
            return target
        return result3.squeeze(0) if logits.dim() == 2 else result3
    raise AssertionError("unreachable: the last backend either returns or raises")
