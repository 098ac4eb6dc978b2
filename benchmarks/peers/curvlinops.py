"""curvlinops (``curvlinops-for-pytorch``): ``HessianLinearOperator``, ``GGNLinearOperator``,
``EFLinearOperator`` on the torch path; its trace estimators (``hutchinson_trace``,
``hutchpp_trace``, ``xtrace``) and Papyan's ``lanczos_approximate_spectrum``. It ships no top-k
eigensolver: its documentation runs scipy's ``eigsh`` on ``to_scipy()``, which is what we do."""

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
    seed_everything,
)

LABEL = "curvlinops"
MUTATES_MODEL = False


def version() -> str:
    from importlib.metadata import version as dist_version

    import curvlinops  # noqa: F401

    return dist_version("curvlinops-for-pytorch")


def make_operator(problem: Problem, curvature: str) -> Any:
    import curvlinops

    classes = {
        "hessian": curvlinops.HessianLinearOperator,
        "ggn": curvlinops.GGNLinearOperator,
        "ef": curvlinops.EFLinearOperator,
    }
    if curvature not in classes:
        raise Unsupported(f"unknown curvature {curvature!r}")
    return classes[curvature](
        problem.model,
        problem.criterion,
        problem.params,
        problem.batches,
        check_deterministic=False,
        num_data=problem.num_inputs,
    )


def make_matvec(problem: Problem, curvature: str) -> MatvecFn:
    operator = make_operator(problem, curvature)
    return lambda vector: operator @ vector


def _counting(operator: Any, counter: MatvecCounter) -> Any:
    """Wrap a curvlinops operator so every product adds its number of columns to ``counter``."""
    from curvlinops._torch_base import PyTorchLinearOperator

    class Counting(PyTorchLinearOperator):
        SELF_ADJOINT = True

        def __init__(self) -> None:
            super().__init__(operator._in_shape, operator._out_shape)

        def _matmat(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
            counter.add(blocks[0].shape[-1])
            return operator._matmat(blocks)

        @property
        def device(self) -> torch.device:
            return operator.device

        @property
        def dtype(self) -> torch.dtype:
            return operator.dtype

    return Counting()


def top_eigenvalues(
    problem: Problem, curvature: str, k: int, tol: float, seed: int, reference: Any = None
) -> EigenOutcome:
    from scipy.sparse.linalg import eigsh

    counter = MatvecCounter()
    operator = _counting(make_operator(problem, curvature), counter)
    start = np.random.default_rng(seed).standard_normal(operator.shape[0])
    values = eigsh(
        operator.to_scipy(dtype=np.float64),
        k=k,
        which="LA",
        tol=tol,
        v0=start,
        return_eigenvectors=False,
    )
    return EigenOutcome(np.sort(values)[::-1], counter.count, note="scipy eigsh on to_scipy()")


def estimate_trace(
    problem: Problem, curvature: str, method: str, num_matvecs: int, seed: int
) -> TraceOutcome:
    import curvlinops

    estimators = {
        "hutchinson": curvlinops.hutchinson_trace,
        "hutch++": curvlinops.hutchpp_trace,
        "xtrace": curvlinops.xtrace,
    }
    if method not in estimators:
        raise Unsupported(f"no {method} trace estimator")
    counter = MatvecCounter()
    operator = _counting(make_operator(problem, curvature), counter)
    seed_everything(seed)  # curvlinops draws its probes from torch's global generator
    estimate = estimators[method](operator, num_matvecs)
    return TraceOutcome(float(estimate), counter.count)


def spectral_density(
    problem: Problem, curvature: str, num_runs: int, lanczos_steps: int, seed: int
) -> DensityOutcome:
    import curvlinops

    counter = MatvecCounter()
    operator = _counting(make_operator(problem, curvature), counter)
    seed_everything(seed)
    grid, density = curvlinops.lanczos_approximate_spectrum(
        operator, lanczos_steps, num_repeats=num_runs
    )
    return DensityOutcome(
        counter.count,
        grid=grid.detach().cpu().double().numpy(),
        density=density.detach().cpu().double().numpy(),
        note="Papyan's LanczosApproxSpec (no reorthogonalisation, eigsh for the boundaries)",
    )
