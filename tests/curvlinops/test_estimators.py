"""The drop-in's estimators (thin adapters over ``torch_linop.solvers``) against curvlinops' on a
matrix with a known, decaying spectrum: unbiased, errors of the same size as curvlinops', the
same argument rules, and results in the caller's world (torch or numpy)."""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import aslinearoperator
from torch import nn

curvlinops = pytest.importorskip("curvlinops")
if int(version("curvlinops-for-pytorch").split(".")[0]) != 3:
    pytest.skip("these comparisons use the curvlinops 3 API", allow_module_level=True)
import torch_linop.curvlinops as ours  # noqa: E402

SIZE, REPEATS = 40, 40


def known_matrix() -> tuple[torch.Tensor, torch.Tensor]:
    """``Q diag(ev) Q^T`` with eigenvalues from 1 down to 1e-3 (and the eigenvalues)."""
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(SIZE, SIZE, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(0, -3, SIZE, dtype=torch.float64)
    return basis @ torch.diag(eigenvalues) @ basis.T, eigenvalues


def errors(library, name: str, matrix: torch.Tensor, truth: torch.Tensor, *args) -> np.ndarray:
    torch.manual_seed(1)  # both libraries draw from torch's global generator
    return np.array(
        [float((getattr(library, name)(matrix, *args) - truth).norm()) for _ in range(REPEATS)]
    )


@pytest.mark.parametrize(
    ("name", "num_matvecs"),
    [("hutchinson_trace", 10), ("hutchpp_trace", 12), ("xtrace", 12)],
)
def test_trace_estimators_match_curvlinops_accuracy(name: str, num_matvecs: int) -> None:
    matrix, eigenvalues = known_matrix()
    truth = eigenvalues.sum()
    ours_errors = errors(ours, name, matrix, truth, num_matvecs)
    reference_errors = errors(curvlinops, name, matrix, truth, num_matvecs)
    ours_rms, reference_rms = (
        np.sqrt(np.mean(ours_errors**2)),
        np.sqrt(np.mean(reference_errors**2)),
    )
    assert 0.5 * reference_rms < ours_rms < 2.0 * reference_rms
    torch.manual_seed(2)
    estimates = [float(getattr(ours, name)(matrix, num_matvecs)) for _ in range(REPEATS)]
    assert abs(np.mean(estimates) - float(truth)) < 4 * ours_rms / np.sqrt(REPEATS)  # unbiased


@pytest.mark.parametrize(("name", "num_matvecs"), [("hutchinson_diag", 10), ("xdiag", 12)])
def test_diagonal_estimators_match_curvlinops_accuracy(name: str, num_matvecs: int) -> None:
    matrix, _ = known_matrix()
    truth = torch.diag(matrix)
    ours_errors = errors(ours, name, matrix, truth, num_matvecs)
    reference_errors = errors(curvlinops, name, matrix, truth, num_matvecs)
    assert 0.5 * reference_errors.mean() < ours_errors.mean() < 2.0 * reference_errors.mean()


def test_squared_frobenius_norm_matches_curvlinops_accuracy() -> None:
    matrix, eigenvalues = known_matrix()
    wide = matrix[:25]  # non-square: estimated on the smaller side, like curvlinops
    truth = (wide**2).sum()
    ours_errors = errors(ours, "hutchinson_squared_fro", wide, truth, 10)
    reference_errors = errors(curvlinops, "hutchinson_squared_fro", wide, truth, 10)
    assert 0.5 * reference_errors.mean() < ours_errors.mean() < 2.0 * reference_errors.mean()


def test_curvlinops_rules_and_result_types() -> None:
    matrix, _ = known_matrix()
    with pytest.raises(ValueError, match="less than"):
        ours.hutchinson_trace(matrix, SIZE)
    with pytest.raises(ValueError, match="divisible by 3"):
        ours.hutchpp_trace(matrix, 10)
    with pytest.raises(ValueError, match="divisible by 2"):
        ours.xdiag(matrix, 9)
    with pytest.raises(ValueError, match="square"):
        ours.xtrace(matrix[:10], 4)
    estimate = ours.hutchinson_trace(aslinearoperator(matrix.numpy()), 10, "normal", seed=3)
    assert isinstance(estimate, np.floating)  # scipy operators: numpy, as curvlinops 2.x
    assert isinstance(ours.xdiag(matrix.numpy(), 10, seed=3), np.ndarray)
    assert ours.hutchinson_trace(matrix, 10, seed=3) == ours.hutchinson_trace(matrix, 10, seed=3)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    data = [(torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,)))]
    params = list(model.parameters())
    ggn = ours.GGNLinearOperator(model, nn.CrossEntropyLoss(), params, data)
    reference = curvlinops.GGNLinearOperator(model, nn.CrossEntropyLoss(), params, data)
    exact = float(torch.diag(ggn @ torch.eye(ggn.shape[0], dtype=torch.float64)).sum())
    for operator in (ggn, reference):  # ours (torch path) and curvlinops 3 operators
        estimate = ours.xtrace(operator, 14, seed=4)  # sketch of 7 >= rank 6
        assert isinstance(estimate, torch.Tensor) and estimate.dtype == torch.float64
        assert abs(float(estimate) - exact) < 0.2 * abs(exact)


class DenseReference(curvlinops._torch_base.PyTorchLinearOperator):
    """A dense symmetric matrix as a curvlinops 3 operator (its spectral functions need one)."""

    SELF_ADJOINT = True

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__([(matrix.shape[1],)], [(matrix.shape[0],)])
        self.matrix = matrix

    def _matmat(self, columns: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.matrix @ columns[0]]

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype


def smoothed_truth(eigenvalues: np.ndarray, grid: np.ndarray, ncv: int, kappa: float) -> np.ndarray:
    """curvlinops' kernel around every eigenvalue with the expected weight 1/n."""
    half_width = (grid[-1] - grid[0]) / 2
    sigma = 2 / (ncv - 1) / np.sqrt(8 * np.log(kappa)) * half_width
    offsets = (grid[:, None] - eigenvalues[None, :]) / sigma
    return np.exp(-0.5 * offsets**2).mean(1) / (sigma * np.sqrt(2 * np.pi))


def test_spectral_density_matches_curvlinops_accuracy() -> None:
    matrix, eigenvalues = known_matrix()
    boundaries = (0.0, 1.0)
    torch.manual_seed(5)
    grid, density = ours.lanczos_approximate_spectrum(
        matrix, 20, num_repeats=20, boundaries=boundaries
    )
    reference_grid, reference = curvlinops.lanczos_approximate_spectrum(
        DenseReference(matrix), 20, num_repeats=20, boundaries=boundaries
    )
    assert torch.allclose(grid, reference_grid)
    truth = smoothed_truth(eigenvalues.numpy(), grid.numpy(), 20, 3.0)
    ours_error = np.trapezoid(np.abs(density.numpy() - truth), grid.numpy())
    reference_error = np.trapezoid(np.abs(reference.numpy() - truth), grid.numpy())
    assert ours_error < 2.0 * reference_error
    assert abs(float(torch.trapezoid(density, grid)) - 1.0) < 0.02

    cached = ours.LanczosApproximateSpectrumCached(matrix, 20, boundaries=boundaries)
    first = cached.approximate_spectrum(num_repeats=2)[1]
    assert torch.equal(first, cached.approximate_spectrum(num_repeats=2)[1])  # runs are cached

    log_grid, log_density = ours.lanczos_approximate_log_spectrum(
        DenseReference(matrix), 20, num_repeats=20, boundaries=(1e-3, 1.0)
    )  # a curvlinops 3 operator works too
    assert float(log_grid[0]) < 1e-3 < 1.0 < float(log_grid[-1])
    assert abs(float(torch.trapezoid(log_density, log_grid)) - 1.0) < 0.1


def test_boundaries() -> None:
    matrix, eigenvalues = known_matrix()
    low, high = ours.approximate_boundaries(matrix, tol=1e-6)
    assert abs(low - float(eigenvalues.min())) < 1e-5 and abs(high - 1.0) < 1e-5
    assert ours.approximate_boundaries(matrix, boundaries=(0.5, None))[0] == 0.5
    low_abs, high_abs = ours.approximate_boundaries_abs(-matrix, tol=1e-6)
    assert abs(low_abs - 1e-3) < 1e-5 and abs(high_abs - 1.0) < 1e-5
