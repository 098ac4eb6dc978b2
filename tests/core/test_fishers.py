"""Empirical Fisher against an explicit per-sample gradient loop; Monte-Carlo Fisher against the
GGN as the number of samples grows, and as one fixed matrix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import EmpiricalFisherOperator, GGNOperator, MCFisherOperator, supervised_loss

DTYPE = torch.float64


def per_sample_gradients(model, data, per_sample_loss):
    """One ``torch.autograd.grad`` per sample (a batch of one), flattened: ``(N, n)``."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for x, y in data:
        for i in range(x.shape[0]):
            loss = per_sample_loss(model(x[i : i + 1]), y[i : i + 1])
            grads = torch.autograd.grad(loss, params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_empirical_fisher_matches_per_sample_loop(tiny_case, dense, rel_err):
    gradients = per_sample_gradients(tiny_case.model, tiny_case.data, F.cross_entropy)
    operator = EmpiricalFisherOperator(tiny_case.model, tiny_case.data, tiny_case.loss)
    expected = gradients.T @ gradients / gradients.shape[0]
    assert rel_err(dense(operator), expected) <= 1e-10
    assert all(p.grad is None for p in tiny_case.model.parameters())  # the loop used grad()


def test_empirical_fisher_sum_reduction_and_multi_output_mse(make_case, dense, rel_err):
    case = make_case("mlp")
    summed = supervised_loss(nn.CrossEntropyLoss(reduction="sum"))
    gradients = per_sample_gradients(case.model, case.data, F.cross_entropy)
    operator = EmpiricalFisherOperator(case.model, case.data, summed)
    assert rel_err(dense(operator), gradients.T @ gradients) <= 1e-10
    # MSE over 3 outputs: the per-sample loss is the mean over outputs, the loss their mean
    generator = torch.Generator().manual_seed(4)
    regression = [
        (x, torch.randn(x.shape[0], 3, generator=generator, dtype=DTYPE)) for x, _ in case.data
    ]
    gradients = per_sample_gradients(case.model, regression, F.mse_loss)
    operator = EmpiricalFisherOperator(case.model, regression, supervised_loss(F.mse_loss))
    assert rel_err(dense(operator), gradients.T @ gradients / gradients.shape[0]) <= 1e-10


def _regression_data(case, kind):
    generator = torch.Generator().manual_seed(3)
    if kind == "cross_entropy":
        labels = [y.clone() for _, y in case.data]
        labels[0][2] = -100  # an ignored sample: zero in both the GGN and the MC Fisher
        return [(x, y) for (x, _), y in zip(case.data, labels)], supervised_loss(F.cross_entropy)
    if kind == "mse":
        targets = [
            torch.randn(x.shape[0], 3, generator=generator, dtype=DTYPE) for x, _ in case.data
        ]
        return [(x, t) for (x, _), t in zip(case.data, targets)], supervised_loss(F.mse_loss)
    targets = [
        torch.rand(x.shape[0], 3, generator=generator, dtype=DTYPE).round() for x, _ in case.data
    ]
    loss = supervised_loss(F.binary_cross_entropy_with_logits)
    return [(x, t) for (x, _), t in zip(case.data, targets)], loss


@pytest.mark.parametrize("kind", ["cross_entropy", "mse", "bce_with_logits"])
def test_mc_fisher_converges_to_ggn_like_one_over_sqrt_samples(make_case, kind, dense, rel_err):
    """Root-mean-square error over three seeds at M = 4, 64, 1024 samples: each 16x more samples
    should divide it by about 4 (accepted: 2 to 10; a bias would push the ratio towards 1)."""
    case = make_case("mlp")
    data, loss = _regression_data(case, kind)
    ggn = dense(GGNOperator(case.model, data, loss))
    rms = []
    for mc_samples in (4, 64, 1024):
        errors = [
            rel_err(
                dense(MCFisherOperator(case.model, data, loss, mc_samples=mc_samples, seed=s)), ggn
            )
            for s in (0, 1, 2)
        ]
        rms.append(math.sqrt(sum(e * e for e in errors) / len(errors)))
    assert rms[0] > rms[1] > rms[2]
    for coarse, fine in zip(rms, rms[1:]):
        assert 2.0 <= coarse / fine <= 10.0, rms
    assert rms[2] < 0.1


def test_mc_fisher_is_one_fixed_matrix(make_case, dense):
    case = make_case("sdpa_attention")
    operator = MCFisherOperator(case.model, case.data, case.loss, mc_samples=2, seed=7)
    size = operator.shape[0]
    generator = torch.Generator().manual_seed(0)
    columns = torch.randn(size, 5, generator=generator, dtype=DTYPE)
    first = operator @ columns[:, 0]
    assert torch.equal(first, operator @ columns[:, 0])  # re-seeded: same product twice
    stacked = torch.stack([operator @ columns[:, j] for j in range(5)], dim=1)
    torch.testing.assert_close(operator @ columns, stacked, rtol=1e-12, atol=1e-14)
    matrix = dense(operator)
    torch.testing.assert_close(matrix, matrix.T, rtol=0, atol=1e-14)
    assert float(torch.linalg.eigvalsh(matrix).min()) > -1e-12  # a sum of outer products
    torch.testing.assert_close(matrix @ columns, operator @ columns, rtol=1e-12, atol=1e-14)
    other_seed = MCFisherOperator(case.model, case.data, case.loss, mc_samples=2, seed=8)
    assert not torch.allclose(other_seed @ columns, operator @ columns)


def test_mc_fisher_rejects_losses_without_a_sampler(make_case):
    case = make_case("mlp")
    operator = MCFisherOperator(case.model, case.data, supervised_loss(F.l1_loss))
    with pytest.raises(NotImplementedError, match="predictive distribution"):
        operator @ torch.ones(operator.shape[0], dtype=DTYPE)
    with pytest.raises(ValueError, match="mc_samples must be a positive int"):
        MCFisherOperator(case.model, case.data, case.loss, mc_samples=0)
