"""The operators as scipy ``LinearOperator``s (eigsh, lobpcg, cg, minres, composition) and the
torch path (tensors stay tensors, on the model's device, in the model's dtype)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import LinearOperator, cg, eigsh, lobpcg, minres

try:
    from scipy.sparse.linalg import IdentityOperator
except ImportError:  # scipy keeps it in the private module (1.17)
    from scipy.sparse.linalg._interface import IdentityOperator

from torch_linop import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    MCFisherOperator,
)
from torch_linop.reference import dense_ggn, dense_hessian

DTYPE = torch.float64


@pytest.fixture
def mlp_hessian(make_case):
    case = make_case("mlp")
    operator = HessianOperator(case.model, case.data, case.loss)
    reference = dense_hessian(case.model, case.data, case.loss).numpy()
    return operator, reference, case


def test_eigsh_matches_eigvalsh_of_the_dense_hessian(mlp_hessian):
    operator, reference, _ = mlp_hessian
    computed = eigsh(operator, k=5, which="LM", tol=0, return_eigenvectors=False)
    eigenvalues = np.linalg.eigvalsh(reference)
    largest_magnitude = eigenvalues[np.argsort(-np.abs(eigenvalues))[:5]]
    np.testing.assert_allclose(np.sort(computed), np.sort(largest_magnitude), rtol=0, atol=1e-8)
    # the spectrum has both signs: the comparison is not only of the positive end
    assert eigenvalues.min() < -1e-6 < 1e-6 < eigenvalues.max()


def test_scipy_composition(mlp_hessian):
    operator, reference, _ = mlp_hessian
    size = operator.shape[0]
    x = np.random.default_rng(0).standard_normal(size)
    damped = operator + 0.1 * IdentityOperator(operator.shape, dtype=np.float64)
    assert isinstance(damped, LinearOperator)
    np.testing.assert_allclose(damped @ x, reference @ x + 0.1 * x, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose((operator * 2) @ x, 2 * reference @ x, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose((2 * operator).matvec(x), 2 * reference @ x, rtol=1e-12)
    # symmetric: transpose, adjoint and rmatvec are the operator itself
    assert operator.T is operator and operator.H is operator
    np.testing.assert_allclose(operator.rmatvec(x), operator.matvec(x), rtol=0, atol=0)
    assert operator.to_scipy() is operator
    as_float32 = operator.to_scipy(np.float32)
    assert as_float32.dtype == np.float32 and as_float32.matvec(x).dtype == np.float32


def test_lobpcg_finds_the_top_of_the_ggn(make_case):
    case = make_case("cnn_batchnorm_eval")
    operator = GGNOperator(case.model, case.data, case.loss)
    reference = dense_ggn(case.model, case.data, case.loss).numpy()
    start = np.random.default_rng(1).standard_normal((operator.shape[0], 3))
    computed, _ = lobpcg(operator, start, largest=True, tol=1e-10, maxiter=500)
    np.testing.assert_allclose(
        np.sort(computed), np.linalg.eigvalsh(reference)[-3:], rtol=1e-7, atol=1e-10
    )


def test_cg_and_minres_on_damped_operators(mlp_hessian, make_case):
    operator, reference, case = mlp_hessian
    size = operator.shape[0]
    rhs = np.random.default_rng(2).standard_normal(size)
    # minres: symmetric indefinite is fine; damp the Hessian away from singularity
    damping = 1.0
    damped_hessian = operator + damping * IdentityOperator(operator.shape, dtype=np.float64)
    solution, info = minres(damped_hessian, rhs, rtol=1e-12, maxiter=2000)
    expected = np.linalg.solve(reference + damping * np.eye(size), rhs)
    assert info == 0
    np.testing.assert_allclose(solution, expected, rtol=1e-7, atol=1e-9)
    # cg: the damped GGN is positive definite
    ggn = GGNOperator(case.model, case.data, case.loss)
    ggn_dense = dense_ggn(case.model, case.data, case.loss).numpy()
    damped_ggn = ggn + 0.1 * IdentityOperator(ggn.shape, dtype=np.float64)
    solution, info = cg(damped_ggn, rhs, rtol=1e-12, maxiter=2000)
    assert info == 0
    expected = np.linalg.solve(ggn_dense + 0.1 * np.eye(size), rhs)
    np.testing.assert_allclose(solution, expected, rtol=1e-8, atol=1e-10)


OPERATORS = {
    "hessian_autograd": lambda c: HessianOperator(c.model, c.data, c.loss),
    "hessian_forward": lambda c: HessianOperator(c.model, c.data, c.loss, method="forward"),
    "hessian_finite_difference": lambda c: HessianOperator(
        c.model, c.data, c.loss, method="finite_difference"
    ),
    "ggn": lambda c: GGNOperator(c.model, c.data, c.loss),
    "ggn_double_backward": lambda c: GGNOperator(
        c.model, c.data, c.loss, jvp_method="double_backward"
    ),
    "empirical_fisher": lambda c: EmpiricalFisherOperator(c.model, c.data, c.loss),
    "mc_fisher": lambda c: MCFisherOperator(c.model, c.data, c.loss, mc_samples=3),
}


@pytest.mark.parametrize("name", list(OPERATORS))
def test_matmat_equals_matvecs_on_both_paths(make_case, name):
    case = make_case("sdpa_attention")
    operator = OPERATORS[name](case)
    generator = torch.Generator().manual_seed(9)
    columns = torch.randn(operator.shape[0], 4, generator=generator, dtype=DTYPE)
    one_by_one = torch.stack([operator.matvec(columns[:, j]) for j in range(4)], dim=1)
    torch.testing.assert_close(operator.matmat(columns), one_by_one, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(operator @ columns, one_by_one, rtol=1e-10, atol=1e-13)
    numpy_columns = columns.numpy()
    np.testing.assert_allclose(
        operator.matmat(numpy_columns), one_by_one.numpy(), rtol=1e-10, atol=1e-13
    )
    np.testing.assert_allclose(
        operator.matvec(numpy_columns[:, 0]), one_by_one[:, 0].numpy(), rtol=1e-10, atol=1e-13
    )
    # (n, 1) stays (n, 1); zero columns give an empty (n, 0) result
    assert operator.matvec(columns[:, :1]).shape == (operator.shape[0], 1)
    assert operator.matmat(columns[:, :0]).shape == (operator.shape[0], 0)


def test_torch_path_stays_torch_on_the_device_and_dtype(mlp_hessian):
    operator, reference, _ = mlp_hessian
    vector = torch.ones(operator.shape[0], dtype=DTYPE, device=operator.device)
    result = operator @ vector
    assert isinstance(result, torch.Tensor)
    assert result.device == operator.device == torch.device("cpu")
    assert result.dtype == operator.torch_dtype == DTYPE
    assert operator.dtype == np.float64 and operator.shape == reference.shape
    np.testing.assert_allclose(result.numpy(), reference @ np.ones(operator.shape[0]), rtol=1e-12)


def test_numpy_inputs_of_other_dtypes_come_back_in_their_dtype(mlp_hessian):
    operator, reference, _ = mlp_hessian
    x = np.random.default_rng(3).standard_normal(operator.shape[0])
    single = operator.matvec(x.astype(np.float32))
    assert isinstance(single, np.ndarray) and single.dtype == np.float32
    np.testing.assert_allclose(single, reference @ x.astype(np.float32), rtol=1e-5, atol=1e-6)
    block = operator.matmat(np.stack([x, 2 * x], axis=1).astype(np.float32))
    assert block.dtype == np.float32 and block.shape == (operator.shape[0], 2)
    doubled = operator @ x
    assert doubled.dtype == np.float64
    np.testing.assert_allclose(doubled, reference @ x, rtol=1e-12)
