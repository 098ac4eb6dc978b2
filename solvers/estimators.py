"""``trace`` and ``diagonal``: validate the request, then hand it to the paper-named estimator."""

from __future__ import annotations

import os
from typing import Any, Literal

import torch

from . import chen2023krylov_aware, epperly2024xtrace, meyer2021hutchpp
from ._operator import Operator, as_operator
from ._progress import progress_bar
from ._random import Distribution, check_distribution, make_generator
from ._sampling import EstimatorState, mean_and_stderr
from .checkpoint import Checkpoint, seed_option
from .chen2023krylov_aware import krylov_aware_trace
from .epperly2024xtrace import xdiag, xtrace
from .hutchinson import hutchinson_samples
from .meyer2021hutchpp import hutchpp
from .results import DiagonalResult, TraceResult

TraceMethod = Literal["hutch++", "hutchinson", "xtrace", "krylov"]
TRACE_METHODS = ("hutch++", "hutchinson", "xtrace", "krylov")
DiagonalMethod = Literal["hutchinson", "xdiag"]
# The fewest products with which each method gives an estimate and a standard error.
_MIN_MATVECS = {
    "hutch++": meyer2021hutchpp.MIN_MATVECS,
    "hutchinson": 2,
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

    Methods: "hutchinson" (plain Hutchinson), "hutch++" (default; Meyer et al. 2021: a third of
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
    operator = as_operator(op)
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
            mean, standard_error = mean_and_stderr(state)
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
    ``block_size``); "xdiag" (Epperly et al. 2024) spends ``2 * (num_matvecs // 2)`` products and
    is exact in the span of its sketch, far better when the spectrum decays. The result is numpy
    for numpy-path operators and a torch tensor on the operator's device otherwise.
    ``checkpoint`` / ``checkpoint_every`` / ``checkpoint_seconds``: as for :func:`trace`.
    """
    operator = as_operator(op)
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
            mean, stderr = mean_and_stderr(state)
    return DiagonalResult(operator.output(mean), operator.output(stderr), state.num_matvecs, method)


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
        raise ValueError(
            f"method {method!r} needs num_matvecs >= {minimum} (for an estimate and a standard "
            f"error), got {num_matvecs!r}"
        )
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
