"""torch-linop: the operators on the torch path (tensors stay on the device) and
``torch_linop.solvers`` for eigenvalues, traces and densities."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from benchmarks.models import Problem
from benchmarks.peers import (
    DensityOutcome,
    EigenOutcome,
    MatvecCounter,
    MatvecFn,
    TraceOutcome,
    Unsupported,
)

LABEL = "torch-linop"
MUTATES_MODEL = False
# matvec rows: the default operator, and the Hessian with its gradient graphs kept between
# products (``HessianOperator(cache_graph=True)``, the counterpart of PyHessian's cached graph)
VARIANTS = (None, "cached graph")

TRACE_METHODS = {
    "hutchinson": "hutchinson",
    "hutch++": "hutch++",
    "xtrace": "xtrace",
    "krylov": "krylov",
}


def version() -> str:
    import torch_linop

    return str(torch_linop.__version__)


def make_operator(problem: Problem, curvature: str, variant: str | None = None) -> Any:
    """Our ``HessianOperator`` / ``GGNOperator`` / ``EmpiricalFisherOperator`` on the problem;
    ``variant="cached graph"``: the Hessian with ``cache_graph=True``."""
    from torch_linop import (
        EmpiricalFisherOperator,
        GGNOperator,
        HessianOperator,
        supervised_loss,
    )

    classes = {"hessian": HessianOperator, "ggn": GGNOperator, "ef": EmpiricalFisherOperator}
    if curvature not in classes:
        raise Unsupported(f"unknown curvature {curvature!r}")
    loss = supervised_loss(problem.criterion)
    if variant == "cached graph":
        if curvature != "hessian":
            raise Unsupported("the cached gradient graph is a Hessian option")
        return HessianOperator(problem.model, problem.batches, loss, cache_graph=True)
    if variant is not None:
        raise Unsupported(f"unknown variant {variant!r}")
    return classes[curvature](problem.model, problem.batches, loss)


def make_matvec(problem: Problem, curvature: str, variant: str | None = None) -> MatvecFn:
    return make_operator(problem, curvature, variant).apply


class CountingOperator:
    """Our operator behind the solvers' torch protocol, counting the columns it multiplies."""

    def __init__(self, operator: Any, counter: MatvecCounter) -> None:
        self.operator = operator
        self.counter = counter
        self.shape = operator.shape
        self.device = operator.device
        self.torch_dtype = operator.torch_dtype

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        self.counter.add(1 if block.dim() == 1 else block.shape[1])
        return self.operator.apply(block)


def _solvers() -> Any:
    try:
        from torch_linop import solvers
    except ImportError as error:  # the solvers are optional while they are being written
        raise Unsupported(f"torch_linop.solvers unavailable ({error})") from error
    return solvers


def top_eigenvalues(
    problem: Problem, curvature: str, k: int, tol: float, seed: int, reference: Any = None
) -> EigenOutcome:
    """Top-k (largest algebraic) eigenvalues with ``torch_linop.solvers.lanczos`` on the torch
    path, eigenvalues only (like ``eigsh(return_eigenvectors=False)``). Its ``tol`` bounds the
    residual relative to the largest Ritz value."""
    import warnings

    solvers = _solvers()
    counter = MatvecCounter()
    operator = CountingOperator(make_operator(problem, curvature), counter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # unconverged: the table shows the error
        result = solvers.lanczos(
            operator, k, which="LA", tol=tol, seed=seed, return_eigenvectors=False
        )
    values = np.sort(np.asarray(result.eigenvalues, dtype=np.float64))[::-1]
    note = "" if bool(np.all(result.converged)) else "not converged within max_matvecs"
    return EigenOutcome(values, counter.count, note=note)


def estimate_trace(
    problem: Problem, curvature: str, method: str, num_matvecs: int, seed: int
) -> TraceOutcome:
    solvers = _solvers()
    if method not in TRACE_METHODS:
        raise Unsupported(f"no {method} trace estimator")
    counter = MatvecCounter()
    operator = CountingOperator(make_operator(problem, curvature), counter)
    result = solvers.trace(
        operator, method=TRACE_METHODS[method], num_matvecs=num_matvecs, seed=seed
    )
    return TraceOutcome(float(result.estimate), counter.count)


def spectral_density(
    problem: Problem, curvature: str, num_runs: int, lanczos_steps: int, seed: int
) -> DensityOutcome:
    solvers = _solvers()
    counter = MatvecCounter()
    operator = CountingOperator(make_operator(problem, curvature), counter)
    result = solvers.spectral_density(
        operator, num_runs=num_runs, lanczos_steps=lanczos_steps, seed=seed
    )
    nodes = np.asarray(result.nodes, dtype=np.float64).reshape(-1)
    weights = np.asarray(result.weights, dtype=np.float64).reshape(-1)
    return DensityOutcome(
        counter.count,
        nodes=nodes,
        weights=weights / weights.sum(),
        grid=np.asarray(result.grid),
        density=np.asarray(result.density),
    )
