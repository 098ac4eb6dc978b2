"""Lanczos on sharded vectors: the top eigenvalues of an FSDP2 operator without any rank holding
a full vector.

Each rank keeps its rows of the Krylov basis; inner products are local products summed by one
all-reduce, so every scalar (tridiagonal entries, convergence tests) is identical on all ranks and
no rank leaves the loop early. Full reorthogonalisation (classical Gram-Schmidt, twice) keeps the
basis orthogonal; the basis costs ``num_iterations * local_size`` entries per rank.

Hutch++ and SLQ on sharded vectors are in ``sharded_estimators``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from torch_linop.distributed.seeds import rank_consistent_seed
from torch_linop.distributed.sharded_linalg import local_probes
from torch_linop.solvers._random import make_generator

Which = Literal["LA", "SA", "LM"]


@dataclass(frozen=True, eq=False)
class ShardedEigenResult:
    """Eigenvalues (numpy, ordered by ``which``), this rank's rows of the unit eigenvectors
    ``(local_size, k)``, Ritz residual estimates ``|beta_m s_m|`` (numpy), and whether each is at
    most ``tol * max|Ritz value|``."""

    eigenvalues: np.ndarray
    eigenvectors: torch.Tensor
    residuals: np.ndarray
    converged: np.ndarray
    num_matvecs: int
    tol: float


def sharded_lanczos(
    op: Any,
    k: int,
    *,
    which: Which = "LA",
    max_iterations: int | None = None,
    tol: float | None = None,
    seed: int | None = None,
) -> ShardedEigenResult:
    """The ``k`` eigenpairs of the sharded symmetric ``op`` selected by ``which`` ("LA" largest,
    "SA" smallest algebraic, "LM" largest magnitude).

    ``op`` needs ``local_size``, ``shape``, ``apply(local (local_size, 1))``, ``dot(a, b)`` (global
    ``a.T @ b``) and ``random_vector(generator)`` — what ``ShardedOperator`` provides. Stops when
    the ``k`` Ritz residual estimates are below ``tol * max|theta|`` (default ``1e-8`` in float64,
    ``1e-4`` otherwise: finite-difference products are not more accurate) or after
    ``max_iterations`` (default ``min(n, max(30, 4 k))``) products. The start vector is the
    Gaussian probe that ``torch_linop.solvers.lanczos`` starts from with the same ``seed``, each
    rank generating only its own entries; pass the same int on every rank, or None for one fresh
    seed drawn on rank 0 and broadcast (a collective).
    """
    size = int(op.shape[0])
    if not isinstance(k, int) or not 1 <= k < size:
        raise ValueError(f"k must be an int with 1 <= k < n = {size}, got {k!r}")
    if which not in ("LA", "SA", "LM"):
        raise ValueError(f"which must be 'LA', 'SA' or 'LM', got {which!r}")
    limit = min(size, max(30, 4 * k)) if max_iterations is None else int(max_iterations)
    if limit < k + 1 and limit < size:
        raise ValueError(f"max_iterations={limit} must exceed k={k}")
    if tol is None:
        tol = 1e-8 if op.torch_dtype == torch.float64 else 1e-4
    acc = torch.float64 if op.torch_dtype == torch.float64 else torch.float32

    shared = rank_consistent_seed(seed, op)
    if not isinstance(shared, int) or isinstance(shared, bool):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    generator = make_generator(shared)
    vector = local_probes(op, 1, generator, "gaussian", acc)[:, 0]
    vector = vector / float(op.dot(vector[:, None], vector[:, None]).sqrt())
    basis = torch.zeros(limit, op.local_size, dtype=acc, device=vector.device)
    alphas: list[float] = []
    betas: list[float] = []
    values = np.zeros(0)
    coordinates = np.zeros((0, 0))
    estimates = np.zeros(0)
    for step in range(limit):
        basis[step] = vector
        product = op.apply(vector.to(op.torch_dtype)[:, None])[:, 0].to(acc)
        active = basis[: step + 1]
        for sweep in range(2):  # classical Gram-Schmidt twice: orthogonal to rounding
            coefficients = op.dot(active.T, product[:, None])[:, 0]
            product = product - active.T @ coefficients
            if sweep == 0:
                alphas.append(float(coefficients[step]))
        beta = float(op.dot(product[:, None], product[:, None]).sqrt())
        values, coordinates = np.linalg.eigh(_tridiagonal(alphas, betas))
        estimates = np.abs(beta * coordinates[-1])
        wanted = _order(values, which)[:k]
        norm = float(np.abs(values).max()) if len(values) else 0.0
        exhausted = beta <= 1e-14 * max(norm, 1e-300) or step + 1 == limit
        if len(values) >= k and (bool((estimates[wanted] <= tol * norm).all()) or exhausted):
            break
        if exhausted:
            break
        betas.append(beta)
        vector = product / beta
    wanted = _order(values, which)[:k]
    steps = len(alphas)
    ritz = basis[:steps].T @ torch.from_numpy(coordinates[:, wanted]).to(basis)
    norm = float(np.abs(values).max())
    return ShardedEigenResult(
        eigenvalues=values[wanted].copy(),
        eigenvectors=ritz.to(op.torch_dtype),
        residuals=estimates[wanted].copy(),
        converged=estimates[wanted] <= tol * norm,
        num_matvecs=steps,
        tol=float(tol),
    )


def _tridiagonal(alphas: list[float], betas: list[float]) -> np.ndarray:
    size = len(alphas)
    matrix = np.diag(np.asarray(alphas, dtype=np.float64))
    if size > 1:
        off = np.asarray(betas[: size - 1], dtype=np.float64)
        matrix += np.diag(off, 1) + np.diag(off, -1)
    return matrix


def _order(values: np.ndarray, which: str) -> np.ndarray:
    if which == "LA":
        return np.argsort(-values, kind="stable")
    if which == "SA":
        return np.argsort(values, kind="stable")
    return np.argsort(-np.abs(values), kind="stable")
