"""Structure-exploiting methods against dense float64 linear algebra, the damped inverse
against the operator, state_dict round trips, and EKFAC's optimality in the KFAC eigenbasis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from torch_linop import supervised_loss
from torch_linop.kfac import EKFACOperator, KFACInverseOperator, KFACOperator
from torch_linop.reference import dense_ggn

DT = torch.float64


def problem(seed: int = 0, conv: bool = False) -> tuple[nn.Module, list]:
    """A tiny float64 model with full-rank Kronecker factors and two batches."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    if conv:
        model = nn.Sequential(
            nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)
        ).to(DT)
        x = torch.randn(12, 1, 3, 3, generator=generator, dtype=DT)
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
        x = torch.randn(12, 3, generator=generator, dtype=DT)
    y = torch.randint(0, 3, (12,), generator=generator)
    return model, [(x[:5], y[:5]), (x[5:], y[5:])]


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("operator_class", [KFACOperator, EKFACOperator])
def test_trace_det_logdet_frobenius_equal_dense(operator_class: type, separate: bool) -> None:
    model, data = problem(2)
    kfac = operator_class(model, data, nn.CrossEntropyLoss(), separate_weight_and_bias=separate)
    dense = kfac.to_dense()
    eigenvalues = torch.linalg.eigvalsh(dense)
    torch.testing.assert_close(kfac.trace(), dense.trace(), rtol=1e-12, atol=0)
    torch.testing.assert_close(kfac.frobenius_norm(), torch.linalg.norm(dense), rtol=1e-12, atol=0)
    # the CE gradient factor of the last layer is singular (logits shift): logdet -inf-ish;
    # compare on the damped operator's blocks instead through the dense slogdet of K + I
    damped_logdet = torch.log(eigenvalues + 1.0).sum()
    inverse = kfac.inverse(1.0, use_exact_damping=True)
    torch.testing.assert_close(
        -torch.logdet(inverse.to_dense()), damped_logdet, rtol=1e-10, atol=1e-10
    )


def test_logdet_and_det_equal_dense_on_a_full_rank_kfac() -> None:
    model, data = problem(3)
    targets = [(x, torch.randn(x.shape[0], 3, dtype=DT)) for x, _ in data]
    kfac = KFACOperator(model, targets, nn.MSELoss())  # MSE: G full rank
    dense = kfac.to_dense()
    sign, logabsdet = torch.linalg.slogdet(dense)
    assert sign > 0
    torch.testing.assert_close(kfac.logdet(), logabsdet, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(kfac.det(), torch.det(dense), rtol=1e-8, atol=0)
    decomposition = kfac.eigendecomposition()
    products = []
    for layer in kfac.layers:
        g_values = decomposition[layer.name]["gradient"][0]
        a_values = decomposition[layer.name]["input"][0]
        products += [torch.outer(g_values, a_values).reshape(-1), g_values]
    torch.testing.assert_close(
        torch.sort(torch.cat(products)).values, torch.linalg.eigvalsh(dense), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("operator_class", [KFACOperator, EKFACOperator])
def test_exactly_damped_inverse_times_operator_is_identity(
    operator_class: type, separate: bool, conv: bool
) -> None:
    model, data = problem(4, conv)
    kfac = operator_class(model, data, nn.CrossEntropyLoss(), separate_weight_and_bias=separate)
    damping = 1e-3
    inverse = kfac.inverse(damping, use_exact_damping=True)
    columns = torch.randn(kfac.shape[0], 4, generator=torch.Generator().manual_seed(5), dtype=DT)
    damped = kfac.shift(damping) @ columns  # the shared operator algebra: K + damping I
    torch.testing.assert_close(damped, kfac @ columns + damping * columns)
    residual = inverse @ damped - columns
    assert float(residual.abs().max()) < 1e-10
    assert (
        float((kfac @ (inverse @ columns) + damping * (inverse @ columns) - columns).abs().max())
        < 1e-10
    )


def test_factor_damped_inverses_are_the_inverted_damped_factors() -> None:
    model, data = problem(6)
    kfac = KFACOperator(model, data, nn.CrossEntropyLoss(), separate_weight_and_bias=False)
    kfac.compute_factors()
    inverse = kfac.inverse((0.1, 0.01))
    dense_inverse = inverse.to_dense()
    blocks = []
    for layer in kfac.layers:
        a, g = kfac.factors(layer)
        assert a is not None
        damped = torch.kron(
            g + 0.01 * torch.eye(g.shape[0], dtype=DT), a + 0.1 * torch.eye(a.shape[0], dtype=DT)
        )
        blocks.append(torch.linalg.inv(damped))
    # joined [W | b] blocks are ordered [W row-major, b] in the parameter vector: permute
    expected = torch.block_diag(*blocks)
    order = []
    start = 0
    for layer in kfac.layers:
        rows, cols = layer.out_features, layer.in_features + 1
        joined = torch.arange(rows * cols).reshape(rows, cols) + start
        order += joined[:, :-1].reshape(-1).tolist() + joined[:, -1].tolist()
        start += rows * cols
    expected = expected[order][:, order]
    torch.testing.assert_close(dense_inverse, expected, rtol=1e-10, atol=1e-12)

    heuristic = kfac.inverse(0.1, use_heuristic_damping=True, min_damping=1e-8)
    layer = kfac.layers[0]
    a, g = kfac.factors(layer)
    assert a is not None
    pi = torch.sqrt((a.trace() / a.shape[0]) / (g.trace() / g.shape[0]))
    damp_a, damp_g = heuristic.factor_dampings(a, g)
    assert damp_a == pytest.approx(float(pi * 0.1**0.5)) and damp_g == pytest.approx(
        float(0.1**0.5 / pi)
    )


def test_cholesky_failure_retried_in_float64_or_explained() -> None:
    torch.manual_seed(7)
    model = nn.Linear(5, 2)
    data = [(torch.randn(6, 5), torch.randn(6, 2))]
    kfac = KFACOperator(model, data, nn.MSELoss())  # gradient factor: a multiple of I
    kfac.compute_factors()
    # positive definite in float64 (eigenvalues 1 ... 1e-9), but float32 Cholesky breaks down
    basis, _ = torch.linalg.qr(
        torch.randn(5, 5, generator=torch.Generator().manual_seed(2), dtype=DT)
    )
    factor = (basis * torch.logspace(0, -9, 5, dtype=DT)) @ basis.T
    factor = ((factor + factor.T) / 2).float()
    assert torch.linalg.eigvalsh(factor.double()).min() > 0
    kfac.input_covariances[""] = factor
    ones = torch.ones(kfac.shape[0])
    with pytest.raises(RuntimeError, match="increase the damping"):
        kfac.inverse(0.0, retry_double_precision=False) @ ones
    with pytest.warns(UserWarning, match="retrying in float64"):
        product = kfac.inverse(0.0) @ ones
    weight = ones[:10].reshape(2, 5).double()
    gradient_inverse = torch.linalg.inv(kfac.gradient_covariances[""].double())
    expected = gradient_inverse @ weight @ torch.linalg.inv(factor.double())
    torch.testing.assert_close(product[:10].double(), expected.reshape(-1), rtol=1e-3, atol=0)


def test_state_dict_round_trip_is_exact() -> None:
    model, data = problem(8, conv=True)
    for operator_class in (KFACOperator, EKFACOperator):
        kfac = operator_class(model, data, nn.CrossEntropyLoss(), fisher_type="mc", seed=3)
        state = kfac.state_dict()
        restored = operator_class.from_state_dict(state, model, data)
        columns = torch.randn(
            kfac.shape[0], 3, generator=torch.Generator().manual_seed(9), dtype=DT
        )
        assert torch.equal(restored @ columns, kfac @ columns)
        saved = kfac.inverse(1e-2, use_exact_damping=True)
        saved @ columns
        fresh = KFACInverseOperator(restored, 1e-2, use_exact_damping=True)
        fresh.load_state_dict(saved.state_dict())
        assert torch.equal(fresh @ columns, saved @ columns)
    other = KFACOperator(model, data, nn.CrossEntropyLoss(), fisher_type="empirical")
    with pytest.raises(ValueError, match="fisher_type"):
        other.load_state_dict(KFACOperator(model, data, nn.CrossEntropyLoss()).state_dict())


def test_ekfac_is_the_best_diagonal_in_the_kfac_eigenbasis() -> None:
    """Per layer with joined [W | b], type-2 on 2-d outputs: the sum over examples of gradient
    outer products is the exact GGN block; EKFAC's eigenvalues equal diag(Q^T F Q) for the KFAC
    eigenbasis Q = Q_G kron Q_A, the Frobenius-optimal diagonal in that basis, so they beat
    KFAC's own eigenvalues and any perturbation."""
    model, data = problem(10)
    ekfac = EKFACOperator(model, data, nn.CrossEntropyLoss(), separate_weight_and_bias=False)
    kfac = KFACOperator(model, data, nn.CrossEntropyLoss(), separate_weight_and_bias=False)
    exact = dense_ggn(model, data, supervised_loss(nn.CrossEntropyLoss()))
    start = 0
    for layer in ekfac.layers:
        rows, cols = layer.out_features, layer.in_features + 1
        size = rows * cols
        # the parameter vector holds W row-major then b; the joined block is [W | b] row-major
        grid = torch.empty(rows, cols, dtype=torch.long)
        grid[:, :-1] = start + torch.arange(rows * (cols - 1)).reshape(rows, cols - 1)
        grid[:, -1] = start + rows * (cols - 1) + torch.arange(rows)
        order = grid.reshape(-1)
        block = exact[order][:, order]
        input_vectors, gradient_vectors = ekfac.eigenvectors(layer)
        basis = torch.kron(gradient_vectors, input_vectors)
        best = torch.diagonal(basis.T @ block @ basis).reshape(rows, cols)
        corrected = ekfac.corrected_eigenvalues[layer.name]["joined"]
        torch.testing.assert_close(corrected, best, rtol=1e-10, atol=1e-13)

        def error(
            values: torch.Tensor, block: torch.Tensor = block, basis: torch.Tensor = basis
        ) -> float:
            return float(
                torch.linalg.norm(block - basis @ torch.diag(values.reshape(-1)) @ basis.T)
            )

        a, g = kfac.factors(layer)
        assert a is not None
        kfac_values = torch.outer(torch.linalg.eigvalsh(g), torch.linalg.eigvalsh(a))
        kfac_in_basis = torch.diagonal(basis.T @ torch.kron(g, a) @ basis).reshape(rows, cols)
        torch.testing.assert_close(kfac_in_basis, kfac_values, rtol=1e-8, atol=1e-12)
        assert error(corrected) <= error(kfac_values) + 1e-12
        perturbation = torch.randn(
            rows, cols, generator=torch.Generator().manual_seed(11), dtype=DT
        )
        assert error(corrected) < error(corrected + 1e-3 * perturbation)
        start += size


def test_operators_work_with_scipy_solvers() -> None:
    from scipy.sparse.linalg import aslinearoperator, cg

    model, data = problem(12)
    kfac = KFACOperator(model, data, nn.CrossEntropyLoss())
    inverse = kfac.inverse(0.1, use_exact_damping=True)
    rhs = np.random.default_rng(0).standard_normal(kfac.shape[0])
    solution, info = cg(
        kfac + aslinearoperator(0.1 * np.eye(kfac.shape[0])), rhs, rtol=1e-12, atol=0
    )
    assert info == 0
    np.testing.assert_allclose(inverse @ rhs, solution, rtol=1e-7, atol=1e-9)


def test_ekfac_type2_refuses_several_loss_rows_per_example() -> None:
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).to(DT)
    x = torch.randn(2, 6, 3, dtype=DT)
    y = torch.randint(0, 5, (2, 6))
    with pytest.raises(ValueError, match="one loss term per example.*fisher_type='mc'"):
        EKFACOperator(model, [(x, y)], nn.CrossEntropyLoss(), class_dim=-1).compute_factors()
    EKFACOperator(model, [(x, y)], nn.CrossEntropyLoss(), class_dim=-1, fisher_type="mc").trace()
