"""Products and solvers work inside ``torch.no_grad()`` and ``torch.inference_mode()`` (a common
place to call them: evaluation loops) and give the same numbers as outside."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    MCFisherOperator,
    supervised_loss,
)
from torch_linop.reference import dense_hessian
from torch_linop.solvers import lanczos

OPERATORS = [
    (HessianOperator, {}),
    (HessianOperator, {"cache_graph": True}),
    (HessianOperator, {"method": "forward"}),
    (HessianOperator, {"method": "finite_difference"}),
    (GGNOperator, {}),
    (EmpiricalFisherOperator, {}),
    (MCFisherOperator, {"seed": 0}),
]


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (16,), generator=generator)
    return model, [(inputs, labels)], supervised_loss(F.cross_entropy)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=lambda m: m.__name__)
@pytest.mark.parametrize("operator_class, options", OPERATORS, ids=lambda x: str(x))
def test_products_inside_no_grad_and_inference_mode(problem, mode, operator_class, options):
    model, data, loss = problem
    op = operator_class(model, data, loss, **options)
    vectors = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(2)).double()
    expected = op @ vectors
    with mode():
        inside = op @ vectors.clone()  # an inference tensor under inference_mode
    torch.testing.assert_close(inside, expected, rtol=0, atol=0)
    assert not inside.requires_grad


def test_lanczos_inside_inference_mode_finds_the_dense_eigenvalues(problem):
    model, data, loss = problem
    exact = torch.linalg.eigvalsh(dense_hessian(model, data, loss)).flip(0)[:3]
    with torch.inference_mode():
        result = lanczos(HessianOperator(model, data, loss), 3, seed=0, tol=1e-10)
    torch.testing.assert_close(torch.from_numpy(result.eigenvalues), exact, rtol=1e-8, atol=1e-12)
