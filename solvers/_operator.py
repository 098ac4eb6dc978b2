"""Turn anything a solver accepts into one torch ``matmat`` closure, so each algorithm exists once.

Two paths: the numpy path (scipy ``LinearOperator``, numpy array, scipy sparse matrix) runs in
float64 torch on the CPU and hands numpy back; the torch path (an object with ``device``,
``torch_dtype`` and ``shape`` that multiplies torch tensors, or a dense square ``torch.Tensor``)
runs on the operator's device and hands torch tensors back. Either may carry a
``vector_space`` (see :mod:`._space`): where its vectors live and how to take their inner
products (sharded operators); without one, vectors are whole and local.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
from torch import Tensor

from ._random import Distribution, draw_probes
from ._space import LocalSpace, Space, space_of

Matmat = Callable[[Tensor], Tensor]
_SYMMETRY_BLOCK_ELEMENTS = 1 << 22  # entries compared at a time by check_symmetric
_ALIGNMENT = 64  # bytes: where torch's CPU allocator starts every tensor


@dataclass(frozen=True)
class Operator:
    """A symmetric operator seen by the solvers: ``matmat(X[n, k]) -> Y[n, k]`` in ``dtype``.

    ``matmat`` takes and returns tensors of ``dtype`` on ``device``; the adapter does the casts to
    and from whatever the wrapped object computes in (bf16/fp16 operators are seen as float32,
    with ``eps`` still that of the half dtype, so tolerances can respect its rounding). ``returns_numpy`` says whether n-sized
    results (eigenvectors, diagonals) go back to the caller as numpy arrays.
    """

    matmat: Matmat
    size: int
    dtype: torch.dtype
    device: torch.device
    returns_numpy: bool
    eps: float  # machine epsilon of the dtype the wrapped operator computes in
    space: Space  # inner products, norms, QR and seeds (see ._space)

    @property
    def length(self) -> int:
        """Rows of the vectors this process holds (``size`` unless the space is sharded)."""
        return self.space.length

    def probes(
        self,
        count: int,
        generator: torch.Generator,
        distribution: Distribution,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> Tensor:
        """This process's rows ``(length, count)`` of the next ``count`` probes of ``generator``:
        the same full probes on any sharding (one key per probe, entries hashed by index)."""
        return draw_probes(
            count,
            self.size,
            generator,
            distribution=distribution,
            dtype=self.dtype if dtype is None else dtype,
            device=self.device if device is None else device,
            entries=self.space.entries,
        )

    def output(self, tensor: Tensor) -> Any:
        """Return an n-sized result in the caller's world: numpy float64 or a torch tensor."""
        if self.returns_numpy:
            return tensor.detach().to("cpu", torch.float64, copy=True).numpy()
        return tensor


def as_operator(op: Any) -> Operator:
    """Wrap ``op`` for the solvers; TypeError for unsupported objects, ValueError if not square."""
    if isinstance(op, Tensor):
        return _from_dense_tensor(op)
    if all(hasattr(op, name) for name in ("device", "torch_dtype", "shape")):
        return _from_torch_protocol(op)
    if isinstance(op, np.ndarray | scipy.sparse.linalg.LinearOperator) or scipy.sparse.issparse(op):
        return _from_numpy(op)
    raise TypeError(
        f"cannot use an object of type {type(op).__name__} as an operator; pass a "
        "scipy.sparse.linalg.LinearOperator, a numpy array, a scipy sparse matrix, a square "
        "torch.Tensor, or an object with `device`, `torch_dtype`, `shape` and a `matmat`/`@` "
        "that multiplies torch tensors"
    )


def _square_size(shape: Any, what: str) -> int:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(
            f"{what} must be square (n, n) to have eigenvalues, a trace or a diagonal; "
            f"got shape {shape}"
        )
    if shape[0] < 1:
        raise ValueError(f"{what} is empty (shape {shape})")
    return shape[0]


def _check_real(dtype: torch.dtype | np.dtype, what: str) -> None:
    is_complex = (
        dtype.is_complex
        if isinstance(dtype, torch.dtype)
        else np.iscomplexobj(np.empty(0, dtype=dtype))
    )
    if is_complex:
        raise TypeError(
            f"{what} has complex dtype {dtype}; the solvers handle real symmetric operators only"
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the solvers compute in for an operator of ``dtype``: float32 at least."""
    if not dtype.is_floating_point:
        return torch.float64
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype if dtype.is_floating_point else torch.float64).eps


def check_symmetric(matrix: Tensor, what: str) -> None:
    """ValueError unless a dense matrix equals its transpose to ``sqrt(eps)`` of its largest
    entry (the solvers assume symmetry, and a non-symmetric matrix would give silently wrong
    numbers). Compared in row blocks, so the extra memory is bounded."""
    if matrix.device.type == "meta" or matrix.numel() == 0:
        return
    work = matrix if matrix.dtype.is_floating_point else matrix.double()
    scale = float(work.abs().max())
    if not math.isfinite(scale):
        return  # non-finite entries: the products raise FloatingPointError
    size = matrix.shape[0]
    rows_per_block = max(1, _SYMMETRY_BLOCK_ELEMENTS // size)
    worst = 0.0
    for start in range(0, size, rows_per_block):
        stop = min(size, start + rows_per_block)
        difference = work[start:stop] - work[:, start:stop].T
        worst = max(worst, float(difference.abs().max()))
    tolerance = math.sqrt(_eps(work.dtype)) * scale
    if worst > tolerance:
        raise ValueError(
            f"{what} is not symmetric: max |A - A^T| = {worst:.3g} for entries up to "
            f"{scale:.3g}; the solvers handle symmetric operators only (symmetrise it with "
            "(A + A.T) / 2, or use scipy.sparse.linalg.eigs for general matrices)"
        )


def _aligned(matrix: Tensor) -> Tensor:
    """``matrix``, copied if it does not start on a 64-byte boundary (numpy arrays, views):
    MKL's products depend on the alignment of their operands, so without this the same matrix
    could give other bits in another process, and a resumed run would not repeat the
    uninterrupted one."""
    if matrix.device.type == "cpu" and matrix.data_ptr() % _ALIGNMENT:
        return matrix.clone(memory_format=torch.contiguous_format)
    return matrix


def _from_dense_tensor(matrix: Tensor) -> Operator:
    size = _square_size(matrix.shape, "the torch.Tensor operator")
    _check_real(matrix.dtype, "the torch.Tensor operator")
    if not matrix.dtype.is_floating_point:
        raise TypeError(
            f"the torch.Tensor operator has dtype {matrix.dtype}; convert it to a floating "
            "dtype, e.g. matrix.double()"
        )
    check_symmetric(matrix, "the torch.Tensor operator")
    matrix = _aligned(matrix)
    compute_dtype = _compute_dtype(matrix.dtype)

    def matmat(block: Tensor) -> Tensor:
        return (matrix @ block.to(matrix.dtype)).to(compute_dtype)

    return Operator(
        matmat, size, compute_dtype, matrix.device, False, _eps(matrix.dtype), _local(size)
    )


def _local(size: int) -> Space:
    return Space(LocalSpace(), size)


def _from_torch_protocol(op: Any) -> Operator:
    size = _square_size(op.shape, f"the operator {type(op).__name__}")
    op_dtype = op.torch_dtype
    device = torch.device(op.device)
    if not isinstance(op_dtype, torch.dtype):
        raise TypeError(f"{type(op).__name__}.torch_dtype must be a torch.dtype, got {op_dtype!r}")
    _check_real(op_dtype, f"the operator {type(op).__name__}")
    compute_dtype = _compute_dtype(op_dtype)
    space = space_of(op, size)
    apply = op.matmat if callable(getattr(op, "matmat", None)) else op.__matmul__

    def matmat(block: Tensor) -> Tensor:
        result = apply(block.to(device=device, dtype=op_dtype))
        if not isinstance(result, Tensor) or tuple(result.shape) != tuple(block.shape):
            raise TypeError(
                f"{type(op).__name__}.matmat on a torch tensor of shape {tuple(block.shape)} "
                f"returned {type(result).__name__} of shape "
                f"{tuple(getattr(result, 'shape', ()))}; the torch path needs a torch tensor "
                "of the same shape on the operator's device"
            )
        return result.to(compute_dtype)

    return Operator(matmat, size, compute_dtype, device, False, _eps(op_dtype), space)


def _from_numpy(op: Any) -> Operator:
    if isinstance(op, np.ndarray) and op.ndim == 2 and op.shape[0] == op.shape[1]:
        _check_real(op.dtype, "the numpy array operator")
        # a dense array multiplies in torch: same float64 numbers, and no second BLAS thread
        # pool contending with torch's on small machines
        size = _square_size(op.shape, "the numpy array operator")
        matrix = _aligned(torch.from_numpy(np.ascontiguousarray(op, dtype=np.float64)))
        check_symmetric(matrix, "the numpy array operator")
        return Operator(
            matrix.__matmul__,
            size,
            torch.float64,
            matrix.device,
            True,
            _eps(torch.float64),
            _local(size),
        )
    if scipy.sparse.issparse(op) and op.shape[0] == op.shape[1] and op.nnz > 0:
        scale = float(abs(op).max())
        worst = float(abs(op - op.T).max())
        if math.isfinite(scale) and worst > math.sqrt(_eps(torch.float64)) * scale:
            raise ValueError(
                f"the sparse matrix operator is not symmetric: max |A - A^T| = {worst:.3g} for "
                f"entries up to {scale:.3g}; the solvers handle symmetric operators only "
                "(symmetrise it with (A + A.T) / 2)"
            )
    linear_op = scipy.sparse.linalg.aslinearoperator(op)
    size = _square_size(linear_op.shape, f"the operator {type(op).__name__}")
    _check_real(linear_op.dtype, f"the operator {type(op).__name__}")

    def matmat(block: Tensor) -> Tensor:
        result = np.asarray(linear_op.matmat(block.numpy()), dtype=np.float64)
        return torch.from_numpy(result.reshape(block.shape))

    return Operator(
        matmat, size, torch.float64, torch.device("cpu"), True, _eps(torch.float64), _local(size)
    )


def non_finite_error(matvec: int) -> FloatingPointError:
    """The error for nan/inf operator output first seen in product number ``matvec``."""
    return FloatingPointError(
        f"the operator returned non-finite values (nan/inf) at matvec {matvec}; check the "
        "model/loss for overflow (a lower-precision operator may need float32) or for nan "
        "parameters"
    )


def check_finite(block: Tensor, first_matvec: int, space: Space | None = None) -> None:
    """Raise FloatingPointError if an operator output block holds nan/inf (one host sync; on
    a distributed ``space`` a reduced flag, so that every process raises)."""
    finite = bool(torch.isfinite(block).all()) if space is None else space.all_finite(block)
    if not finite:
        bad_columns = (~torch.isfinite(block)).any(dim=0).nonzero()
        bad_column = int(bad_columns[0]) if len(bad_columns) else 0  # else: on another process
        raise non_finite_error(first_matvec + bad_column + 1)
