"""The Monte-Carlo Fisher: the GGN with the loss Hessian replaced by outer products of output
gradients at targets drawn from the model's predictive distribution."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from torch_linop.ggn import GGNOperator
from torch_linop.losses.base import LossFunction
from torch_linop.params import ParamFilter


class MCFisherOperator(GGNOperator):
    """MC Fisher with ``mc_samples`` targets per sample, seeded by ``seed``.

    The generator is re-seeded at the start of every product, so the operator is one fixed
    matrix (what Lanczos needs); it converges to the GGN as ``mc_samples`` grows for
    cross-entropy, MSE and BCE-with-logits losses.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        loss_fn: LossFunction | Callable[..., torch.Tensor],
        loss_of_output_fn: Callable[..., torch.Tensor] | None = None,
        *,
        param_filter: ParamFilter | None = None,
        mc_samples: int = 1,
        seed: int = 2147483647,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("cuda_graph") is True:
            raise ValueError(
                "cuda_graph=True cannot capture the MC Fisher: its targets are drawn on the host "
                "in every product; use cache_graph=True alone"
            )
        if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
        self.mc_samples = mc_samples
        self.seed = int(seed)
        self._generator = torch.Generator()
        super().__init__(
            model, data, loss_fn, loss_of_output_fn, param_filter=param_filter, **kwargs
        )

    def _apply(self, columns: torch.Tensor) -> torch.Tensor:
        self._generator.manual_seed(self.seed)  # same samples in every product: a fixed matrix
        return super()._apply(columns)

    def middle(self, batch: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        # every column of this batch sees the same targets, whether columns are batched or looped
        state = self._generator.get_state()

        def sampled(output: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
            self._generator.set_state(state)
            return self.loss_fn.sampled_output_hessian_vector_product(
                output, batch, vectors, self._generator, self.mc_samples
            )

        return sampled
