"""lanczos counts every product the operator sees, reads residuals off the Lanczos relation for
free, and spends residual products only with ``verify=True``: checked by a counting wrapper
around dense matrices with known spectra, against residuals recomputed here from the dense
matrix."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

from torch_linop.solvers import lanczos


class CountingMatrix(scipy.sparse.linalg.LinearOperator):
    """A dense matrix as a scipy operator that counts every column it multiplies."""

    def __init__(self, matrix: np.ndarray) -> None:
        super().__init__(dtype=np.float64, shape=matrix.shape)
        self.matrix = matrix
        self.num_matvecs = 0

    def _matvec(self, vector: np.ndarray) -> np.ndarray:
        self.num_matvecs += 1
        return self.matrix @ vector

    def _matmat(self, block: np.ndarray) -> np.ndarray:
        self.num_matvecs += block.shape[1]
        return self.matrix @ block


@pytest.fixture(scope="module")
def spectra(make_matrix) -> dict[str, np.ndarray]:
    """Geometric decay (a fast-converging top), a clustered top and a mixed-sign spectrum."""
    rng = np.random.default_rng(7)
    geometric = np.geomspace(1.0, 1e-6, 150)
    clustered = np.concatenate([10 + 1e-3 * rng.standard_normal(12), rng.uniform(0, 1, 108)])
    mixed = np.concatenate([[-30.0, -20.0, 12.0, 40.0], rng.uniform(-1, 1, 96)])
    return {
        "geometric": make_matrix(geometric, seed=1),
        "clustered": make_matrix(clustered, seed=2),
        "mixed": make_matrix(mixed, seed=3),
    }


NAMES = ["geometric", "clustered", "mixed"]

# (options, how far relation residuals may sit from the true ones, relative to ||A||): a float32
# basis is reorthogonal to float32's rounding only
CASES = [
    ({}, 1e-12),
    ({"block_size": 3}, 1e-12),
    ({"max_basis": 16}, 1e-12),  # thick restarts
    ({"which": "BE"}, 1e-12),
    ({"basis_dtype": torch.float32}, 1e-6),
]


def true_residuals(matrix: np.ndarray, values: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``||A v_i - lambda_i v_i||`` for the rows ``v_i`` of ``vectors``."""
    return np.linalg.norm(matrix @ vectors.T - vectors.T * values, axis=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("options", "agreement"), CASES)
def test_unverified_run_spends_only_krylov_products(spectra, name, options, agreement):
    matrix = spectra[name]
    norm = float(np.abs(np.linalg.eigvalsh(matrix)).max())
    op = CountingMatrix(matrix)
    options = {"which": "LA", **options}
    result = lanczos(op, 5, seed=0, **options)
    assert result.converged.all()
    block_size = options.get("block_size", 1)
    # everything the operator saw is one block per Lanczos step, and num_matvecs says so
    assert op.num_matvecs == result.num_matvecs == block_size * result.num_iterations
    assert result.num_residual_matvecs == 0 and not result.residuals_are_true
    measured = true_residuals(matrix, result.eigenvalues, result.eigenvectors)
    np.testing.assert_array_less(np.abs(measured - result.residuals), agreement * norm)
    assert (measured <= result.tol * result.norm_estimate + agreement * norm).all()


@pytest.mark.parametrize("name", NAMES)
def test_verify_measures_true_residuals_with_one_product_per_pair(spectra, name):
    matrix = spectra[name]
    unverified = lanczos(CountingMatrix(matrix), 5, which="LA", seed=0)
    op = CountingMatrix(matrix)
    verified = lanczos(op, 5, which="LA", seed=0, verify=True)
    assert verified.residuals_are_true and verified.converged.all()
    assert op.num_matvecs == verified.num_matvecs
    # the relation residuals already passed, so the first check confirms them: k products
    assert verified.num_residual_matvecs == 5
    assert verified.num_matvecs == unverified.num_matvecs + 5
    np.testing.assert_array_equal(verified.eigenvalues, unverified.eigenvalues)
    measured = true_residuals(matrix, verified.eigenvalues, verified.eigenvectors)
    np.testing.assert_allclose(verified.residuals, measured, rtol=1e-6, atol=1e-14)


def test_verify_without_eigenvectors_still_measures_residuals(spectra):
    matrix = spectra["mixed"]
    op = CountingMatrix(matrix)
    result = lanczos(op, 4, which="LM", seed=0, verify=True, return_eigenvectors=False)
    assert result.eigenvectors is None and result.residuals_are_true
    assert op.num_matvecs == result.num_matvecs and result.num_residual_matvecs == 4
    np.testing.assert_allclose(np.sort(np.abs(result.eigenvalues)), [12.0, 20.0, 30.0, 40.0])


def test_torch_path_counts_the_same_products(spectra, torch_operator):
    matrix = spectra["clustered"]
    op = torch_operator(torch.from_numpy(matrix))
    result = lanczos(op, 5, which="LA", seed=0)
    assert op.num_matvecs == result.num_matvecs == result.num_iterations
    vectors = result.eigenvectors.numpy()
    measured = true_residuals(matrix, result.eigenvalues, vectors)
    norm = 10.1  # the clustered top sits at 10 plus noise of 1e-3
    np.testing.assert_array_less(np.abs(measured - result.residuals), 1e-12 * norm)


def test_unconverged_run_counts_its_reproducibility_check(spectra):
    matrix = spectra["clustered"]
    op = CountingMatrix(matrix)
    with pytest.warns(RuntimeWarning, match="raise max_matvecs"):
        result = lanczos(op, 5, which="SA", seed=0, max_matvecs=6)
    assert op.num_matvecs == result.num_matvecs
    assert result.num_matvecs - result.num_residual_matvecs <= 6


def test_verify_sees_a_matrix_that_changes_between_products(spectra):
    # noise of 1e-6 ||A|| on every product: the relation holds for the products as computed,
    # so the relation residuals pass 1e-9 ||A||; only measured residuals show that none does
    matrix = spectra["mixed"]
    generator = np.random.default_rng(0)

    def noisy(block: np.ndarray) -> np.ndarray:
        return matrix @ block + 40e-6 * generator.standard_normal(block.shape) / np.sqrt(100)

    op = scipy.sparse.linalg.LinearOperator(
        matrix.shape, matvec=noisy, matmat=noisy, dtype=np.float64
    )
    unverified = lanczos(op, 2, which="LA", seed=0, tol=1e-9, max_matvecs=60)
    assert unverified.converged.all()  # what the relation says of the products it saw
    measured = true_residuals(matrix, unverified.eigenvalues, unverified.eigenvectors)
    assert measured.min() > 1e-8 * unverified.norm_estimate
    with pytest.warns(RuntimeWarning, match="differ by"):
        verified = lanczos(op, 2, which="LA", seed=0, tol=1e-9, verify=True, max_matvecs=60)
    assert not verified.converged.all() and verified.residuals_are_true
    assert verified.residuals.max() > 1e-8 * verified.norm_estimate
