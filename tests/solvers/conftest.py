"""Symmetric matrices with known spectra, and a minimal torch-path operator, for solver tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def with_spectrum(eigenvalues: np.ndarray, seed: int = 0) -> np.ndarray:
    """``Q diag(eigenvalues) Q^T`` for a random orthogonal ``Q``: a dense symmetric matrix whose
    eigenvalues are known exactly (up to rounding in forming it)."""
    rng = np.random.default_rng(seed)
    size = len(eigenvalues)
    orthogonal, _ = np.linalg.qr(rng.standard_normal((size, size)))
    matrix = (orthogonal * eigenvalues) @ orthogonal.T
    return (matrix + matrix.T) / 2


def wishart(size: int, num_samples: int, seed: int = 0) -> np.ndarray:
    """``X^T X / num_samples`` for Gaussian ``X``: Marchenko-Pastur bulk, positive definite."""
    rng = np.random.default_rng(seed)
    samples = rng.standard_normal((num_samples, size))
    return samples.T @ samples / num_samples


def spectra(size: int = 120) -> dict[str, np.ndarray]:
    """Named test matrices covering the spectra the solvers must handle."""
    rng = np.random.default_rng(1)
    clustered = np.concatenate(
        [10 + 1e-3 * rng.standard_normal(size // 4), 1 + 0.2 * rng.standard_normal(size // 2)]
    )
    clustered = np.concatenate([clustered, 0.1 * rng.random(size - len(clustered))])
    negative = np.concatenate([-np.geomspace(1, 30, 6), np.geomspace(2, 40, 6)])
    negative = np.concatenate([negative, rng.uniform(-0.5, 0.5, size - 12)])
    repeated = np.concatenate([[7.0] * 5, [-6.0] * 4, rng.uniform(-2, 2, size - 9)])
    rank_deficient = np.concatenate([np.geomspace(0.5, 20, 15), np.zeros(size - 15)])
    return {
        "wishart": wishart(size, 3 * size),
        "clustered": with_spectrum(clustered, seed=2),
        "negative": with_spectrum(negative, seed=3),
        "repeated": with_spectrum(repeated, seed=4),
        "rank_deficient": with_spectrum(rank_deficient, seed=5),
    }


class TorchMatrixOperator:
    """The torch-path protocol (``device``, ``torch_dtype``, ``shape``, ``matmat``/``@``) around a
    dense tensor, counting products, as the curvature operators implement it."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.device = matrix.device
        self.torch_dtype = matrix.dtype
        self.shape = tuple(matrix.shape)
        self.num_matvecs = 0

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        assert block.dtype == self.torch_dtype and block.device == self.device
        self.num_matvecs += block.shape[1]
        return self.matrix @ block

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.matmat(other if other.dim() == 2 else other[:, None]).reshape(other.shape)


@pytest.fixture(scope="session")
def test_matrices() -> dict[str, np.ndarray]:
    return spectra()


@pytest.fixture(scope="session")
def make_matrix():
    """``make_matrix(eigenvalues, seed)``: a dense symmetric matrix with that spectrum."""
    return with_spectrum


@pytest.fixture(scope="session")
def torch_operator():
    """``torch_operator(tensor)``: a torch-path operator around a dense tensor."""
    return TorchMatrixOperator


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Tiny problems gain nothing from intra-op threads, and on a loaded 2-core machine every
    parallel region waits for a descheduled thread (100x slower); restore the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
