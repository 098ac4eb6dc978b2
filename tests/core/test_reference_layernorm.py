"""The dense reference Hessian on LayerNorm models, against plain autograd double backward.

torch 2.13's reverse-over-reverse (``torch.func.hessian``) gets layer_norm's weight-input block
wrong; the reference uses forward-over-reverse, which this test pins.
"""

import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import supervised_loss
from torch_linop.reference import dense_hessian


def _autograd_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = list(model.parameters())
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = []
    for i in range(flat.numel()):
        row = torch.autograd.grad(flat[i], params, retain_graph=True)
        rows.append(torch.cat([r.reshape(-1) for r in row]))
    return torch.stack(rows)


def test_dense_hessian_matches_double_backward_with_layernorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    reference = dense_hessian(model, [(x, y)], supervised_loss(F.cross_entropy))
    expected = _autograd_hessian(model, x, y)
    assert not reference.requires_grad
    torch.testing.assert_close(reference, expected, rtol=1e-10, atol=1e-12)
