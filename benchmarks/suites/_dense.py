"""Dense curvature matrices of small problems, for exact references (traces, spectra)."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.models import Problem
from benchmarks.peers import ours as ours_adapter

DENSE_MAX_PARAMS = 6000


def dense_matrix(problem: Problem, curvature: str, block: int = 256) -> np.ndarray:
    """The ``(n, n)`` matrix in float64 from n products with unit vectors (blocks of columns)."""
    operator = ours_adapter.make_operator(problem, curvature)
    n = operator.shape[0]
    if n > DENSE_MAX_PARAMS:
        raise ValueError(
            f"{problem.name} has {n} parameters; dense references are for at most "
            f"{DENSE_MAX_PARAMS} (pick a smaller model, e.g. --models mlp-small)"
        )
    identity = torch.eye(n, dtype=operator.torch_dtype, device=operator.device)
    columns = [operator.apply(identity[:, i : i + block]) for i in range(0, n, block)]
    return torch.cat(columns, dim=1).to("cpu", torch.float64).numpy()


def exact_trace_and_spectrum(problem: Problem, curvature: str) -> tuple[float, np.ndarray]:
    """Trace (sum of the diagonal) and ascending eigenvalues (of the symmetrised matrix)."""
    matrix = dense_matrix(problem, curvature)
    return float(np.trace(matrix)), np.linalg.eigvalsh(0.5 * (matrix + matrix.T))
