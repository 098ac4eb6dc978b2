"""The torch workarounds of the exact sharded Hessian (reverse-over-forward: backpropagating a
forward-mode tangent), one process: inside ``reverse_over_forward_fixes`` the gradient of the
tangent ``g(x)^T v`` equals the forward-over-reverse ``H v`` of torch.func (an independent
route) through layer_norm, batch_norm and softmax/cross-entropy; the composite normalisations
give the fused kernels' values and move batch-norm running statistics as they do.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, jvp

from torch_linop.distributed.fsdp_forward_ad import reverse_over_forward_fixes

Function = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    point, direction, weights = (
        torch.randn(4, 3, 6, generator=generator, dtype=torch.float64) for _ in range(3)
    )
    return point, direction, weights


def reverse_over_forward(function: Function, point: torch.Tensor, direction: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
    leaf = point.clone().requires_grad_()
    with fwAD.dual_level(), reverse_over_forward_fixes():
        tangent = fwAD.unpack_dual(function(fwAD.make_dual(leaf, direction), weights)).tangent
    (product,) = torch.autograd.grad(tangent, leaf)
    return product


def forward_over_reverse(function: Function, point: torch.Tensor, direction: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
    def loss(x: torch.Tensor) -> torch.Tensor:
        return function(x, weights)

    return jvp(grad(loss), (point,), (direction,))[1]


AFFINE = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
FUNCTIONS: dict[str, Function] = {
    "layer_norm": lambda x, w: (torch.sin(F.layer_norm(x, (6,))) * w).sum(),
    "layer_norm_affine": lambda x, w: (
        torch.sin(F.layer_norm(x, (6,), AFFINE, AFFINE - 1, 1e-3)) * w
    ).sum(),
    "layer_norm_two_dims": lambda x, w: (torch.sin(torch.layer_norm(x, (3, 6))) * w).sum(),
    "batch_norm_batch_statistics": lambda x, w: (
        torch.sin(F.batch_norm(x, None, None, AFFINE[:3], None, training=True)) * w
    ).sum(),
    "batch_norm_running_statistics": lambda x, w: (
        torch.sin(F.batch_norm(x, AFFINE[:3] - 1, AFFINE[:3], training=False)) * w
    ).sum(),
    "softmax_cross_entropy": lambda x, w: F.cross_entropy(
        x.reshape(-1, 6) * w.reshape(-1, 6), torch.arange(12) % 6
    ),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_backpropagated_tangents_are_hessian_vector_products(name: str) -> None:
    point, direction, weights = inputs()
    got = reverse_over_forward(FUNCTIONS[name], point, direction, weights)
    want = forward_over_reverse(FUNCTIONS[name], point, direction, weights)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


def test_composite_normalisations_match_the_fused_kernels() -> None:
    point, _, _ = inputs()
    with reverse_over_forward_fixes():
        layer = F.layer_norm(point, (6,), AFFINE, AFFINE - 1)
    torch.testing.assert_close(layer, F.layer_norm(point, (6,), AFFINE, AFFINE - 1))
    running = {True: [torch.zeros(3).double(), torch.ones(3).double()]}
    running[False] = [tensor.clone() for tensor in running[True]]
    with reverse_over_forward_fixes():
        batch = F.batch_norm(point, running[True][0], running[True][1], None, None, True, 0.3)
    reference = F.batch_norm(point, running[False][0], running[False][1], None, None, True, 0.3)
    torch.testing.assert_close(batch, reference)
    for composite, fused in zip(running[True], running[False]):
        torch.testing.assert_close(composite, fused, rtol=0, atol=0)
    assert not torch.equal(running[True][0], torch.zeros(3).double())  # they did move


def test_instance_norm_is_refused_with_the_alternative() -> None:
    point, _, _ = inputs()
    with reverse_over_forward_fixes(), pytest.raises(NotImplementedError, match="finite_diff"):
        F.instance_norm(point)
