"""Weight norm: PyTorch's double backward of ``torch._weight_norm`` is asymmetric, so the
reverse-mode Hessian through it is wrong. Operators that would use it warn when built and name
the right method; ``check_symmetric()`` catches it; finite differences and the GGN match a
Hessian of the same network written out by hand (``W = g v / ||v||``, no ``_weight_norm``)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from torch_linop import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    match_names,
    supervised_loss,
)

DTYPE = torch.float64
LOSS = supervised_loss(F.cross_entropy)


def weight_normed_net(hook_style: bool = False) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        first, second = nn.Linear(3, 4), nn.Linear(4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook style is deprecated
        first = torch.nn.utils.weight_norm(first) if hook_style else weight_norm(first)
    return nn.Sequential(first, nn.Tanh(), second).to(DTYPE)


def data():
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(6, 3, generator=generator, dtype=DTYPE),
            torch.randint(0, 2, (6,), generator=generator),
        )
    ]


def handwritten_hessian(model: nn.Sequential, batches) -> torch.Tensor:
    """Dense Hessian of the mean cross-entropy with the weight norm written as ``g v / ||v||``
    (row norms, dim 0), in the model's parameter order."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)
    sizes = [p.numel() for p in params.values()]

    def loss_of(flat):
        values = dict(
            zip(names, (c.view(params[n].shape) for n, c in zip(names, flat.split(sizes))))
        )
        g = next(v for n, v in values.items() if n.endswith(("original0", "weight_g")))
        v = next(v for n, v in values.items() if n.endswith(("original1", "weight_v")))
        weight = g * v / v.norm(dim=1, keepdim=True)
        x, y = batches[0]
        hidden = torch.tanh(x @ weight.T + values["0.bias"])
        return F.cross_entropy(hidden @ values["2.weight"].T + values["2.bias"], y)

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    return torch.func.hessian(loss_of)(flat)


def dense(operator) -> torch.Tensor:
    return operator @ torch.eye(operator.shape[0], dtype=DTYPE)


@pytest.mark.parametrize("hook_style", [False, True], ids=["parametrization", "hook"])
def test_autograd_hessian_warns_and_fails_the_symmetry_check(hook_style):
    model = weight_normed_net(hook_style)
    with pytest.warns(UserWarning, match="method='finite_difference'") as record:
        operator = HessianOperator(model, data(), LOSS)
    assert "weight norm" in str(record[0].message)
    assert record[0].filename == __file__  # points at the user's line
    with pytest.raises(RuntimeError, match="is not symmetric"):
        operator.check_symmetric()


@pytest.mark.parametrize("hook_style", [False, True], ids=["parametrization", "hook"])
def test_right_methods_are_silent_symmetric_and_match_the_handwritten_hessian(hook_style):
    model = weight_normed_net(hook_style)
    expected = handwritten_hessian(model, data())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finite_difference = HessianOperator(model, data(), LOSS, method="finite_difference")
        ggn = GGNOperator(model, data(), LOSS)
        EmpiricalFisherOperator(model, data(), LOSS)
        HessianOperator(model, data(), LOSS, param_filter=match_names("2.*"))  # norm not selected
    assert finite_difference.check_symmetric() < 1e-6
    assert ggn.check_symmetric() < 1e-12
    actual = dense(finite_difference)
    assert float((actual - expected).norm() / expected.norm()) < 1e-6
    # the autograd Hessian really is wrong here (the reason for the warning)
    with pytest.warns(UserWarning):
        wrong = dense(HessianOperator(model, data(), LOSS))
    assert float((wrong - expected).norm() / expected.norm()) > 0.1


def test_check_symmetric_passes_on_a_plain_model_and_returns_the_asymmetry():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    asymmetry = HessianOperator(model, data(), LOSS).check_symmetric()
    assert 0.0 <= asymmetry < 1e-12
