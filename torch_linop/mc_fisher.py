"""The Monte-Carlo Fisher: the GGN with its middle, the loss Hessian w.r.t. the output, replaced
by an estimate from targets drawn from the model's predictive distribution."""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Iterable
from typing import Any, TypeVar

import torch
from torch import nn

from torch_linop.ggn import GGNOperator
from torch_linop.losses.base import LossFunction, as_loss_function
from torch_linop.options import (
    ProductOptions,
    accepts_old_option_keywords,
    resolve_options,
    warn_deprecated,
)
from torch_linop.params import ParamFilter
from torch_linop.products.middle import SampledOutputHessian

Init = TypeVar("Init", bound=Callable[..., None])


def _accepts_loss_of_output_fn(init: Init) -> Init:
    """Keep ``MCFisherOperator(model, data, forward_fn, loss_of_output_fn)`` and
    ``loss_of_output_fn=`` working for one release (the signature would otherwise show more than
    the options a user needs): both become ``SplitLoss(forward_fn, loss_of_output_fn)``."""

    @functools.wraps(init)
    def constructor(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > 4:
            raise TypeError(
                f"MCFisherOperator takes model, data and loss_fn by position, got {len(args)} "
                "positional arguments: pass the others by keyword"
            )
        loss_of_output_fn = args[3] if len(args) == 4 else kwargs.pop("loss_of_output_fn", None)
        if len(args) == 4 or loss_of_output_fn is not None:
            warn_deprecated(
                "MCFisherOperator(model, data, forward_fn, loss_of_output_fn) is deprecated and "
                "will be removed in the next release: write MCFisherOperator(model, data, "
                "SplitLoss(forward_fn, loss_of_output_fn)) (from torch_linop.losses import "
                "SplitLoss)"
            )
            if len(args) >= 3:
                args = (*args[:2], as_loss_function(args[2], loss_of_output_fn))
            else:
                kwargs["loss_fn"] = as_loss_function(kwargs.get("loss_fn"), loss_of_output_fn)
        init(self, *args, **kwargs)

    return constructor  # type: ignore[return-value]


class MCFisherOperator(GGNOperator):
    """MC Fisher with ``mc_samples`` targets per sample, seeded by ``seed``: the GGN's product
    (same JVP strategies, same kept-graph mode) with a sampled middle
    (:class:`~torch_linop.products.middle.SampledOutputHessian`).

    The generator is re-seeded at the start of every product, so the operator is one fixed
    matrix (what Lanczos needs); it converges to the GGN as ``mc_samples`` grows for
    cross-entropy, MSE and BCE-with-logits losses. There is no ``cuda_graph`` option: the
    targets are drawn on the host in every product, which a CUDA graph cannot replay
    (``cache_graph=True`` alone keeps the forward passes). The rarely needed options (how many
    batches, a process group, ...) are set by ``options=``
    (:class:`~torch_linop.options.ProductOptions`).

    A loss given as a forward function and a loss-of-output function (the seed library's form)
    is one object here: ``MCFisherOperator(model, data, SplitLoss(forward_fn, loss_of_output_fn))``
    (``from torch_linop.losses import SplitLoss``); the 4th positional argument of earlier
    versions still works for one release, with a DeprecationWarning.
    """

    @_accepts_loss_of_output_fn
    @accepts_old_option_keywords
    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        loss_fn: LossFunction | Callable[..., torch.Tensor],
        *,
        param_filter: ParamFilter | None = None,
        jvp_method: str = "auto",
        mc_samples: int = 1,
        seed: int = 2147483647,
        cache_graph: bool = False,
        options: ProductOptions | None = None,
    ) -> None:
        options = resolve_options(options)
        if options.cuda_graph:
            raise ValueError(
                "MCFisherOperator has no CUDA-graph replay: its targets are drawn on the host in "
                "every product, which a captured graph cannot replay. Leave cuda_graph out of "
                "the options (cache_graph=True alone keeps the forward passes)"
            )
        self.sampled_output_hessian = SampledOutputHessian(mc_samples, seed)
        super().__init__(
            model,
            data,
            loss_fn,
            param_filter=param_filter,
            jvp_method=jvp_method,
            cache_graph=cache_graph,
            options=options,
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
