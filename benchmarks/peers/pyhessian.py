"""PyHessian (``from pyhessian import hessian``): Hessian only. Two ways it multiplies:

- ``dataloader`` mode (``hessian(..., dataloader=batches)``): every product redoes the forward
  pass and the gradient with ``create_graph=True``, then one more backward;
- ``data`` mode on a single batch (``hessian(..., data=batch)``): the gradient graph is built
  once in the constructor and kept, so a product is one backward through it (cheaper per
  product, but the graph stays in memory).

Its routines: ``eigenvalues`` (power iteration with deflation), ``trace`` (Hutchinson) and
``density`` (SLQ; it calls ``torch.eig``, which torch 2.x removed).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
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
    flat,
    seed_everything,
    split,
)

LABEL = "PyHessian"
MUTATES_MODEL = True  # it calls model.eval() and leaves graph-carrying .grad on the parameters
VARIANTS = ("dataloader", "cached graph")
POWER_ITERATION_MAX_ITER = 300  # per eigenvalue
EIGS_TOL_LADDER = (1e-4, 1e-6, 1e-8)
EIGS_WHICH = "LM"  # power iteration converges to the largest magnitudes  # power iteration is slow: a short ladder


def version() -> str:
    from importlib.metadata import version as dist_version

    from pyhessian import hessian  # noqa: F401

    return dist_version("pyhessian")


def _single_batch(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    if len(problem.batches) != 1:
        raise Unsupported("its cached-graph mode takes a single batch")
    return problem.batches[0]


def make_hessian(problem: Problem, variant: str = "dataloader") -> Any:
    from pyhessian import hessian

    cuda = problem.device.type == "cuda"
    for param in problem.model.parameters():  # its constructor accumulates into .grad
        param.grad = None
    if variant == "cached graph":
        return hessian(problem.model, problem.criterion, data=_single_batch(problem), cuda=cuda)
    if variant == "dataloader":
        return hessian(problem.model, problem.criterion, dataloader=problem.batches, cuda=cuda)
    raise Unsupported(f"unknown variant {variant!r}")


def make_matvec(problem: Problem, curvature: str, variant: str = "dataloader") -> MatvecFn:
    from pyhessian.utils import hessian_vector_product

    if curvature != "hessian":
        raise Unsupported("PyHessian computes Hessian products only")
    computer = make_hessian(problem, variant)
    params = computer.params

    def matvec(vector: torch.Tensor) -> torch.Tensor:
        pieces = split(vector, params)
        if variant == "cached graph":
            return flat(hessian_vector_product(computer.gradsH, params, pieces))
        _, product = computer.dataloader_hv_product(pieces)
        return flat(product)

    return matvec


@contextlib.contextmanager
def _counted(computer: Any, counter: MatvecCounter) -> Iterator[None]:
    """Count PyHessian's products in both modes (the single-batch mode calls a module-level
    function, the dataloader mode a method); restores both on exit."""
    from pyhessian import hessian  # noqa: F401  (imports the module)

    module = sys.modules["pyhessian.hessian"]  # the package re-exports a class of that name
    original_function = getattr(module, "hessian_vector_product")  # noqa: B009
    original_method = computer.dataloader_hv_product

    def counted_function(*args: Any, **kwargs: Any) -> Any:
        counter.add(1)
        return original_function(*args, **kwargs)

    def counted_method(*args: Any, **kwargs: Any) -> Any:
        counter.add(1)
        return original_method(*args, **kwargs)

    setattr(module, "hessian_vector_product", counted_function)  # noqa: B010
    computer.dataloader_hv_product = counted_method
    try:
        yield
    finally:
        setattr(module, "hessian_vector_product", original_function)  # noqa: B010
        del computer.dataloader_hv_product


def _mode(problem: Problem) -> str:
    return "cached graph" if len(problem.batches) == 1 else "dataloader"


def top_eigenvalues(
    problem: Problem, curvature: str, k: int, tol: float, seed: int, reference: Any = None
) -> EigenOutcome:
    if curvature != "hessian":
        raise Unsupported("PyHessian computes Hessian eigenvalues only")
    computer = make_hessian(problem, _mode(problem))
    counter = MatvecCounter()
    seed_everything(seed)
    with _counted(computer, counter):
        values, _ = computer.eigenvalues(maxIter=POWER_ITERATION_MAX_ITER, tol=tol, top_n=k)
    return EigenOutcome(
        np.sort(np.asarray(values, dtype=np.float64))[::-1],
        counter.count,
        note=f"power iteration, maxIter={POWER_ITERATION_MAX_ITER} per eigenvalue, tol={tol:g}",
    )


def estimate_trace(
    problem: Problem, curvature: str, method: str, num_matvecs: int, seed: int
) -> TraceOutcome:
    if curvature != "hessian":
        raise Unsupported("PyHessian estimates the Hessian trace only")
    if method != "hutchinson":
        raise Unsupported(f"no {method} trace estimator (Hutchinson only)")
    computer = make_hessian(problem, _mode(problem))
    counter = MatvecCounter()
    seed_everything(seed)
    with _counted(computer, counter):
        # tol=-inf: never stop early, spend exactly the budget
        samples = computer.trace(maxIter=num_matvecs, tol=float("-inf"))
    return TraceOutcome(float(np.mean(samples)), counter.count)


def spectral_density(
    problem: Problem, curvature: str, num_runs: int, lanczos_steps: int, seed: int
) -> DensityOutcome:
    if curvature != "hessian":
        raise Unsupported("PyHessian computes the Hessian density only")
    computer = make_hessian(problem, _mode(problem))
    counter = MatvecCounter()
    seed_everything(seed)
    try:
        with _counted(computer, counter):
            nodes, weights = computer.density(iter=lanczos_steps, n_v=num_runs)
    except (AttributeError, RuntimeError) as error:
        raise Unsupported(
            f"its density() fails on torch {torch.__version__}: {type(error).__name__}: "
            f"{str(error).splitlines()[0][:120]}"
        ) from error
    node_array = np.asarray(nodes, dtype=np.float64).reshape(-1)
    weight_array = np.asarray(weights, dtype=np.float64).reshape(-1)
    return DensityOutcome(
        counter.count, nodes=node_array, weights=weight_array / weight_array.sum()
    )
