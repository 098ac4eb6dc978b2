"""Operators against closed-form curvature of linear models (no autodiff in the references).

For a linear model ``z_i = W x_i + b`` the Jacobian w.r.t. ``(vec W, b)`` (row-major ``W``, the
order of ``named_parameters()``) is ``J_i = [I_C kron x_i^T, I_C]``, so the Hessian, the GGN and the
empirical Fisher are sums of ``J_i^T A_i J_i`` with ``A_i`` known in closed form:
``2 I`` (squared error), ``sigma (1 - sigma)`` (logistic), ``diag(p) - p p^T`` (softmax).
Batches are uneven and the dataset matrix is the sample-weighted mean: a short last batch weighs
what it holds, and a cross-entropy sample with ``ignore_index`` weighs nothing.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    supervised_loss,
)

DTYPE = torch.float64
BATCH_SIZES = (5, 3, 2)
FEATURES = 3


def linear_model(outputs: int, seed: int = 0) -> nn.Linear:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Linear(FEATURES, outputs).to(DTYPE)


def inputs(seed: int = 11) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, FEATURES, generator=generator, dtype=DTYPE) for size in BATCH_SIZES]


def jacobian(x: torch.Tensor, outputs: int) -> torch.Tensor:
    """``J_i`` of ``W x + b`` w.r.t. ``(vec W, b)``: shape ``(outputs, outputs * (FEATURES + 1))``."""
    eye = torch.eye(outputs, dtype=DTYPE)
    return torch.cat([torch.kron(eye, x.unsqueeze(0)), eye], dim=1)


def all_operators(model, data, loss):
    return {
        "hessian_autograd": HessianOperator(model, data, loss),
        "hessian_forward": HessianOperator(model, data, loss, method="forward"),
        "ggn": GGNOperator(model, data, loss),
        "ggn_double_backward": GGNOperator(model, data, loss, jvp_method="double_backward"),
    }


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_regression_hessian_is_2_xtx_over_n(reduction, dense, rel_err):
    model = linear_model(1)
    xs = inputs()
    generator = torch.Generator().manual_seed(12)
    data = [(x, torch.randn(x.shape[0], 1, generator=generator, dtype=DTYPE)) for x in xs]
    design = torch.cat([torch.cat([x, torch.ones(x.shape[0], 1, dtype=DTYPE)], 1) for x in xs])
    expected = 2 * design.T @ design
    if reduction == "mean":
        expected = expected / design.shape[0]
        criterion = F.mse_loss  # the seed-style call: supervised_loss(nn.functional.mse_loss)
    else:
        criterion = nn.MSELoss(reduction="sum")
    for name, operator in all_operators(model, data, supervised_loss(criterion)).items():
        assert rel_err(dense(operator), expected) <= 1e-12, name


def test_multi_output_regression_mean_over_elements(dense, rel_err):
    """``F.mse_loss`` averages over samples *and* outputs: ``2 / (N D) sum_i J_i^T J_i``."""
    outputs = 2
    model = linear_model(outputs)
    xs = inputs()
    generator = torch.Generator().manual_seed(13)
    data = [(x, torch.randn(x.shape[0], outputs, generator=generator, dtype=DTYPE)) for x in xs]
    rows = torch.cat(xs)
    expected = sum(2 * jacobian(x, outputs).T @ jacobian(x, outputs) for x in rows)
    expected = expected / (rows.shape[0] * outputs)
    for name, operator in all_operators(model, data, supervised_loss(F.mse_loss)).items():
        assert rel_err(dense(operator), expected) <= 1e-12, name


def test_linear_regression_empirical_fisher(dense, rel_err):
    """Per-sample gradient ``g_i = 2 (w.x_i + b - y_i) [x_i, 1]``: EF = mean of ``g_i g_i^T``."""
    model = linear_model(1)
    xs = inputs()
    generator = torch.Generator().manual_seed(14)
    data = [(x, torch.randn(x.shape[0], 1, generator=generator, dtype=DTYPE)) for x in xs]
    design = torch.cat([torch.cat([x, torch.ones(x.shape[0], 1, dtype=DTYPE)], 1) for x in xs])
    targets = torch.cat([y for _, y in data]).squeeze(1)
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    gradients = 2 * (design @ theta - targets).unsqueeze(1) * design
    expected = gradients.T @ gradients / design.shape[0]
    operator = EmpiricalFisherOperator(model, data, supervised_loss(F.mse_loss))
    assert rel_err(dense(operator), expected) <= 1e-12
    summed = EmpiricalFisherOperator(model, data, supervised_loss(nn.MSELoss(reduction="sum")))
    assert rel_err(dense(summed), gradients.T @ gradients) <= 1e-12


def test_logistic_regression(dense, rel_err):
    """BCE with logits: ``(1/N) sum_i sigma_i (1 - sigma_i) [x_i, 1][x_i, 1]^T``."""
    model = linear_model(1)
    xs = inputs()
    generator = torch.Generator().manual_seed(15)
    data = [(x, torch.rand(x.shape[0], 1, generator=generator, dtype=DTYPE).round()) for x in xs]
    design = torch.cat([torch.cat([x, torch.ones(x.shape[0], 1, dtype=DTYPE)], 1) for x in xs])
    with torch.no_grad():
        sigma = torch.sigmoid(model(torch.cat(xs))).squeeze(1)
    expected = (design * (sigma * (1 - sigma)).unsqueeze(1)).T @ design / design.shape[0]
    loss = supervised_loss(F.binary_cross_entropy_with_logits)
    for name, operator in all_operators(model, data, loss).items():
        assert rel_err(dense(operator), expected) <= 1e-12, name
    targets = torch.cat([y for _, y in data]).squeeze(1)
    gradients = (sigma - targets).unsqueeze(1) * design
    ef = EmpiricalFisherOperator(model, data, loss)
    assert rel_err(dense(ef), gradients.T @ gradients / design.shape[0]) <= 1e-12


SOFTMAX_LOSSES = {
    "module_ignore_index": (nn.CrossEntropyLoss(ignore_index=-1), -1, "mean"),
    "function_default_ignore_index": (F.cross_entropy, -100, "mean"),
    "partial_sum": (functools.partial(F.cross_entropy, reduction="sum"), -100, "sum"),
}


@pytest.mark.parametrize("loss_name", list(SOFTMAX_LOSSES))
def test_softmax_regression_with_ignore_index_and_uneven_batches(loss_name, dense, rel_err):
    """Cross-entropy: ``(1/N_valid) sum_{valid i} J_i^T (diag p_i - p_i p_i^T) J_i``; ignored
    samples drop out of the sum *and* of N, and a batch whose labels are all ignored adds 0."""
    classes = 4
    criterion, ignore, reduction = SOFTMAX_LOSSES[loss_name]
    model = linear_model(classes)
    extra = torch.randn(2, FEATURES, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    xs = inputs() + [extra]
    generator = torch.Generator().manual_seed(16)
    labels = [torch.randint(0, classes, (x.shape[0],), generator=generator) for x in xs]
    labels[0][[1, 3]] = ignore  # first batch: 3 of 5 samples count
    labels[2][0] = ignore  # short batch: 1 of 2 counts
    labels[3][:] = ignore  # a batch with no target at all
    data = list(zip(xs, labels))

    rows, targets = torch.cat(xs), torch.cat(labels)
    valid = targets != ignore
    with torch.no_grad():
        probs = torch.softmax(model(rows), dim=1)
    blocks = [jacobian(x, classes) for x in rows[valid]]
    hessians = [torch.diag(p) - torch.outer(p, p) for p in probs[valid]]
    expected = sum(j.T @ a @ j for j, a in zip(blocks, hessians))
    residuals = probs[valid] - F.one_hot(targets[valid], classes).to(DTYPE)
    gradients = torch.stack([j.T @ r for j, r in zip(blocks, residuals)])
    expected_ef = gradients.T @ gradients
    if reduction == "mean":
        count = int(valid.sum())
        assert count == 3 + 3 + 1
        expected, expected_ef = expected / count, expected_ef / count

    loss = supervised_loss(criterion)
    for name, operator in all_operators(model, data, loss).items():
        assert rel_err(dense(operator), expected) <= 1e-12, name
        if reduction == "mean":
            assert operator.num_data == 7
    ef = EmpiricalFisherOperator(model, data, loss)
    assert rel_err(dense(ef), expected_ef) <= 1e-12


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_softmax_regression_with_unnormalised_probability_targets(smoothing, dense, rel_err):
    """Probability targets whose rows sum to ``s_i != 1``: the output Hessian is
    ``s_i (diag p_i - p_i p_i^T)`` (label smoothing: ``s_i = (1 - eps) sum q_i + eps``), and
    for a linear model the GGN equals the Hessian."""
    classes = 4
    model = linear_model(classes)
    xs = inputs()
    generator = torch.Generator().manual_seed(17)
    targets = [torch.rand(x.shape[0], classes, generator=generator, dtype=DTYPE) for x in xs]
    data = list(zip(xs, targets))
    rows, mass = torch.cat(xs), torch.cat(targets).sum(1) * (1 - smoothing) + smoothing
    assert (mass - 1).abs().mean() > 0.3  # rows far from distributions
    with torch.no_grad():
        probs = torch.softmax(model(rows), dim=1)
    expected = (
        sum(
            s * jacobian(x, classes).T @ (torch.diag(p) - torch.outer(p, p)) @ jacobian(x, classes)
            for x, p, s in zip(rows, probs, mass)
        )
        / rows.shape[0]
    )
    loss = supervised_loss(nn.CrossEntropyLoss(label_smoothing=smoothing))
    for name, operator in all_operators(model, data, loss).items():
        assert rel_err(dense(operator), expected) <= 1e-12, name


def test_short_last_batch_weighs_what_it_holds(make_case, dense, rel_err):
    """The dataset Hessian over batches of 5 and 3 samples equals the Hessian over one batch of
    all 8: batch weights are ``n_b / N``, not ``1 / num_batches``."""
    case = make_case("mlp")
    merged = [(torch.cat([x for x, _ in case.data]), torch.cat([y for _, y in case.data]))]
    split = dense(HessianOperator(case.model, case.data, case.loss))
    whole = dense(HessianOperator(case.model, merged, case.loss))
    assert rel_err(split, whole) <= 1e-12
    per_batch = [dense(HessianOperator(case.model, [b], case.loss)) for b in case.data]
    unweighted = (per_batch[0] + per_batch[1]) / 2
    assert rel_err(unweighted, whole) > 1e-3  # the test can tell the two weightings apart


def test_mc_fisher_sampler_scales_by_the_target_mass():
    """The sampled output Hessian of cross-entropy with unnormalised probability targets
    averages to ``s_i (diag p_i - p_i p_i^T)``, the closed form (not to ``s_i = 1``)."""
    generator = torch.Generator().manual_seed(18)
    logits = torch.randn(3, 4, generator=generator, dtype=DTYPE)
    targets = torch.rand(3, 4, generator=generator, dtype=DTYPE) * torch.tensor(
        [[0.3], [1.0], [2.0]]
    )
    vectors = torch.randn(2, 3, 4, generator=generator, dtype=DTYPE)
    loss = supervised_loss(F.cross_entropy)
    batch = (None, targets)
    probs = torch.softmax(logits, 1)
    mass = targets.sum(1)
    hessians = mass[:, None, None] * (
        torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    )
    expected = torch.einsum("rcd,krd->krc", hessians, vectors) / 3
    closed = loss.output_hessian_vector_product(logits, batch, vectors)
    assert float((closed - expected).norm() / expected.norm()) < 1e-12
    sampled = loss.sampled_output_hessian_vector_product(
        logits, batch, vectors, torch.Generator().manual_seed(0), 4000
    )
    assert float((sampled - expected).norm() / expected.norm()) < 0.1
