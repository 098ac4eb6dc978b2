"""lanczos: eigenpairs against numpy.linalg.eigvalsh on matrices with known spectra, on both the
numpy and the torch paths, plus restarts, precisions, reproducibility and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch

from torch_linop.solvers import EigenResult, lanczos


def expected(matrix: np.ndarray, k: int, which: str) -> np.ndarray:
    """The k target eigenvalues in lanczos's order, from a dense eigensolver."""
    ascending = np.linalg.eigvalsh(matrix)
    if which == "LA":
        return ascending[::-1][:k]
    if which == "SA":
        return ascending[:k]
    if which == "LM":
        return ascending[np.argsort(-np.abs(ascending), kind="stable")][:k]
    return np.sort(
        np.concatenate([ascending[: k // 2], ascending[len(ascending) - (k - k // 2) :]])
    )


def assert_eigenvalues(result: EigenResult, truth: np.ndarray, matrix: np.ndarray, rtol: float):
    scale = np.abs(np.linalg.eigvalsh(matrix)).max()
    # relative to each eigenvalue; zero eigenvalues (rank deficient) relative to ||H||
    tolerance = rtol * np.maximum(np.abs(truth), scale * 1e-2)
    np.testing.assert_array_less(np.abs(result.eigenvalues - truth), tolerance)


@pytest.mark.parametrize("name", ["wishart", "clustered", "negative", "repeated", "rank_deficient"])
@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
def test_float64_numpy_path_matches_eigvalsh(test_matrices, name, which):
    matrix = test_matrices[name]
    k = 4
    # a multiplicity inside the wanted set needs a block at least that wide: the repeated
    # spectrum has 7 five times and -6 four times, the rank-deficient one 105 zeros at the bottom
    block_size = 1
    if name == "repeated" or (name == "rank_deficient" and which in ("SA", "BE")):
        block_size = 5
    result = lanczos(matrix, k, which=which, block_size=block_size, seed=0)
    assert result.converged.all()
    assert_eigenvalues(result, expected(matrix, k, which), matrix, rtol=1e-8)
    assert isinstance(result.eigenvectors, np.ndarray) and result.eigenvectors.shape == (k, 120)
    # true residuals recomputed here, independently of the solver
    residuals = np.linalg.norm(
        matrix @ result.eigenvectors.T - result.eigenvectors.T * result.eigenvalues, axis=0
    )
    np.testing.assert_allclose(residuals, result.residuals, rtol=1e-3, atol=1e-12)
    assert (residuals <= result.tol * result.norm_estimate).all()
    np.testing.assert_allclose(np.linalg.norm(result.eigenvectors, axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("name", ["wishart", "negative"])
@pytest.mark.parametrize("which", ["LA", "SA", "BE"])
@pytest.mark.parametrize("dense", [True, False])
def test_float64_torch_path_matches_eigvalsh(test_matrices, torch_operator, name, which, dense):
    matrix = test_matrices[name]
    tensor = torch.from_numpy(matrix)
    op = tensor if dense else torch_operator(tensor)
    result = lanczos(op, 5, which=which, seed=0)
    assert_eigenvalues(result, expected(matrix, 5, which), matrix, rtol=1e-8)
    assert isinstance(result.eigenvectors, torch.Tensor)
    assert result.eigenvectors.shape == (5, 120) and result.eigenvectors.dtype == torch.float64
    if not dense:
        assert op.num_matvecs == result.num_matvecs


@pytest.mark.parametrize("which", ["LA", "SA", "BE"])
def test_float32_operator(test_matrices, torch_operator, which):
    matrix = test_matrices["wishart"]
    result = lanczos(torch_operator(torch.from_numpy(matrix).float()), 4, which=which, seed=0)
    assert result.converged.all()
    assert result.tol == pytest.approx(np.finfo(np.float32).eps ** (2 / 3))
    assert_eigenvalues(result, expected(matrix, 4, which), matrix, rtol=1e-4)
    assert result.eigenvectors.dtype == torch.float32


def test_bfloat16_operator_uses_a_float32_basis_and_float64_projection(make_matrix):
    spectrum = np.concatenate([[40.0, 30.0, 20.0], np.linspace(-1, 1, 197)])
    matrix = make_matrix(spectrum, seed=7)
    op = torch.from_numpy(matrix).to(torch.bfloat16)
    result = lanczos(op, 3, which="LA", seed=0)
    assert result.converged.all()
    assert result.eigenvectors.dtype == torch.float32
    # the operator itself is only bf16-accurate: compare with the spectrum of the rounded matrix
    rounded = op.double().numpy()
    np.testing.assert_allclose(result.eigenvalues, expected(rounded, 3, "LA"), rtol=3e-2)


def test_thick_restart_with_small_basis_converges(make_matrix):
    spectrum = np.concatenate([np.geomspace(2, 20, 8), np.linspace(-1.5, 1.5, 192)])
    matrix = make_matrix(spectrum, seed=6)
    full = lanczos(matrix, 6, which="LA", seed=0)
    restarted = lanczos(matrix, 6, which="LA", seed=0, max_basis=14)
    assert full.num_restarts == 0 and restarted.num_restarts > 0
    assert restarted.converged.all()
    np.testing.assert_allclose(restarted.eigenvalues, np.sort(spectrum)[::-1][:6], rtol=1e-8)


def test_restart_with_basis_on_host_in_float32(make_matrix):
    spectrum = np.concatenate([np.geomspace(5, 50, 6), np.linspace(-1, 1, 194)])
    matrix = make_matrix(spectrum, seed=8)
    result = lanczos(
        matrix, 6, which="LA", seed=0, max_basis=9, basis_dtype=torch.float32, basis_device="cpu"
    )
    assert result.num_restarts > 0 and result.converged.all()
    # a float32 basis limits the default tolerance to float32's
    assert result.tol == pytest.approx(np.finfo(np.float32).eps ** (2 / 3))
    assert isinstance(result.eigenvectors, np.ndarray)
    np.testing.assert_allclose(result.eigenvalues, np.sort(spectrum)[::-1][:6], rtol=1e-6)


def test_max_basis_bytes_bounds_the_basis(test_matrices):
    matrix = test_matrices["negative"]
    row_bytes = 120 * 8
    result = lanczos(matrix, 3, which="LM", seed=0, max_basis_bytes=12 * row_bytes)
    assert result.num_restarts > 0 and result.converged.all()
    assert_eigenvalues(result, expected(matrix, 3, "LM"), matrix, rtol=1e-8)
    with pytest.raises(ValueError, match="at least k \\+ 2 \\* block_size = 5"):
        lanczos(matrix, 3, max_basis_bytes=4 * row_bytes)


def test_eigenvalues_only_mode_forms_no_vectors_and_takes_the_same_steps(test_matrices):
    matrix = test_matrices["wishart"]
    with_vectors = lanczos(matrix, 5, which="LA", seed=0)
    values_only = lanczos(matrix, 5, which="LA", seed=0, return_eigenvectors=False)
    assert values_only.eigenvectors is None and with_vectors.eigenvectors is not None
    assert values_only.num_residual_matvecs == with_vectors.num_residual_matvecs == 0
    assert values_only.num_matvecs == with_vectors.num_matvecs
    np.testing.assert_array_equal(values_only.eigenvalues, with_vectors.eigenvalues)
    np.testing.assert_array_equal(values_only.residuals, with_vectors.residuals)


def test_default_tolerance_converges_where_2k_steps_do_not(make_matrix):
    # the seed library stopped after 2k steps; a slowly converging spectrum needs more
    spectrum = np.concatenate([np.linspace(1.0, 0.9, 8), np.linspace(0.85, 0.0, 292)])
    matrix = make_matrix(spectrum, seed=9)
    result = lanczos(matrix, 5, which="LA", seed=0)
    assert result.num_iterations > 10 and result.converged.all()
    np.testing.assert_allclose(result.eigenvalues, np.sort(spectrum)[::-1][:5], rtol=1e-8)


def test_small_operator_is_solved_exactly_when_the_basis_fills_the_space(make_matrix):
    spectrum = np.array([3.0, 2.5, 1.0, -2.0, 0.5, 0.2, -0.1, 4.0])
    matrix = make_matrix(spectrum, seed=10)
    result = lanczos(matrix, 7, which="LA", seed=0)
    assert result.converged.all() and result.num_iterations == 8
    np.testing.assert_allclose(result.eigenvalues, np.sort(spectrum)[::-1][:7], atol=1e-12)


def test_invariant_subspace_breakdown_restarts_with_fresh_directions(make_matrix):
    # rank 3 with distinct eigenvalues: the Krylov space of a start vector is invariant after 4
    # vectors (3 eigenvectors + the null-space component); SA needs the zeros beyond it
    spectrum = np.concatenate([[5.0, 3.0, 1.0], np.zeros(37)])
    matrix = make_matrix(spectrum, seed=11)
    result = lanczos(matrix, 3, which="SA", block_size=3, seed=0)
    assert result.converged.all()
    np.testing.assert_allclose(result.eigenvalues, 0.0, atol=1e-12)
    top = lanczos(matrix, 3, which="LA", seed=0)
    np.testing.assert_allclose(top.eigenvalues, [5.0, 3.0, 1.0], rtol=1e-12)


def test_sparse_and_linear_operator_inputs(test_matrices):
    matrix = test_matrices["negative"]
    truth = expected(matrix, 3, "LA")
    for op in (scipy.sparse.csr_matrix(matrix), scipy.sparse.linalg.aslinearoperator(matrix)):
        result = lanczos(op, 3, which="LA", seed=0)
        assert_eigenvalues(result, truth, matrix, rtol=1e-8)
        assert isinstance(result.eigenvectors, np.ndarray)


def test_same_seed_same_result_and_none_is_random(test_matrices):
    matrix = test_matrices["wishart"]
    first = lanczos(matrix, 3, seed=123)
    second = lanczos(matrix, 3, seed=123)
    np.testing.assert_array_equal(first.eigenvalues, second.eigenvalues)
    np.testing.assert_array_equal(first.eigenvectors, second.eigenvectors)
    unseeded = [lanczos(matrix, 3, seed=None).eigenvectors for _ in range(2)]
    assert not np.array_equal(np.abs(unseeded[0]), np.abs(unseeded[1]))
    generator = torch.Generator().manual_seed(123)
    np.testing.assert_array_equal(lanczos(matrix, 3, seed=generator).eigenvalues, first.eigenvalues)


def test_numpy_and_torch_paths_agree(test_matrices):
    matrix = test_matrices["clustered"]
    numpy_result = lanczos(matrix, 3, seed=5)
    torch_result = lanczos(torch.from_numpy(matrix), 3, seed=5)
    np.testing.assert_allclose(numpy_result.eigenvalues, torch_result.eigenvalues, rtol=1e-12)
    np.testing.assert_allclose(
        np.abs(numpy_result.eigenvectors), np.abs(torch_result.eigenvectors.numpy()), atol=1e-8
    )


def test_unconverged_run_warns_and_flags(test_matrices):
    matrix = test_matrices["clustered"]
    with pytest.warns(RuntimeWarning, match="raise max_matvecs"):
        result = lanczos(matrix, 5, which="SA", seed=0, max_matvecs=6)
    assert not result.converged.all()
    assert result.num_matvecs - result.num_residual_matvecs <= 6


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"k": 0}, ValueError, "k must be an integer >= 1"),
        ({"k": 120}, ValueError, "smaller than the operator size n=120"),
        ({"k": 3, "which": "XX"}, ValueError, "which must be one of"),
        ({"k": 3, "tol": 0.0}, ValueError, "tol must be a positive"),
        ({"k": 3, "tol": float("nan")}, ValueError, "tol must be a positive"),
        ({"k": 3, "max_basis": 4}, ValueError, "k \\+ 2 \\* block_size = 5"),
        ({"k": 3, "block_size": 0}, ValueError, "block_size must be an integer >= 1"),
        ({"k": 3, "max_matvecs": 2}, ValueError, "max_matvecs must be an integer >= 3"),
        ({"k": 3, "seed": 1.5}, TypeError, "seed must be an int"),
        ({"k": 3, "basis_dtype": torch.int32}, TypeError, "basis_dtype"),
        ({"k": 3, "progress": "yes"}, TypeError, "progress must be"),
    ],
)
def test_bad_arguments_raise_with_the_fix(test_matrices, kwargs, error, message):
    with pytest.raises(error, match=message):
        lanczos(test_matrices["wishart"], **kwargs)


def test_bad_operators_raise():
    with pytest.raises(ValueError, match="must be square"):
        lanczos(np.ones((3, 4)), 1)
    with pytest.raises(TypeError, match="cannot use an object of type list"):
        lanczos([[1.0, 0.0], [0.0, 1.0]], 1)
    with pytest.raises(TypeError, match="complex"):
        lanczos(np.eye(4, dtype=np.complex128), 1)


def test_non_finite_operator_output_names_the_matvec():
    calls = {"count": 0}

    def matmat(block: np.ndarray) -> np.ndarray:
        calls["count"] += block.shape[1]
        result = block * np.arange(1.0, 51.0)[:, None]
        return result * np.nan if calls["count"] >= 7 else result

    op = scipy.sparse.linalg.LinearOperator(
        (50, 50), matvec=lambda x: matmat(x[:, None])[:, 0], matmat=matmat, dtype=np.float64
    )
    with pytest.raises(FloatingPointError, match="at matvec 7"):
        lanczos(op, 2, seed=0)
