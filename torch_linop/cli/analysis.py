"""Build the requested curvature operator and run the requested solvers on it."""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from torch_linop.cli.arguments import Options
from torch_linop.cli.errors import UsageError
from torch_linop.cli.workload import Workload
from torch_linop.empirical_fisher import EmpiricalFisherOperator
from torch_linop.ggn import GGNOperator
from torch_linop.hessian import HessianOperator
from torch_linop.mc_fisher import MCFisherOperator
from torch_linop.operator import CurvatureOperator
from torch_linop.params import match_names, split_vector

CURVATURE_NAMES = {
    "hessian": "Hessian",
    "ggn": "GGN",
    "ef": "empirical Fisher",
    "mc-fisher": "Monte-Carlo Fisher",
}


# The symbol each report uses for the matrix, and whether the matrix is positive semi-definite
# (its eigenvalues are >= 0, so "largest" and "largest magnitude" are the same).
CURVATURE_SYMBOLS = {"hessian": "H", "ggn": "G", "ef": "F", "mc-fisher": "F"}
POSITIVE_SEMIDEFINITE = {"hessian": False, "ggn": True, "ef": True, "mc-fisher": True}


@dataclass
class Analysis:
    """Everything one run computed; solver results are ``None`` when not requested.

    ``dense_size`` is set when the matrix was formed from n products (``-k >= n`` on a small
    operator, or ``--num-matvecs >= n``): the trace and diagonal are then exact and ``eigen``
    holds every eigenvalue. ``diagonal_total`` is the sum of the per-tensor diagonal estimates
    with its standard error, comparable with the trace.
    """

    curvature: str
    num_parameters: int
    num_data: int
    parameter_names: list[str]
    eigen: Any = None
    trace: Any = None
    density: Any = None
    diagonal: Any = None
    diagonal_blocks: list[dict[str, Any]] = field(default_factory=list)
    diagonal_total: tuple[float, float] | None = None
    dense_size: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def symbol(self) -> str:
        return CURVATURE_SYMBOLS[self.curvature]

    @property
    def positive_semidefinite(self) -> bool:
        return POSITIVE_SEMIDEFINITE[self.curvature]


def build_operator(workload: Workload, options: Options) -> CurvatureOperator:
    """The operator for ``--curvature`` over the ``--param-filter`` parameters; configuration
    problems (no parameter matched, a loss without the split the GGN needs, a model that does not
    run on the data) become usage errors, found with one trial product."""
    param_filter = match_names(*options.param_filter) if options.param_filter else None
    common: dict[str, Any] = {"param_filter": param_filter, "cache_graph": options.cache_graph}
    try:
        if options.curvature == "hessian":
            operator: CurvatureOperator = HessianOperator(
                workload.model, workload.data, workload.loss, **common
            )
        elif options.curvature == "ggn":
            operator = GGNOperator(workload.model, workload.data, workload.loss, **common)
        elif options.curvature == "ef":
            operator = EmpiricalFisherOperator(
                workload.model, workload.data, workload.loss, **common
            )
        else:
            operator = MCFisherOperator(
                workload.model,
                workload.data,
                workload.loss,
                mc_samples=options.mc_samples,
                seed=options.seed,
                **common,
            )
    except (ValueError, TypeError) as error:
        raise UsageError(f"cannot build the {options.curvature} operator: {error}") from None
    _trial_product(operator, options.curvature)
    return operator


def _trial_product(operator: CurvatureOperator, curvature: str) -> None:
    generator = torch.Generator().manual_seed(0)
    vector = torch.randn(operator.shape[0], generator=generator, dtype=torch.float64)
    try:
        operator @ vector.to(operator.device, operator.torch_dtype)
    except (ValueError, TypeError, NotImplementedError, KeyError, IndexError) as error:
        raise UsageError(
            f"a trial {curvature} product on the model and data failed with "
            f"{type(error).__name__}: {error}"
        ) from None


def _stage(message: str, options: Options) -> None:
    if options.progress:
        print(f"... {message}", file=sys.stderr, flush=True)


def _timed(analysis: Analysis, name: str, function: Any) -> Any:
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        result = function()
    analysis.seconds[name] = time.perf_counter() - start
    analysis.warnings.extend(str(w.message) for w in caught if w.category is RuntimeWarning)
    return result


def analyse(operator: CurvatureOperator, options: Options) -> Analysis:
    """Run ``options.quantities`` on ``operator`` in the order eigs, trace, density, diag.

    "Top k" means the k largest-magnitude eigenvalues, as ``lanczos``'s default ``which="LM"``
    (for the PSD GGN and Fishers these are the largest). When n products determine a quantity
    exactly (``--num-matvecs >= n`` for the trace and diagonal, ``-k >= n`` on a small matrix),
    the matrix is formed once from the unit vectors instead of estimating it.
    """
    from torch_linop.cli.dense import dense_eigen, exact_diagonal, exact_trace, form_matrix
    from torch_linop.cli.preflight import check_top_k

    num_parameters = operator.shape[0]
    analysis = Analysis(
        curvature=options.curvature,
        num_parameters=num_parameters,
        num_data=operator.num_data,
        parameter_names=list(operator.params),
    )
    quantities = options.quantities
    exact_estimates = options.num_matvecs >= num_parameters
    dense_eigs = "eigs" in quantities and check_top_k(options.top_k, num_parameters)
    matrix = None
    if dense_eigs or (exact_estimates and ("trace" in quantities or "diag" in quantities)):
        _stage(f"forming the {num_parameters} x {num_parameters} matrix", options)
        matrix = _timed(analysis, "matrix", lambda: form_matrix(operator))
        analysis.dense_size = num_parameters
    if "eigs" in quantities:
        if matrix is not None and dense_eigs:
            analysis.eigen = _timed(
                analysis, "eigs", lambda: dense_eigen(matrix, torch.finfo(operator.torch_dtype).eps)
            )
        else:
            k = options.top_k
            _stage(f"top-{k} eigenvalues (Lanczos)", options)
            from torch_linop.solvers import lanczos

            analysis.eigen = _timed(
                analysis,
                "eigs",
                # verify=True: the report prints measured residuals ||A v - lambda v|| (k more
                # products), not the Lanczos relation's estimates, which fall below rounding
                lambda: lanczos(
                    operator,
                    k,
                    which="LM",
                    seed=options.seed,
                    progress=options.progress,
                    verify=True,
                ),
            )
    if "trace" in quantities:
        if matrix is not None and exact_estimates:
            analysis.trace = exact_trace(matrix)
        else:
            # Hutch++ spends a third of its budget on a sketch, which cannot exceed n
            budget = min(options.num_matvecs, 3 * num_parameters)
            _stage(f"trace (Hutch++, {budget} products)", options)
            from torch_linop.solvers import trace

            analysis.trace = _timed(
                analysis,
                "trace",
                lambda: trace(
                    operator,
                    num_matvecs=budget,
                    seed=options.seed,
                    progress=options.progress,
                ),
            )
    if "density" in quantities:
        steps = min(options.slq_steps, num_parameters)
        _stage(f"spectral density (SLQ, {options.slq_runs} runs x {steps} steps)", options)
        from torch_linop.solvers import spectral_density

        analysis.density = _timed(
            analysis,
            "density",
            lambda: spectral_density(
                operator,
                num_runs=options.slq_runs,
                lanczos_steps=steps,
                seed=options.seed,
                progress=options.progress,
            ),
        )
    if "diag" in quantities:
        if matrix is not None and exact_estimates:
            analysis.diagonal = exact_diagonal(matrix)
            sums = [float(piece.sum()) for piece in _split(analysis.diagonal.estimate, operator)]
            analysis.diagonal_blocks = diagonal_blocks(
                operator, analysis.diagonal, sums, [0.0] * len(sums)
            )
            analysis.diagonal_total = (float(np.trace(matrix)), 0.0)
        else:
            _stage(f"diagonal (Hutchinson, {options.num_matvecs} products)", options)
            from torch_linop.cli.blocks import hutchinson_by_tensor

            result, sums, stderrs, total = _timed(
                analysis,
                "diag",
                lambda: hutchinson_by_tensor(operator, options.num_matvecs, options.seed),
            )
            analysis.diagonal = result
            analysis.diagonal_blocks = diagonal_blocks(operator, result, list(sums), list(stderrs))
            analysis.diagonal_total = total
    return analysis


def _split(values: Any, operator: CurvatureOperator) -> list[torch.Tensor]:
    estimate = torch.as_tensor(np.asarray(_to_numpy(values)), dtype=torch.float64)
    shapes = [param.shape for param in operator.params.values()]
    return [piece.reshape(-1) for piece in split_vector(estimate, shapes)]


def diagonal_blocks(
    operator: CurvatureOperator, result: Any, sums: list[float], sum_stderrs: list[float]
) -> list[dict[str, Any]]:
    """Per parameter tensor: its diagonal's sum (the block's trace) with the sum's standard
    error, the mean and the largest entry."""
    blocks = []
    for name, values, total, stderr in zip(
        operator.params, _split(result.estimate, operator), sums, sum_stderrs
    ):
        blocks.append(
            {
                "name": name,
                "size": int(values.numel()),
                "sum": float(total),
                "sum_stderr": float(stderr),
                "mean": float(values.mean()),
                "max": float(values.max()),
            }
        )
    return blocks


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)
