"""The Monte-Carlo Fisher: the GGN with its middle, the loss Hessian w.r.t. the output, replaced
by an estimate from targets drawn from the model's predictive distribution."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from typing import Any

import torch
from torch import nn

from torch_linop.data import BatchSizeFn
from torch_linop.ggn import GGNOperator
from torch_linop.losses.base import LossFunction
from torch_linop.params import ParamFilter
from torch_linop.products.middle import SampledOutputHessian


class MCFisherOperator(GGNOperator):
    """MC Fisher with ``mc_samples`` targets per sample, seeded by ``seed``: the GGN's product
    (same JVP strategies, same kept-graph mode) with a sampled middle
    (:class:`~torch_linop.products.middle.SampledOutputHessian`).

    The generator is re-seeded at the start of every product, so the operator is one fixed
    matrix (what Lanczos needs); it converges to the GGN as ``mc_samples`` grows for
    cross-entropy, MSE and BCE-with-logits losses. There is no ``cuda_graph`` option: the
    targets are drawn on the host in every product, which a CUDA graph cannot replay
    (``cache_graph=True`` alone keeps the forward passes).
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
        jvp_method: str = "auto",
        cache_graph: bool = False,
        num_batches: int | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        num_data: int | None = None,
        check_deterministic: bool = False,
        progress: bool = False,
        process_group: Any = None,
    ) -> None:
        self.sampled_output_hessian = SampledOutputHessian(mc_samples, seed)
        super().__init__(
            model,
            data,
            loss_fn,
            loss_of_output_fn,
            param_filter=param_filter,
            jvp_method=jvp_method,
            cache_graph=cache_graph,
            num_batches=num_batches,
            batch_size_fn=batch_size_fn,
            num_data=num_data,
            check_deterministic=check_deterministic,
            progress=progress,
            process_group=process_group,
        )

    @property
    def mc_samples(self) -> int:
        """Targets drawn per sample."""
        return self.sampled_output_hessian.mc_samples

    @mc_samples.setter
    def mc_samples(self, value: int) -> None:
        self.sampled_output_hessian.mc_samples = value

    @property
    def seed(self) -> int:
        """The seed every product re-seeds the target generator with."""
        return self.sampled_output_hessian.seed

    def middle(self, batch: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The sampled loss Hessian w.r.t. the output, for this batch's draws."""
        return self.sampled_output_hessian.at(self.loss_fn, batch)

    def _weighted_products(
        self, tangents: list[torch.Tensor]
    ) -> Generator[tuple[float, list[torch.Tensor]], None, None]:
        self.sampled_output_hessian.restart()  # same targets in every product: a fixed matrix
        yield from super()._weighted_products(tangents)
