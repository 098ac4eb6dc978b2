"""Jacobians, sub-matrices and inverses of the drop-in against curvlinops and dense linear
algebra: products, adjoints, tensor-list formats, and both hyper-parameter styles of the
inverses (2.x setters, 3.x keywords)."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import aslinearoperator
from torch import nn

curvlinops = pytest.importorskip("curvlinops")
if int(version("curvlinops-for-pytorch").split(".")[0]) != 3:
    pytest.skip("these comparisons use the curvlinops 3 API", allow_module_level=True)
import torch_linop.curvlinops as ours  # noqa: E402

TOL = 1e-10


def dense(operator: Any) -> torch.Tensor:
    return operator @ torch.eye(operator.shape[1], dtype=torch.float64)


def setup(output_rank: int = 2) -> tuple[nn.Module, list, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    generator = torch.Generator().manual_seed(1)
    shape = (7, 3) if output_rank == 2 else (7, 2, 3)
    inputs = torch.randn(*shape, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 2, (7,), generator=generator)
    data = [(inputs[:3], targets[:3]), (inputs[3:], targets[3:])]  # uneven batches
    return model, list(model.parameters()), data


@pytest.mark.parametrize("output_rank", [2, 3])
def test_jacobian_and_its_transpose_match_curvlinops(output_rank: int) -> None:
    model, params, data = setup(output_rank)
    jacobian = ours.JacobianLinearOperator(model, params, data)
    reference = curvlinops.JacobianLinearOperator(model, params, data)
    assert jacobian.shape == reference.shape
    matrix = dense(jacobian)
    assert float((matrix - dense(reference)).abs().max()) < TOL

    transposed = ours.TransposedJacobianLinearOperator(model, params, data)
    reference_t = curvlinops.TransposedJacobianLinearOperator(model, params, data)
    assert float((dense(transposed) - dense(reference_t)).abs().max()) < TOL
    assert float((dense(transposed) - matrix.T).abs().max()) < TOL

    vector = np.random.default_rng(0).standard_normal(jacobian.shape[0])
    as_scipy = jacobian.to_scipy()
    np.testing.assert_allclose(as_scipy.rmatvec(vector), matrix.T.numpy() @ vector, atol=TOL)
    np.testing.assert_allclose(as_scipy.H @ vector, matrix.T.numpy() @ vector, atol=TOL)
    assert isinstance(jacobian.adjoint(), ours.TransposedJacobianLinearOperator)
    adjoint_product = jacobian.adjoint() @ torch.as_tensor(vector)
    np.testing.assert_allclose(adjoint_product.numpy(), matrix.T.numpy() @ vector, atol=TOL)

    outputs = [torch.as_tensor(vector).reshape(jacobian._out_shape[0])]
    product = transposed @ outputs  # tensor-list format: one tensor of shape (N, *out)
    assert [t.shape for t in product] == [p.shape for p in params]
    expected = matrix.T @ torch.as_tensor(vector)
    assert float((torch.cat([t.flatten() for t in product]) - expected).abs().max()) < TOL


def test_submatrix_matches_curvlinops_and_slices() -> None:
    model, params, data = setup()
    loss = nn.CrossEntropyLoss()
    ggn = ours.GGNLinearOperator(model, loss, params, data)
    reference = curvlinops.GGNLinearOperator(model, loss, params, data)
    rows, cols = [0, 5, 3, 20], [7, 1, 2]
    sub = ours.SubmatrixLinearOperator(ggn, rows, cols)
    sub_reference = curvlinops.SubmatrixLinearOperator(reference, rows, cols)
    matrix = dense(sub)
    assert matrix.shape == (4, 3)
    assert float((matrix - dense(sub_reference)).abs().max()) < TOL
    assert float((matrix - dense(ggn)[rows][:, cols]).abs().max()) < TOL
    assert float((dense(sub.adjoint()) - matrix.T).abs().max()) < TOL
    np.testing.assert_allclose(sub.to_scipy() @ np.ones(3), matrix.sum(1).numpy(), atol=TOL)
    sub.set_submatrix([1, 2], [4])
    assert sub.shape == (2, 1)
    assert float((dense(sub) - dense(ggn)[[1, 2]][:, [4]]).abs().max()) < TOL
    with pytest.raises(ValueError, match="duplicates"):
        sub.set_submatrix([1, 1], [0])
    with pytest.raises(ValueError, match="out-of-bounds"):
        sub.set_submatrix([0], [ggn.shape[1]])


def damped_ggn() -> tuple[Any, np.ndarray]:
    """Our GGN plus 0.5 I (positive definite) as a scipy operator (curvlinops 2.x style), and
    its dense matrix."""
    model, params, data = setup()
    ggn = ours.GGNLinearOperator(model, nn.CrossEntropyLoss(), params, data)
    size = ggn.shape[0]
    damped = ggn.to_scipy() + 0.5 * aslinearoperator(np.eye(size))
    return damped, dense(ggn).numpy() + 0.5 * np.eye(size)


def test_cg_inverse_both_styles() -> None:
    damped, matrix = damped_ggn()
    rhs = np.random.default_rng(1).standard_normal((matrix.shape[0], 2))
    solution = np.linalg.solve(matrix, rhs)
    legacy = ours.CGInverseLinearOperator(damped)  # curvlinops 2.x: setter with scipy names
    legacy.set_cg_hyperparameters(tol=1e-12, maxiter=500)
    np.testing.assert_allclose(legacy.to_scipy() @ rhs, solution, atol=1e-9)
    modern = ours.CGInverseLinearOperator(torch.as_tensor(matrix), tolerance=1e-12, max_iter=500)
    result = modern @ torch.as_tensor(rhs)  # curvlinops 3.x: keywords, torch in and out
    assert isinstance(result, torch.Tensor)
    np.testing.assert_allclose(result.numpy(), solution, atol=1e-9)
    with pytest.raises(TypeError, match="unknown CG"):
        ours.CGInverseLinearOperator(damped, tolerence=1e-3)


def test_lsmr_and_neumann_inverses() -> None:
    damped, matrix = damped_ggn()
    rhs = np.random.default_rng(2).standard_normal(matrix.shape[0])
    solution = np.linalg.solve(matrix, rhs)
    lsmr = ours.LSMRInverseLinearOperator(damped)
    lsmr.set_lsmr_hyperparameters(atol=1e-14, btol=1e-14, maxiter=2000)
    np.testing.assert_allclose(lsmr.to_scipy() @ rhs, solution, atol=1e-8)
    assert lsmr.matvec_with_info(rhs)[1] in (1, 2)  # scipy istop: converged
    keywords = ours.LSMRInverseLinearOperator(damped, atol=1e-14, btol=1e-14, maxiter=2000)
    np.testing.assert_allclose(keywords.to_scipy() @ rhs, solution, atol=1e-8)

    scale = 1.0 / np.linalg.eigvalsh(matrix).max()  # eigenvalues of scale * A in (0, 1]
    neumann = ours.NeumannInverseLinearOperator(
        torch.as_tensor(matrix), num_terms=2000, scale=scale
    )
    np.testing.assert_allclose(neumann.to_scipy() @ rhs, solution, atol=1e-8)
    legacy = ours.NeumannInverseLinearOperator(torch.as_tensor(matrix))
    legacy.set_neumann_hyperparameters(num_terms=2000, scale=scale)
    np.testing.assert_allclose(legacy.to_scipy() @ rhs, solution, atol=1e-8)
    diverging = ours.NeumannInverseLinearOperator(
        torch.as_tensor(matrix), num_terms=5000, scale=10.0
    )
    with pytest.raises(ValueError, match="NaN"):
        diverging @ torch.as_tensor(rhs)
