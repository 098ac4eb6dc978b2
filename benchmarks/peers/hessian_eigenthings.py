"""hessian-eigenthings: ``HessianOperator`` (double backward), ``GGNOperator`` (forward-mode JVP,
autograd loss Hessian, VJP), ``EmpiricalFisherOperator`` (per-sample gradients by
``vmap(grad)``); its ``lanczos``, ``trace`` (Hutchinson, Hutch++) and ``spectral_density``."""

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

LABEL = "hessian-eigenthings"
MUTATES_MODEL = False

# its lanczos runs a fixed number of steps (no restarts, no tolerance-driven stop): the suite
# grows max_iter through this ladder until the eigenvalues reach the tolerance
EIGS_TUNED_BY_REFERENCE = True  # the suite passes the reference instead of sweeping tol
LANCZOS_STEPS = (20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640)


def version() -> str:
    import hessian_eigenthings

    return str(hessian_eigenthings.__version__)


def make_operator(problem: Problem, curvature: str) -> Any:
    import hessian_eigenthings as he

    criterion = problem.criterion
    if curvature == "hessian":
        return he.HessianOperator(problem.model, problem.batches, he.supervised_loss(criterion))
    if curvature == "ggn":
        return he.GGNOperator(
            problem.model,
            problem.batches,
            he.supervised_forward,
            he.supervised_loss_of_output(criterion),
        )
    if curvature == "ef":
        if problem.rows_per_input > 1:
            raise Unsupported(
                "its empirical Fisher takes per-sample gradients over the batch axis (one per "
                "sequence); ours and curvlinops use one per token: a different matrix"
            )
        return he.EmpiricalFisherOperator(
            problem.model, problem.batches, he.supervised_per_sample_loss(criterion)
        )
    raise Unsupported(f"unknown curvature {curvature!r}")


def make_matvec(problem: Problem, curvature: str) -> MatvecFn:
    return make_operator(problem, curvature).matvec


def _counting(operator: Any, counter: MatvecCounter) -> Any:
    import hessian_eigenthings as he

    def matvec(vector: torch.Tensor) -> torch.Tensor:
        counter.add(1)
        return operator.matvec(vector)

    return he.LambdaOperator(matvec, operator.size, operator.device, operator.dtype)


def top_eigenvalues(
    problem: Problem, curvature: str, k: int, tol: float, seed: int, reference: Any = None
) -> EigenOutcome:
    """Its ``lanczos(k, max_iter, which="LA")`` (fixed step count, full reorthogonalisation) at
    growing ``max_iter`` until its own convergence flags are all set (``reference`` None, what a
    user would do) or until every eigenvalue is within ``tol`` (relative) of ``reference``.
    Only the successful attempt's matvecs count (a user who knew the right ``max_iter``)."""
    import hessian_eigenthings as he

    base = make_operator(problem, curvature)
    last: EigenOutcome | None = None
    for steps in LANCZOS_STEPS:
        if steps >= base.size:
            break
        counter = MatvecCounter()
        result = he.lanczos(
            _counting(base, counter),
            k=k,
            max_iter=steps,
            tol=tol,
            which="LA",
            seed=seed,
            reorthogonalize=True,
        )
        values = np.sort(result.eigenvalues.detach().cpu().double().numpy())[::-1]
        last = EigenOutcome(values, counter.count, note=f"max_iter={steps}")
        if reference is None:
            if bool(result.converged.all()):
                return last
        elif np.all(np.abs(values - reference) <= tol * np.abs(reference)):
            return last
    assert last is not None
    last.note += " (largest tried; tolerance not reached)"
    return last


def estimate_trace(
    problem: Problem, curvature: str, method: str, num_matvecs: int, seed: int
) -> TraceOutcome:
    import hessian_eigenthings as he

    methods = {"hutchinson": "hutchinson", "hutch++": "hutch++"}
    if method not in methods:
        raise Unsupported(f"no {method} trace estimator")
    counter = MatvecCounter()
    operator = _counting(make_operator(problem, curvature), counter)
    result = he.trace(operator, num_matvecs=num_matvecs, method=methods[method], seed=seed)
    return TraceOutcome(float(result.estimate), counter.count)


def spectral_density(
    problem: Problem, curvature: str, num_runs: int, lanczos_steps: int, seed: int
) -> DensityOutcome:
    import hessian_eigenthings as he

    counter = MatvecCounter()
    operator = _counting(make_operator(problem, curvature), counter)
    result = he.spectral_density(
        operator, num_runs=num_runs, lanczos_steps=lanczos_steps, seed=seed, num_grid_points=2000
    )
    nodes = result.raw_eigenvalues.detach().cpu().double().numpy().reshape(-1)
    weights = result.raw_weights.detach().cpu().double().numpy().reshape(-1)
    keep = np.isfinite(nodes)
    return DensityOutcome(
        counter.count,
        nodes=nodes[keep],
        weights=weights[keep] / weights[keep].sum(),
        grid=result.grid.detach().cpu().double().numpy(),
        density=result.density.detach().cpu().double().numpy(),
    )
