"""Monte-Carlo Fisher of the drop-in against curvlinops: both converge to the exact GGN at the
1/sqrt(mc_samples) rate, ours with an error no larger than curvlinops' (same normalisation, also
for 3-d outputs); one instance is one fixed matrix, set by its seed."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

curvlinops = pytest.importorskip("curvlinops")
if int(version("curvlinops-for-pytorch").split(".")[0]) != 3:
    pytest.skip("these comparisons use the curvlinops 3 API", allow_module_level=True)
import torch_linop.curvlinops as ours  # noqa: E402

SEEDS = range(6)


def dense(operator: Any) -> torch.Tensor:
    return operator @ torch.eye(operator.shape[1], dtype=torch.float64)


def make_case(kind: str) -> tuple[nn.Module, nn.Module, list]:
    """A tiny float64 model with 2-d or 3-d outputs and two uneven batches."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    shape = (7, 4, 3) if kind.startswith("seq") else (7, 3)
    inputs = torch.randn(*shape, generator=generator, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    if kind.endswith("ce"):
        targets = torch.randint(0, 3, (7,), generator=generator)
        loss: nn.Module = nn.CrossEntropyLoss()
    elif kind.endswith("bce"):
        targets = torch.randint(0, 2, shape, generator=generator).double()
        loss = nn.BCEWithLogitsLoss(reduction="sum")
    else:
        targets = torch.randn(*shape, generator=generator, dtype=torch.float64)
        loss = nn.MSELoss()
    data = [(inputs[:4], targets[:4]), (inputs[4:], targets[4:])]
    return model, loss, data


def mean_relative_error(library: Any, case: tuple, ggn: torch.Tensor, mc_samples: int) -> float:
    model, loss, data = case
    params = list(model.parameters())
    errors = []
    for seed in SEEDS:
        fisher = library.FisherMCLinearOperator(
            model, loss, params, data, mc_samples=mc_samples, seed=seed, check_deterministic=False
        )
        errors.append(float((dense(fisher) - ggn).norm() / ggn.norm()))
    return float(np.mean(errors))


@pytest.mark.parametrize("kind", ["mlp-ce", "mlp-mse", "mlp-bce", "seq-mse"])
def test_converges_to_ggn_at_curvlinops_rate(kind: str) -> None:
    case = make_case(kind)
    model, loss, data = case
    ggn = dense(ours.GGNLinearOperator(model, loss, list(model.parameters()), data))
    error = {
        (library.__name__, m): mean_relative_error(library, case, ggn, m)
        for library in (curvlinops, ours)
        for m in (1, 64)
    }
    for library in (curvlinops, ours):
        few, many = error[library.__name__, 1], error[library.__name__, 64]
        assert 1 / 16 < many / few < 1 / 4, (library.__name__, few, many)  # 1/sqrt(64) = 1/8
    for m in (1, 64):
        assert error[ours.__name__, m] < 1.5 * error[curvlinops.__name__, m]


def test_one_instance_is_one_matrix() -> None:
    model, loss, data = make_case("mlp-ce")
    params = list(model.parameters())
    fisher = ours.FisherMCLinearOperator(model, loss, params, data, mc_samples=3, seed=5)
    first = dense(fisher)
    assert torch.equal(first, dense(fisher))  # re-seeded at every product
    vector = np.random.default_rng(0).standard_normal(fisher.shape[0])
    np.testing.assert_allclose(fisher.to_scipy() @ vector, first.numpy() @ vector, atol=1e-12)
    same = ours.GGNLinearOperator(model, loss, params, data, mc_samples=3, seed=5)
    assert torch.equal(first, dense(same))  # GGN(mc_samples=M) is the MC Fisher
    other = ours.FisherMCLinearOperator(model, loss, params, data, mc_samples=3, seed=6)
    assert not torch.allclose(first, dense(other))
    exact = ours.GGNLinearOperator(model, loss, params, data)
    assert not torch.allclose(first, dense(exact))
    assert torch.allclose(first, first.T, atol=1e-12)


def test_rejects_unsupported_losses() -> None:
    model, _, data = make_case("mlp-mse")
    params = list(model.parameters())
    with pytest.raises(NotImplementedError, match="MSELoss"):
        ours.FisherMCLinearOperator(model, nn.L1Loss(), params, data)
    with pytest.raises(NotImplementedError, match="mc_samples"):
        ours.GGNLinearOperator(model, nn.L1Loss(), params, data, mc_samples=2)
    with pytest.raises(ValueError, match="mc_samples"):
        ours.FisherMCLinearOperator(model, nn.MSELoss(), params, data, mc_samples=0)
