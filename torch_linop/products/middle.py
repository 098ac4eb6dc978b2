"""What sits between ``J`` and ``J^T`` in a sandwich product: a map ``(output, vectors) ->
vectors`` for one batch, ``vectors`` being ``(k, *output.shape)``. The GGN's is the exact loss
Hessian w.r.t. the output, the MC Fisher's a Monte-Carlo estimate of it from sampled targets,
the empirical Fisher's a scaling of the per-sample losses' JVPs. Each is a function of the
operator's loss and one batch, made per batch (the MC Fisher draws its targets there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from torch_linop._checks import check_loss
from torch_linop.losses.base import LossFunction

MiddleMap = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def autograd_output_hvp(
    loss_fn: LossFunction, output: torch.Tensor, batch: Any, vectors: torch.Tensor
) -> torch.Tensor:
    """Output Hessian times ``vectors`` ``(k, *output.shape)`` by double backward on the loss
    alone (a small graph: loss of the detached output)."""
    leaf = output.detach().requires_grad_(True)
    loss = check_loss(loss_fn.loss(leaf, batch), "the loss of the output")
    (gradient,) = torch.autograd.grad(loss, leaf, create_graph=True)
    if not gradient.requires_grad:  # loss linear in the output
        return torch.zeros_like(vectors)
    columns = [
        torch.autograd.grad(gradient, leaf, grad_outputs=v, retain_graph=True)[0] for v in vectors
    ]
    return torch.stack(columns)


def output_hvp_of(loss_fn: LossFunction, batch: Any) -> MiddleMap:
    """The exact loss Hessian w.r.t. the output (the GGN's middle): closed form when the loss
    has one, else by double backward on the loss. The map may overwrite ``vectors`` (the
    operators pass their own JVPs)."""

    def middle(output: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        closed = loss_fn.output_hessian_vector_product_(output, batch, vectors)
        if closed is not None:
            return closed
        return autograd_output_hvp(loss_fn, output, batch, vectors)

    return middle


class SampledOutputHessian:
    """The MC Fisher's middle: the output Hessian estimated from ``mc_samples`` targets per
    sample drawn from the model's predictive distribution, by a generator seeded with ``seed``.

    :meth:`restart` (at the start of every product) re-seeds it, so every product sees the same
    targets: one fixed matrix. Every column of a batch sees the same targets, whether columns
    are batched or looped (the generator state is taken when the batch's map is made)."""

    def __init__(self, mc_samples: int, seed: int) -> None:
        if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
        self.mc_samples = mc_samples
        self.seed = int(seed)
        self.generator = torch.Generator()

    def restart(self) -> None:
        """Re-seed: the next batches draw the same targets as in every other product."""
        self.generator.manual_seed(self.seed)

    def at(self, loss_fn: LossFunction, batch: Any) -> MiddleMap:
        state = self.generator.get_state()

        def sampled(output: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
            self.generator.set_state(state)
            return loss_fn.sampled_output_hessian_vector_product(
                output, batch, vectors, self.generator, self.mc_samples
            )

        return sampled


def empirical_fisher_middle(loss_fn: LossFunction) -> MiddleMap:
    """The empirical Fisher's middle on the per-sample losses' JVPs: ``1 / n_b`` for mean
    losses (with the batch weight ``n_b / N`` this gives ``(1/N) sum_i g_i g_i^T``), 1 for
    sums."""

    def scaled(losses: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        return vectors / losses.numel() if loss_fn.reduction == "mean" else vectors

    return scaled
