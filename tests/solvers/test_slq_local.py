"""The memory-lean SLQ path (three-term recurrence) used when the full basis does not fit."""

import numpy as np
import pytest
import torch

from torch_linop.solvers import slq, spectral_density


def _two_cluster_matrix(n: int = 120, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    eigenvalues = np.concatenate([rng.normal(1.0, 0.05, n // 2), rng.normal(5.0, 0.05, n - n // 2)])
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return torch.from_numpy((basis * eigenvalues) @ basis.T)


def test_local_path_matches_full_reorthogonalisation_before_orthogonality_is_lost(monkeypatch):
    matrix = _two_cluster_matrix()
    full = spectral_density(matrix, num_runs=3, lanczos_steps=6, seed=4, progress=False)
    monkeypatch.setattr(slq, "_basis_too_big", lambda operator, steps: True)
    with pytest.warns(RuntimeWarning, match="three-term recurrence"):
        local = spectral_density(matrix, num_runs=3, lanczos_steps=6, seed=4, progress=False)
    np.testing.assert_allclose(local.nodes, full.nodes, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(local.weights, full.weights, rtol=1e-7, atol=1e-9)
    assert local.num_matvecs == full.num_matvecs == 18


def test_local_path_density_has_the_clusters_mass(monkeypatch):
    matrix = _two_cluster_matrix()
    monkeypatch.setattr(slq, "_basis_too_big", lambda operator, steps: True)
    with pytest.warns(RuntimeWarning):
        result = spectral_density(matrix, num_runs=8, lanczos_steps=40, seed=0, progress=False)
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, rtol=1e-12)
    assert np.trapezoid(result.density, result.grid) == pytest.approx(1.0, rel=1e-9)
    low_mass = result.weights[result.nodes < 3.0].sum() / result.weights.sum()
    assert low_mass == pytest.approx(0.5, abs=0.1)
    assert result.nodes.min() > 0.7 and result.nodes.max() < 5.3


def test_local_path_refuses_checkpoints(monkeypatch, tmp_path):
    monkeypatch.setattr(slq, "_basis_too_big", lambda operator, steps: True)
    with pytest.raises(ValueError, match="basis_device='cpu'"):
        spectral_density(
            _two_cluster_matrix(), lanczos_steps=5, seed=0, checkpoint=tmp_path / "c.pt"
        )
