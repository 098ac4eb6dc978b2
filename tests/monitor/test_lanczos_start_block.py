"""``lanczos(start_block=...)``, the warm-start input the monitor uses: a start near the top
eigenvector converges in fewer products than a random start, to the same eigenvalues as
numpy's eigvalsh, and a malformed start block is refused where it enters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_linop.solvers import lanczos


def spiked_matrix(n: int = 60) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    values = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    values[-1], values[-2] = 3.0, 1.5
    return basis @ torch.diag(values) @ basis.T


def test_a_start_near_the_top_eigenvector_converges_sooner_to_the_same_eigenvalue() -> None:
    matrix = spiked_matrix()
    eigenvalues, eigenvectors = np.linalg.eigh(matrix.numpy())
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(60, 1, generator=generator, dtype=torch.float64)
    start = torch.from_numpy(eigenvectors[:, -1:]) + 1e-6 * noise / noise.norm()
    cold = lanczos(matrix, k=1, which="LA", tol=1e-10, seed=0)
    warm = lanczos(matrix, k=1, which="LA", tol=1e-10, seed=0, start_block=start)
    assert warm.converged.all() and cold.converged.all()
    assert abs(warm.eigenvalues[0] - eigenvalues[-1]) <= 1e-9 * eigenvalues[-1]
    assert warm.num_matvecs < cold.num_matvecs


def test_block_start_for_k_pairs() -> None:
    matrix = spiked_matrix()
    eigenvalues, eigenvectors = np.linalg.eigh(matrix.numpy())
    start = torch.from_numpy(eigenvectors[:, -2:].copy())
    result = lanczos(matrix, k=2, which="LA", tol=1e-10, block_size=2, start_block=start)
    np.testing.assert_allclose(result.eigenvalues, eigenvalues[::-1][:2], rtol=1e-9)


def test_malformed_start_block_is_refused(tmp_path) -> None:
    matrix = spiked_matrix()
    with pytest.raises(ValueError, match=r"must be \(n, block_size\) = \(60, 1\)"):
        lanczos(matrix, k=1, start_block=torch.ones(60, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating torch.Tensor"):
        lanczos(matrix, k=1, start_block=np.ones((60, 1)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        lanczos(matrix, k=1, start_block=torch.full((60, 1), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="cannot be combined with checkpoint"):
        lanczos(
            matrix, k=1, start_block=torch.ones(60, 1, dtype=torch.float64),
            checkpoint=tmp_path / "run.pt",
        )  # fmt: skip
