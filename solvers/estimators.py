"""``trace`` and ``diagonal``: validate the request, then hand it to the paper-named estimator."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
from torch import Tensor

from . import chen2023krylov_aware, epperly2024xtrace, hutchinson, meyer2021hutchpp
from ._operator import Operator, _aligned, as_operator
from ._progress import progress_bar
from ._random import Distribution, check_distribution, make_generator
from ._sampling import EstimatorState
from .checkpoint import Checkpoint, seed_option
from .chen2023krylov_aware import krylov_aware_trace
from .epperly2024xtrace import xdiag, xtrace
from .hutchinson import hutchinson_samples, mean_and_stderr_or_nan
from .meyer2021hutchpp import hutchpp
from .results import DiagonalResult, TraceResult

TraceMethod = Literal["hutch++", "hutchinson", "xtrace", "krylov"]
TRACE_METHODS = ("hutch++", "hutchinson", "xtrace", "krylov")
DiagonalMethod = Literal["hutchinson", "xdiag"]
# The fewest products with which each method gives an estimate (and, but for Hutchinson's single
# probe, whose standard error is NaN, a standard error).
_MIN_MATVECS = {
    "hutch++": meyer2021hutchpp.MIN_MATVECS,
    "hutchinson": hutchinson.MIN_MATVECS,
    "xtrace": epperly2024xtrace.MIN_MATVECS,
    "xdiag": epperly2024xtrace.MIN_MATVECS,
    "krylov": chen2023krylov_aware.MIN_MATVECS,
}
# Products that go into a sketch whose size may not exceed n.
_SKETCH_FRACTION = {
    "hutch++": 3,
    "xtrace": 2,
    "xdiag": 2,
    "krylov": chen2023krylov_aware.SKETCH_FRACTION,
}


def trace(
    op: Any,
    num_matvecs: int,
    *,
    method: TraceMethod = "hutch++",
    distribution: Distribution = "rademacher",
    seed: int | torch.Generator | None = None,
    block_size: int | None = None,
    progress: bool | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
) -> TraceResult:
    """Estimate ``tr(op)`` with about ``num_matvecs`` products, with a standard error.

    Methods: "hutchinson" (plain Hutchinson: valid for any square operator, so dense matrices
    are not checked for symmetry; from one product on, whose standard error is NaN), "hutch++"
    (default; Meyer et al. 2021: a third of
    the products find a dominant subspace, a third take its trace exactly, a third run
    Hutchinson on the rest), "xtrace" (Epperly et al. 2024: every probe is used in the sketch
    and, left out of it, as a Hutchinson probe) and "krylov" (Krylov-aware, Chen and Hallman
    2023: half of the products run single-vector Lanczos with full reorthogonalisation, whose
    recurrence gives the trace of the Krylov space for free, the other half Hutchinson on its
    complement; in our measurements the most accurate on decaying and Hessian spectra from about
    30 products on, keeping ``num_matvecs / 2`` n-vectors). "hutch++", "hutchinson" and "krylov"
    spend exactly ``num_matvecs``; "xtrace" spends the largest even number not above it
    (``result.num_matvecs`` says). Products are taken ``block_size`` columns at a time (default:
    all at once); Hutchinson and the Hutchinson parts of Hutch++ and "krylov" also draw their
    probes block by block, so a block bounds their memory (the streaming variants), while XTrace
    keeps its whole sketch and "krylov" its Lanczos basis (one product per Lanczos step).

    ``checkpoint`` / ``checkpoint_every`` / ``checkpoint_seconds``: resumable runs, as for
    :func:`lanczos` (bit-identical results after a resume); the state is saved between blocks
    of products, so ``block_size`` also bounds the work an interruption can lose.
    """
    operator = _as_estimated_operator(op, method)
    _check_request(method, TRACE_METHODS, num_matvecs, operator.size)
    check_distribution(distribution)
    _check_block_size(block_size)
    options = {"method": method, "distribution": distribution}
    state = _start(
        "trace", op, operator, num_matvecs, options, seed, block_size,
        checkpoint, checkpoint_every, checkpoint_seconds,
    )  # fmt: skip
    with progress_bar(f"trace ({method})", num_matvecs, progress) as bar:
        bar.update(state.num_matvecs)  # products of a resumed run
        sketching = _SKETCHING_TRACE_ESTIMATORS.get(method)
        if sketching is not None:
            estimate, stderr = sketching(
                operator,
                num_matvecs,
                state,
                distribution=distribution,
                block_size=block_size,
                bar=bar,
            )
        else:
            hutchinson_samples(
                operator,
                num_matvecs,
                state,
                diagonal=False,
                distribution=distribution,
                block_size=block_size,
                bar=bar,
            )
            mean, standard_error = mean_and_stderr_or_nan(state)
            estimate, stderr = float(mean), float(standard_error)
    return TraceResult(estimate, stderr, state.num_matvecs, method)


# the trace estimators with one signature: (operator, num_matvecs, state, distribution=,
# block_size=, bar=) -> (estimate, stderr); plain Hutchinson is inline in trace()
_SKETCHING_TRACE_ESTIMATORS = {
    "hutch++": hutchpp,
    "krylov": krylov_aware_trace,
    "xtrace": xtrace,
}


def diagonal(
    op: Any,
    num_matvecs: int,
    *,
    method: DiagonalMethod = "hutchinson",
    seed: int | torch.Generator | None = None,
    block_size: int | None = None,
    progress: bool | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_seconds: float | None = None,
) -> DiagonalResult:
    """Estimate ``diag(op)`` from Rademacher probes, with an entrywise standard error.

    "hutchinson" averages ``z * (H z)`` over ``num_matvecs`` probes (streamed in blocks of
    ``block_size``; any square operator, one probe giving a NaN standard error); "xdiag" (Epperly et al. 2024) spends ``2 * (num_matvecs // 2)`` products and
    is exact in the span of its sketch, far better when the spectrum decays. The result is numpy
    for numpy-path operators and a torch tensor on the operator's device otherwise.
    ``checkpoint`` / ``checkpoint_every`` / ``checkpoint_seconds``: as for :func:`trace`.
    """
    operator = _as_estimated_operator(op, method)
    _check_request(method, ("hutchinson", "xdiag"), num_matvecs, operator.size)
    _check_block_size(block_size)
    state = _start(
        "diagonal", op, operator, num_matvecs, {"method": method}, seed, block_size,
        checkpoint, checkpoint_every, checkpoint_seconds,
    )  # fmt: skip
    with progress_bar(f"diagonal ({method})", num_matvecs, progress) as bar:
        bar.update(state.num_matvecs)  # products of a resumed run
        if method == "xdiag":
            mean, stderr = xdiag(operator, num_matvecs, state, block_size=block_size, bar=bar)
        else:
            hutchinson_samples(
                operator,
                num_matvecs,
                state,
                diagonal=True,
                distribution="rademacher",
                block_size=block_size,
                bar=bar,
            )
            mean, stderr = mean_and_stderr_or_nan(state)
    return DiagonalResult(operator.output(mean), operator.output(stderr), state.num_matvecs, method)


class _GeneralMatrix:
    """A dense real matrix in the solvers' torch protocol, which (unlike a bare tensor) is not
    checked for symmetry; aligned as :func:`as_operator` aligns dense matrices."""

    def __init__(self, matrix: Tensor) -> None:
        self.matrix = _aligned(matrix)
        self.shape, self.device, self.torch_dtype = matrix.shape, matrix.device, matrix.dtype

    def matmat(self, block: Tensor) -> Tensor:
        return self.matrix @ block


def _as_estimated_operator(op: Any, method: str) -> Operator:
    """``as_operator(op)``; for plain Hutchinson, which is unbiased for any square operator
    (``E[z^T A z] = tr(A)`` needs no symmetry), dense matrices skip the symmetry check and
    multiply as before (torch, float64 on the CPU for ndarrays, which come back as numpy)."""
    if method == "hutchinson":
        if isinstance(op, Tensor) and op.dtype.is_floating_point:
            return as_operator(_GeneralMatrix(op))
        if isinstance(op, np.ndarray) and np.issubdtype(op.dtype, np.floating) and op.ndim == 2:
            matrix = torch.from_numpy(np.ascontiguousarray(op, dtype=np.float64))
            return dataclasses.replace(as_operator(_GeneralMatrix(matrix)), returns_numpy=True)
        if scipy.sparse.issparse(op) and np.issubdtype(op.dtype, np.floating):
            return as_operator(scipy.sparse.linalg.aslinearoperator(op))
    return as_operator(op)


def _start(
    solver: str,
    op: Any,
    operator: Operator,
    num_matvecs: int,
    options: dict[str, Any],
    seed: int | torch.Generator | None,
    block_size: int | None,
    checkpoint: Any,
    checkpoint_every: int | None,
    checkpoint_seconds: float | None,
) -> EstimatorState:
    """A fresh estimator state, or the checkpointed one of a compatible earlier run."""
    generator = make_generator(operator.space.shared_seed(seed))
    saver = Checkpoint(
        checkpoint,
        solver=solver,
        options={
            "num_matvecs": num_matvecs,
            **options,
            "seed": seed_option(seed),
            "block_size": block_size,
        },
        op=op,
        operator=operator,
        every_matvecs=checkpoint_every,
        every_seconds=checkpoint_seconds,
    )
    state = EstimatorState(generator, checkpoint=saver if saver.enabled else None)
    saved = saver.load()
    if saved is not None:
        state.load_state_dict(saved, operator.device)
    return state


def _check_request(method: str, methods: tuple[str, ...], num_matvecs: Any, size: int) -> None:
    if method not in methods:
        raise ValueError(f"method must be one of {methods}, got {method!r}")
    minimum = _MIN_MATVECS[method]
    if not isinstance(num_matvecs, int) or isinstance(num_matvecs, bool) or num_matvecs < minimum:
        raise ValueError(f"method {method!r} needs num_matvecs >= {minimum}, got {num_matvecs!r}")
    fraction = _SKETCH_FRACTION.get(method)
    if fraction is not None and num_matvecs // fraction > size:
        raise ValueError(
            f"num_matvecs={num_matvecs} gives method {method!r} a sketch of "
            f"{num_matvecs // fraction} vectors, more than the operator size n={size}; use at "
            f"most {fraction * size + fraction - 1} products (n products give the exact value "
            "from the unit vectors)"
        )


def _check_block_size(block_size: Any) -> None:
    if block_size is not None and (
        not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1
    ):
        raise ValueError(
            f"block_size must be None (all at once) or an integer >= 1, got {block_size!r}"
        )
