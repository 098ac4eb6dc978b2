"""The one Lanczos core: block Lanczos tridiagonalisation with full reorthogonalisation and thick
restart, reused by top-k eigensolves (``lanczos``) and stochastic Lanczos quadrature.

All state lives in :class:`KrylovState`: the basis ``Q`` (rows), the projected coefficients ``T``
and counters. Steps keep the Arnoldi relation ``H Q[:m] = Q[:size] T[:size, :m]`` (``m`` multiplied
vectors, the last ``block_size`` rows of ``Q[:size]`` still pending) and never read values back
to the host: breakdowns (an invariant subspace) and non-finite operator output are found by
:func:`validate`, which the caller runs when it checks convergence anyway.

The basis rows are this process's entries of the vectors; every product over the entries goes
through the operator's vector space (inner products, norms, QR), so a sharded operator's run
keeps only its rows and takes the same steps as a single process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._operator import Operator, non_finite_error
from ._random import draw_probes
from ._space import Space

_ROW_CHUNK = 32  # basis rows converted at a time when the basis is stored in a cheaper dtype
_COLUMN_CHUNK = 1 << 18  # columns rewritten at a time by a thick restart
_HOST_COLUMN_CHUNK = 1 << 24  # columns of Ritz vectors assembled at a time on the host


@dataclass
class KrylovState:
    """Everything a Lanczos run needs to continue (checkpointed by :func:`state_dict`).

    ``basis[:size]`` holds orthonormal rows; the last ``block_size`` of them are pending (their
    products are not taken yet). ``coefficients[i, j] = q_i . H q_j`` for multiplied ``q_j``, which
    for symmetric ``H`` is the block tridiagonal Lanczos matrix plus rounding-level entries from
    the full reorthogonalisation (and, after a thick restart, a diagonal-plus-arrow head).
    """

    basis: Tensor
    coefficients: Tensor
    size: int
    block_size: int
    generator: torch.Generator
    space: Space  # inner products, norms and QR over the whole vectors (see ._space)
    dimension: int  # n, the size of the whole space (basis rows hold this process's entries)
    num_matvecs: int = 0
    num_steps: int = 0
    num_restarts: int = 0
    validated_columns: int = 0  # columns already checked for breakdown / non-finite values
    complete: bool = False  # basis spans the whole space and all of it is multiplied
    norm_estimate: float = 0.0  # largest |coefficient| seen, a lower bound on ||H||

    @property
    def capacity(self) -> int:
        return self.basis.shape[0]

    @property
    def num_multiplied(self) -> int:
        """``m``: basis vectors whose products are in ``coefficients``."""
        return self.size if self.complete else self.size - self.block_size


def accumulation_dtype(basis_dtype: torch.dtype, operator_dtype: torch.dtype) -> torch.dtype:
    """Dtype for inner products: float64 if either side is float64, else float32."""
    if torch.float64 in (basis_dtype, operator_dtype):
        return torch.float64
    return torch.float32


def start(
    operator: Operator,
    start_block: Tensor,
    *,
    capacity: int,
    generator: torch.Generator,
    basis_device: torch.device,
    basis_dtype: torch.dtype,
) -> KrylovState:
    """A state with room for ``capacity`` basis vectors whose pending block is ``start_block``
    (``(n, b)``) orthonormalised."""
    block_size = start_block.shape[1]
    state = allocate(
        operator,
        operator.size,
        block_size,
        capacity=capacity,
        generator=generator,
        basis_device=basis_device,
        basis_dtype=basis_dtype,
    )
    reset(state, start_block)
    return state


def allocate(
    operator: Operator,
    n: int,
    block_size: int,
    *,
    capacity: int,
    generator: torch.Generator,
    basis_device: torch.device,
    basis_dtype: torch.dtype,
) -> KrylovState:
    """A state with zeroed buffers for ``capacity`` basis vectors of the ``n``-dimensional space
    (each row this process's entries of a vector) and no start block yet (fill it with
    :func:`reset` or :func:`load_state_dict`)."""
    acc_dtype = accumulation_dtype(basis_dtype, operator.dtype)
    basis = torch.zeros(capacity, operator.length, dtype=basis_dtype, device=basis_device)
    coefficients = torch.zeros(capacity, capacity, dtype=acc_dtype, device=basis_device)
    return KrylovState(
        basis,
        coefficients,
        block_size,
        block_size,
        generator,
        space=operator.space,
        dimension=n,
    )


_COUNTERS = (
    "size",
    "block_size",
    "num_matvecs",
    "num_steps",
    "num_restarts",
    "validated_columns",
    "complete",
    "norm_estimate",
)


def state_dict(state: KrylovState) -> dict[str, Any]:
    """Everything that determines the rest of a run: the used basis rows, the coefficients, the
    counters and the generator's state (rows beyond ``size`` are always zero)."""
    saved: dict[str, Any] = {name: getattr(state, name) for name in _COUNTERS}
    saved["basis"] = state.basis[: state.size]
    saved["coefficients"] = state.coefficients
    saved["generator"] = state.generator.get_state()
    return saved


def load_state_dict(state: KrylovState, saved: dict[str, Any]) -> None:
    """Restore :func:`state_dict` output into ``state``'s buffers (same capacity, size and
    dtypes), bit for bit."""
    basis, coefficients = saved["basis"], saved["coefficients"]
    if (
        basis.shape[1] != state.basis.shape[1]
        or basis.shape[0] > state.capacity
        or coefficients.shape != state.coefficients.shape
        or basis.dtype != state.basis.dtype
        or coefficients.dtype != state.coefficients.dtype
    ):
        raise ValueError(
            f"the checkpointed Krylov basis ({tuple(basis.shape)}, {basis.dtype}) does not fit "
            f"this run's ({tuple(state.basis.shape)}, {state.basis.dtype}); resume with the "
            "same options"
        )
    state.basis.zero_()
    state.basis[: basis.shape[0]] = basis.to(state.basis.device)
    state.coefficients.copy_(coefficients.to(state.coefficients.device))
    for name in _COUNTERS:
        setattr(state, name, type(getattr(state, name))(saved[name]))
    state.generator.set_state(saved["generator"])


def reset(state: KrylovState, start_block: Tensor) -> None:
    """Start a new run from ``start_block`` in ``state``'s buffers (one basis alive at a time);
    the product counter keeps counting."""
    block_size = start_block.shape[1]
    state.basis.zero_()
    state.coefficients.zero_()
    start_rows = start_block.to(state.basis.device, state.coefficients.dtype).T
    state.basis[:block_size] = _orthonormal_rows(state.space, start_rows).to(state.basis.dtype)
    state.size = state.block_size = block_size
    state.validated_columns = 0
    state.complete = False


def can_step(state: KrylovState) -> bool:
    """Whether :func:`step` has room (or can close a basis that already spans the space)."""
    if state.complete:
        return False
    return state.size + state.block_size <= state.capacity or state.size == state.dimension


def step(state: KrylovState, operator: Operator) -> None:
    """One block Lanczos step: multiply the pending block, reorthogonalise (twice), normalise.

    Single vectors: two Gram-Schmidt passes, then the norm. Blocks: block Gram-Schmidt twice,
    each pass followed by a QR of the block (BCGS2): a QR that cancels most of a block (a nearly
    invariant subspace) leaves rounding of the first pass's size in the small direction, which
    the second pass removes (projecting twice before one QR left the basis orthogonal only to
    ``eps / sigma_min`` of the coupling, 1e-4 for couplings near 1e-12).

    No host synchronisation happens here. When the basis already spans the whole space the step
    only records the last coefficients and marks the state ``complete``.
    """
    block_size, size = state.block_size, state.size
    first = size - block_size
    basis = state.basis
    acc_dtype = state.coefficients.dtype
    pending = basis[first:size]
    product = operator.matmat(pending.T.to(operator.device, operator.dtype))
    rows = product.to(basis.device, acc_dtype).T.contiguous()
    state.num_matvecs += block_size
    state.num_steps += 1

    space = state.space
    coefficients = _project(space, basis[:size], rows)
    _subtract(rows, basis[:size], coefficients)
    if block_size > 1 and size < state.dimension:
        _block_second_pass(state, rows, coefficients, first)
        return
    correction = _project(space, basis[:size], rows)
    _subtract(rows, basis[:size], correction)
    coefficients += correction
    state.coefficients[:size, first:size] = coefficients
    if size == state.dimension:
        state.complete = True
        return
    if block_size == 1:
        # scaled by a power of two (exact): squares of the entries of an operator with a norm
        # near the ends of the float range (below 1e-154 in float64) would underflow to 0
        scale = space.power_of_two_scale(rows)
        rows /= scale
        norm = space.reduce((rows * rows).sum(dim=1), "sum").sqrt()
        rows /= norm.clamp_min(torch.finfo(acc_dtype).tiny)
        coupling = (norm * scale[:, 0]).reshape(1, 1)
    else:
        orthonormal, coupling = space.qr(rows.T)
        rows = orthonormal.T
    basis[size : size + block_size] = rows.to(basis.dtype)
    state.coefficients[size : size + block_size, first:size] = coupling
    state.size = size + block_size


def _block_second_pass(state: KrylovState, rows: Tensor, coefficients: Tensor, first: int) -> None:
    """Finish a block step after the first projection: QR, second projection, QR (BCGS2).

    ``H X = Q C1 + W1 R1`` and ``W1 = Q C2 + W2 R2`` give ``H X = Q (C1 + C2 R1) + W2 (R2 R1)``.
    """
    size, block_size, basis, space = state.size, state.block_size, state.basis, state.space
    first_rows, first_coupling = space.qr(rows.T)
    second_rows = first_rows.T.contiguous()
    correction = _project(space, basis[:size], second_rows)
    _subtract(second_rows, basis[:size], correction)
    orthonormal, second_coupling = space.qr(second_rows.T)
    state.coefficients[:size, first:size] = coefficients + correction @ first_coupling
    basis[size : size + block_size] = orthonormal.T.to(basis.dtype)
    state.coefficients[size : size + block_size, first:size] = second_coupling @ first_coupling
    state.size = size + block_size


def validate(state: KrylovState) -> bool:
    """Check the columns added since the last call (one host sync).

    Raises FloatingPointError on non-finite operator output. On a breakdown (the basis spans an
    invariant subspace: a coupling below ``64 * eps * ||H||`` in the accumulation dtype, where the
    next vector could not be orthogonalised reliably) it rolls back the steps taken after it
    (their matvecs stay counted), sets the coupling to zero and refills the pending block with
    random directions orthogonal to the basis. Returns whether it did.
    """
    m = state.num_multiplied
    block_size = state.block_size
    first = state.validated_columns
    if m <= first:
        return False
    new_columns = (
        state.coefficients[: state.size, first:m].to("cpu", torch.float64, copy=True).numpy()
    )
    finite = np.isfinite(new_columns).all(axis=0)
    first_bad = int(np.argmin(finite)) if not finite.all() else m - first
    if first_bad < m - first:
        raise non_finite_error(state.num_matvecs - (m - first - first_bad) + 1)
    state.norm_estimate = max(state.norm_estimate, float(np.abs(new_columns).max(initial=0.0)))
    threshold = 64 * torch.finfo(state.coefficients.dtype).eps * state.norm_estimate
    for column in range(first, m, block_size):
        rows = slice(column + block_size, column + 2 * block_size)
        if rows.stop > state.size:
            break  # the closing step of a complete basis has no coupling block
        coupling = new_columns[rows.start : rows.stop, column - first : column - first + block_size]
        singular_values = np.linalg.svd(coupling, compute_uv=False)
        if singular_values.min() <= threshold:
            _restart_after_breakdown(state, column, coupling, threshold)
            state.validated_columns = column + block_size
            return True
    state.validated_columns = m
    return False


def ritz(state: KrylovState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ritz values (ascending), Ritz vectors in basis coordinates, and Ritz residual estimates.

    The projected matrix is solved in float64 on the host whatever the operator dtype. The
    estimate for pair i is ``||coupling @ y_i||``, equal to ``||H v - theta v||`` while the basis
    is orthonormal.
    """
    m = state.num_multiplied
    projected = state.coefficients[: state.size, :m].to("cpu", torch.float64, copy=True).numpy()
    # scaled by a power of two (exact) so that tiny or huge operators do not underflow/overflow
    largest = float(np.abs(projected).max(initial=0.0))
    scale = float(np.ldexp(1.0, np.frexp(largest)[1] - 1)) if np.isfinite(largest) else 1.0
    projected /= scale
    head = torch.from_numpy(projected[:m])
    # torch's LAPACK runs in torch's thread pool instead of waking numpy's BLAS threads too
    values, vectors = (x.numpy() for x in torch.linalg.eigh((head + head.T) / 2))
    estimates = np.linalg.norm(projected[m:] @ vectors, axis=0)
    return values * scale, vectors, estimates * scale


def ritz_vectors(state: KrylovState, coordinates: np.ndarray) -> Tensor:
    """``(k, n)`` Ritz vectors ``coordinates.T @ Q[:m]`` in the accumulation dtype."""
    m = state.num_multiplied
    weights = torch.from_numpy(np.ascontiguousarray(coordinates))
    weights = weights.to(state.basis.device, state.coefficients.dtype)
    return _combine(weights, state.basis[:m])


def ritz_vectors_on_host(state: KrylovState, coordinates: np.ndarray) -> Tensor:
    """:func:`ritz_vectors` assembled in host memory a column chunk at a time (for when they do
    not fit on the device next to the basis)."""
    m, n = state.num_multiplied, state.basis.shape[1]
    acc_dtype = state.coefficients.dtype
    weights = torch.from_numpy(np.ascontiguousarray(coordinates)).to(state.basis.device, acc_dtype)
    vectors = torch.empty(coordinates.shape[1], n, dtype=acc_dtype, device="cpu")
    for start_column in range(0, n, _HOST_COLUMN_CHUNK):
        columns = slice(start_column, min(n, start_column + _HOST_COLUMN_CHUNK))
        vectors[:, columns] = _combine(weights, state.basis[:m, columns]).cpu()
    return vectors


def thick_restart(state: KrylovState, coordinates: np.ndarray, values: np.ndarray) -> None:
    """Keep the Ritz vectors ``Q[:m] @ coordinates`` and the pending block; drop the rest.

    The kept vectors become the head of the basis with ``diag(values)`` as their projection and
    ``coupling @ coordinates`` as their coupling to the pending block, so the next step continues
    the same Arnoldi relation. Columns are rewritten in chunks to bound extra memory.
    """
    m, block_size = state.num_multiplied, state.block_size
    num_keep = coordinates.shape[1]
    if num_keep + 2 * block_size > state.capacity:
        raise ValueError(f"cannot keep {num_keep} vectors in a basis of {state.capacity}")
    acc_dtype = state.coefficients.dtype
    weights = torch.from_numpy(np.ascontiguousarray(coordinates)).to(state.basis.device, acc_dtype)
    n = state.basis.shape[1]
    for start_column in range(0, n, _COLUMN_CHUNK):
        columns = slice(start_column, min(n, start_column + _COLUMN_CHUNK))
        kept = _combine(weights, state.basis[:m, columns])
        state.basis[:num_keep, columns] = kept.to(state.basis.dtype)
    state.basis[num_keep : num_keep + block_size] = state.basis[m : m + block_size].clone()
    state.basis[num_keep + block_size :] = 0
    coupling = (
        state.coefficients[m : m + block_size, :m].to("cpu", torch.float64, copy=True).numpy()
    )
    state.coefficients.zero_()
    head = np.zeros((num_keep + block_size, num_keep))
    head[:num_keep] = np.diag(values)
    head[num_keep:] = coupling @ coordinates
    state.coefficients[: num_keep + block_size, :num_keep] = torch.from_numpy(head)
    state.size = num_keep + block_size
    state.validated_columns = num_keep
    state.num_restarts += 1


def _restart_after_breakdown(
    state: KrylovState, column: int, coupling: np.ndarray, threshold: float
) -> None:
    """Replace the pending block after column block ``column`` by the coupling's well-conditioned
    directions plus random directions orthogonal to the basis; forget later steps."""
    block_size = state.block_size
    pending = slice(column + block_size, column + 2 * block_size)
    acc_dtype = state.coefficients.dtype
    left, singular_values, right_t = np.linalg.svd(coupling)
    keep = singular_values > threshold
    old_rows = state.basis[pending].to(acc_dtype)
    left_t = torch.from_numpy(left.T.copy()).to(old_rows.device, acc_dtype)
    kept_rows = (left_t @ old_rows)[torch.from_numpy(keep).to(old_rows.device)]
    num_fill = block_size - int(keep.sum())
    fill = draw_probes(
        num_fill,
        state.dimension,
        state.generator,
        distribution="gaussian",
        dtype=acc_dtype,
        device=state.basis.device,
        entries=state.space.entries,
    ).T.contiguous()
    previous = torch.cat([state.basis[: pending.start].to(acc_dtype), kept_rows])
    for _ in range(2):
        _subtract(fill, previous, _project(state.space, previous, fill))
    new_rows = torch.cat([kept_rows, _orthonormal_rows(state.space, fill)])
    new_coupling = np.zeros_like(coupling)
    new_coupling[: int(keep.sum())] = singular_values[keep, None] * right_t[keep]

    state.basis[pending] = new_rows.to(state.basis.dtype)
    state.basis[pending.stop :] = 0
    state.coefficients[:, column + block_size :] = 0
    state.coefficients[pending.stop :] = 0
    state.coefficients[pending, column : column + block_size] = torch.from_numpy(new_coupling)
    state.size = pending.stop
    state.complete = False


def _orthonormal_rows(space: Space, rows: Tensor) -> Tensor:
    """Rows spanning the same space, orthonormal (QR of the transpose)."""
    if rows.shape[0] == 0:
        return rows
    orthonormal, _ = space.qr(rows.T)
    return orthonormal.T


def _project(space: Space, basis_rows: Tensor, rows: Tensor) -> Tensor:
    """``basis_rows @ rows.T`` over the whole vectors, in the dtype of ``rows`` (converting the
    basis in chunks, then one reduction over the processes)."""
    if basis_rows.dtype == rows.dtype:
        return space.inner(basis_rows.T, rows.T)
    result = torch.empty(basis_rows.shape[0], rows.shape[0], dtype=rows.dtype, device=rows.device)
    for start_row in range(0, basis_rows.shape[0], _ROW_CHUNK):
        chunk = slice(start_row, start_row + _ROW_CHUNK)
        result[chunk] = basis_rows[chunk].to(rows.dtype) @ rows.T
    return space.reduce(result, "sum")


def _combine(coefficients: Tensor, basis_rows: Tensor) -> Tensor:
    """``coefficients.T @ basis_rows`` in the dtype of ``coefficients`` (basis converted in
    chunks)."""
    if basis_rows.dtype == coefficients.dtype:
        return coefficients.T @ basis_rows
    result = torch.zeros(
        coefficients.shape[1],
        basis_rows.shape[1],
        dtype=coefficients.dtype,
        device=basis_rows.device,
    )
    for start_row in range(0, basis_rows.shape[0], _ROW_CHUNK):
        chunk = slice(start_row, start_row + _ROW_CHUNK)
        result += coefficients[chunk].T @ basis_rows[chunk].to(coefficients.dtype)
    return result


def _subtract(rows: Tensor, basis_rows: Tensor, coefficients: Tensor) -> None:
    """``rows -= coefficients.T @ basis_rows`` in place."""
    rows -= _combine(coefficients, basis_rows)
