"""power_iteration: De Sa momentum beats plain power iteration on a known gap; the returned
eigenvalue is the Rayleigh quotient; deflation finds the next pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_linop.solvers import power_iteration


@pytest.fixture(scope="module")
def gapped(make_matrix):
    # lambda_1 = 1, lambda_2 = 0.9, the rest below 0.85: plain power iteration contracts by 0.9
    rng = np.random.default_rng(0)
    spectrum = np.concatenate([[1.0, 0.9], rng.uniform(0.0, 0.85, 198)])
    return make_matrix(spectrum, seed=12), np.sort(spectrum)[::-1]


def test_momentum_reaches_the_true_eigenvalue_in_fewer_iterations(gapped):
    matrix, spectrum = gapped
    plain = power_iteration(matrix, tol=1e-9, seed=0)
    accelerated = power_iteration(matrix, tol=1e-9, momentum=spectrum[1] ** 2 / 4, seed=0)
    for result in (plain, accelerated):
        assert result.converged.all()
        assert result.eigenvalues[0] == pytest.approx(spectrum[0], rel=1e-12)
        vector = result.eigenvectors[0]
        # the returned value is the Rayleigh quotient of the returned vector, not lambda - beta
        assert result.eigenvalues[0] == pytest.approx(vector @ matrix @ vector, rel=1e-14)
        assert np.linalg.norm(matrix @ vector - result.eigenvalues[0] * vector) == pytest.approx(
            result.residuals[0], rel=1e-6
        )
    # contraction 0.9 per step vs about 1 - sqrt(2 * 0.1) with momentum
    assert accelerated.num_iterations < plain.num_iterations / 2


def test_deflation_finds_the_next_pairs(gapped):
    matrix, spectrum = gapped
    result = power_iteration(matrix, k=2, tol=1e-7, max_iter=3000, seed=0)
    assert result.converged.all()
    np.testing.assert_allclose(result.eigenvalues, spectrum[:2], rtol=1e-10)
    assert abs(result.eigenvectors[0] @ result.eigenvectors[1]) < 1e-8


def test_torch_path_and_reproducibility(gapped, torch_operator):
    matrix, spectrum = gapped
    op = torch_operator(torch.from_numpy(matrix))
    first = power_iteration(op, tol=1e-8, seed=3)
    second = power_iteration(op, tol=1e-8, seed=3)
    assert isinstance(first.eigenvectors, torch.Tensor)
    assert torch.equal(first.eigenvectors, second.eigenvectors)
    assert op.num_matvecs == first.num_matvecs + second.num_matvecs
    assert first.eigenvalues[0] == pytest.approx(spectrum[0], rel=1e-12)


def test_hitting_max_iter_is_reported_unconverged(gapped):
    matrix, _ = gapped
    result = power_iteration(matrix, tol=1e-12, max_iter=5, seed=0)
    assert not result.converged.any() and result.num_matvecs == 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be an integer >= 1"),
        ({"momentum": -1.0}, "momentum must be a finite number >= 0"),
        ({"tol": -1e-3}, "tol must be a positive"),
        ({"max_iter": 0}, "max_iter must be an integer >= 1"),
    ],
)
def test_bad_arguments(gapped, kwargs, message):
    with pytest.raises(ValueError, match=message):
        power_iteration(gapped[0], **kwargs)


def test_non_finite_output_raises():
    matrix = np.diag(np.arange(1.0, 11.0))
    matrix[0, 0] = np.inf
    with pytest.raises(FloatingPointError, match="at matvec 1"):
        power_iteration(matrix, seed=0)
