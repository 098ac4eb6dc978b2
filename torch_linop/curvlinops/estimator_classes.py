"""curvlinops 2.x's estimator classes, for code written against them: each ``sample()`` draws one
probe from numpy's global random state (as curvlinops 2.x did, so ``numpy.random.seed`` makes
runs repeatable) and returns one unbiased sample; average samples for a better estimate.

curvlinops 3.x replaced these classes by functions (``hutchinson_trace``, ``hutchpp_trace``,
``hutchinson_diag``, ``hutchinson_squared_fro``), which this package also offers; new code should
use those or ``torch_linop.solvers.trace``/``diagonal``, which spend a fixed budget and return a
standard error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from torch_linop.curvlinops._torch_base import is_protocol_operator, operator_dtype

DISTRIBUTIONS = ("rademacher", "normal")


def random_vector(dim: int, distribution: str) -> np.ndarray:
    """A probe with ``E[v v^T] = I`` from numpy's global random state."""
    if distribution == "rademacher":
        return np.random.choice([-1.0, 1.0], size=dim)
    if distribution == "normal":
        return np.random.randn(dim)
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def _check_square(A: Any) -> int:
    shape = getattr(A, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"A must be a square linear operator or matrix, got shape {shape}")
    return int(shape[1])


def _apply(A: Any, v: np.ndarray) -> np.ndarray:
    """``A v`` in float64 numpy; torch operators (curvlinops 3 protocol, tensors) in torch."""
    if isinstance(A, torch.Tensor) or is_protocol_operator(A):
        dtype = A.dtype if isinstance(A, torch.Tensor) else operator_dtype(A)
        product = A @ torch.as_tensor(v).to(device=A.device, dtype=dtype)
        return product.detach().to("cpu", torch.float64).numpy().reshape(-1)
    return np.asarray(A @ v, dtype=np.float64).reshape(-1)


class HutchinsonTraceEstimator:
    """``v^T A v`` for a random ``v``: an unbiased sample of ``tr(A)``."""

    def __init__(self, A: Any) -> None:
        self._dim = _check_square(A)
        self._A = A

    def sample(self, distribution: str = "rademacher") -> float:
        v = random_vector(self._dim, distribution)
        return float(v @ _apply(self._A, v))


class HutchPPTraceEstimator:
    """Hutch++ (Meyer et al. 2021): the trace on an orthonormal basis ``Q`` of ``A S`` exactly
    (computed at the first ``sample()``, then kept) plus Hutchinson on its complement.

    ``basis_dim`` defaults to 1% of the dimension, between 1 and 10 (curvlinops 2.x's rule).
    """

    def __init__(
        self, A: Any, basis_dim: int | None = None, basis_distribution: str = "rademacher"
    ) -> None:
        self._dim = _check_square(A)
        self._A = A
        if basis_dim is None:
            basis_dim = min(10, max(self._dim // 100, 1))
        if not isinstance(basis_dim, int) or not 1 <= basis_dim <= self._dim:
            raise ValueError(f"basis_dim must be an int in [1, {self._dim}], got {basis_dim!r}")
        if basis_distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"basis_distribution must be one of {DISTRIBUTIONS}, got {basis_distribution!r}"
            )
        self._basis_dim = basis_dim
        self._basis_distribution = basis_distribution
        self._Q: np.ndarray | None = None
        self._tr_QT_A_Q: float | None = None

    def maybe_compute_and_cache_subspace(self) -> None:
        """Compute the basis ``Q`` and ``tr(Q^T A Q)`` once (``2 basis_dim`` products)."""
        if self._Q is not None:
            return
        sketch = np.column_stack(
            [
                _apply(self._A, random_vector(self._dim, self._basis_distribution))
                for _ in range(self._basis_dim)
            ]
        )
        basis, _ = np.linalg.qr(sketch)
        self._tr_QT_A_Q = float(
            sum(basis[:, i] @ _apply(self._A, basis[:, i]) for i in range(basis.shape[1]))
        )
        self._Q = basis

    def sample(self, distribution: str = "rademacher") -> float:
        self.maybe_compute_and_cache_subspace()
        assert self._Q is not None and self._tr_QT_A_Q is not None
        v = random_vector(self._dim, distribution)
        v -= self._Q @ (self._Q.T @ v)
        return self._tr_QT_A_Q + float(v @ _apply(self._A, v))


class HutchinsonDiagonalEstimator:
    """``v * (A v)`` for a random ``v``: an unbiased sample of ``diag(A)``."""

    def __init__(self, A: Any) -> None:
        self._dim = _check_square(A)
        self._A = A

    def sample(self, distribution: str = "rademacher") -> np.ndarray:
        v = random_vector(self._dim, distribution)
        return v * _apply(self._A, v)


class HutchinsonSquaredFrobeniusNormEstimator:
    """``||A v||^2`` for a random ``v``: an unbiased sample of ``||A||_F^2``."""

    def __init__(self, A: Any) -> None:
        self._dim = _check_square(A)
        self._A = A

    def sample(self, distribution: str = "rademacher") -> float:
        v = random_vector(self._dim, distribution)
        product = _apply(self._A, v)
        return float(product @ product)
