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


class _FailingAfter:
    """A square tensor operator whose product fails after ``limit`` calls (an interruption)."""

    def __init__(self, matrix: torch.Tensor, limit: int) -> None:
        self.matrix, self.limit, self.calls = matrix, limit, 0
        self.shape, self.device, self.torch_dtype = matrix.shape, matrix.device, matrix.dtype

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.limit:
            raise KeyboardInterrupt
        return self.matrix @ block


def test_local_path_checkpoints_resume_bit_identically(monkeypatch, tmp_path):
    monkeypatch.setattr(slq, "_basis_too_big", lambda operator, steps: True)
    matrix = _two_cluster_matrix()
    options = dict(num_runs=3, lanczos_steps=9, seed=5, progress=False)
    with pytest.warns(RuntimeWarning, match="three-term"):
        uninterrupted = spectral_density(matrix, **options)
    path = tmp_path / "slq.pt"
    for limit in (4, 13):  # mid-run, then mid-way through the second run
        with pytest.raises(KeyboardInterrupt), pytest.warns(RuntimeWarning):
            spectral_density(
                _FailingAfter(matrix, limit), checkpoint=path, checkpoint_every=1, **options
            )
        assert path.exists()
    with pytest.warns(RuntimeWarning):
        resumed = spectral_density(
            _FailingAfter(matrix, 10**9), checkpoint=path, checkpoint_every=1, **options
        )
    np.testing.assert_array_equal(resumed.nodes, uninterrupted.nodes)
    np.testing.assert_array_equal(resumed.weights, uninterrupted.weights)
    assert resumed.num_matvecs == uninterrupted.num_matvecs == 27
