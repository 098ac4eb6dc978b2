"""approximation_quality against the dense matrices it estimates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_linop import GGNOperator, supervised_loss
from torch_linop.kfac import KFACOperator
from torch_linop.kfac.quality import approximation_quality

DT = torch.float64


@pytest.fixture(scope="module")
def operators() -> tuple[KFACOperator, GGNOperator, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=generator, dtype=DT)
    y = torch.randint(0, 3, (40,), generator=generator)
    data = [(x[:20], y[:20]), (x[20:], y[20:])]
    kfac = KFACOperator(model, data, nn.CrossEntropyLoss())
    ggn = GGNOperator(model, data, supervised_loss(nn.CrossEntropyLoss()))
    eye = torch.eye(ggn.shape[0], dtype=DT)
    return kfac, ggn, kfac.to_dense(), ggn @ eye


def test_estimates_agree_with_dense_values(operators: tuple) -> None:
    kfac, ggn, kfac_dense, ggn_dense = operators
    quality = approximation_quality(kfac, ggn, num_probes=64, k=3, seed=2)
    true_error = float(torch.linalg.norm(kfac_dense - ggn_dense) / torch.linalg.norm(ggn_dense))
    assert (
        abs(quality.relative_frobenius_error - true_error)
        < 4 * quality.relative_frobenius_error_stderr
    )
    assert quality.relative_frobenius_error_stderr < 0.1 * true_error
    true_ratio = float(kfac_dense.trace() / ggn_dense.trace())
    assert abs(quality.trace_ratio - true_ratio) < 4 * quality.trace_ratio_stderr
    _, kfac_vectors = torch.linalg.eigh(kfac_dense)
    _, ggn_vectors = torch.linalg.eigh(ggn_dense)
    true_overlap = float((kfac_vectors[:, -3:].T @ ggn_vectors[:, -3:]).square().sum()) / 3
    assert quality.top_k_overlap == pytest.approx(true_overlap, abs=1e-6)
    assert 0.0 < true_overlap < 0.99  # the test distinguishes a wrong overlap from a trivial one


def test_an_operator_against_itself_is_perfect(operators: tuple) -> None:
    kfac = operators[0]
    quality = approximation_quality(kfac, kfac, num_probes=4, k=2)
    assert quality.relative_frobenius_error == 0.0
    assert quality.top_k_overlap == pytest.approx(1.0, abs=1e-8)
    # tr(K) from the factors over its Hutchinson estimate
    assert abs(quality.trace_ratio - 1.0) < 4 * quality.trace_ratio_stderr


def test_mismatched_operators_are_refused(operators: tuple) -> None:
    kfac = operators[0]
    with pytest.raises(ValueError, match="same parameters"):
        approximation_quality(kfac, torch.eye(3, dtype=DT), num_probes=4)
