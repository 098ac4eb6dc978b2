"""The loss protocol: one object drives the Hessian, GGN, empirical Fisher and MC Fisher.

A loss splits the model's forward pass (``forward``) from the loss of its output (``loss``), knows
how many samples a batch holds (``num_samples``), its per-sample losses (for the empirical Fisher),
and optionally a closed-form Hessian-vector product with respect to the output (for the GGN) and a
sampler of output gradients (for the Monte-Carlo Fisher). Subclass it to plug in your own loss.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

Reduction = Literal["mean", "sum"]


class LossFunction:
    """Base class of losses usable by every operator.

    ``reduction="mean"`` means ``loss`` averages over the batch's ``num_samples(batch)`` samples, so
    the dataset matrix weighs batch ``b`` by ``n_b / N``; ``"sum"`` means it sums, and every batch
    weighs 1.
    """

    reduction: Reduction = "mean"

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The model output the loss acts on (for example the logits)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not split the forward pass from the loss; the GGN and "
            "Fisher operators need that split: use supervised_loss(criterion), hf_lm_loss(), or a "
            "LossFunction subclass that implements forward() and loss()"
        )

    def loss(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        """Scalar loss of ``output`` on ``batch``."""
        raise NotImplementedError(f"{type(self).__name__}.loss is not implemented")

    def num_samples(self, batch: Any) -> int:
        """Number of samples the batch's loss averages (or sums) over."""
        from torch_linop.data import leading_dim_batch_size

        return leading_dim_batch_size(batch)

    def batch_weight(self, batch: Any) -> float | None:
        """What a ``reduction="mean"`` loss divides by, where that is not the number of samples:
        class-weighted cross-entropy divides by the sum of its targets' class weights, so the
        dataset matrix weighs batch ``b`` by ``W_b / sum W`` (the global weighted mean). None:
        the sample count ``num_samples(batch)``."""
        return None

    def per_sample_losses(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        """Losses of the individual samples, shape ``(num_samples,)``; their mean (or sum, per
        ``reduction``) is ``loss(output, batch)``. Needed by the empirical Fisher."""
        raise NotImplementedError(
            f"{type(self).__name__} has no per-sample losses, which the empirical Fisher needs; "
            "implement per_sample_losses() or use a built-in loss (MSE, cross-entropy, BCE)"
        )

    def output_hessian_vector_product(
        self, output: torch.Tensor, batch: Any, vectors: torch.Tensor
    ) -> torch.Tensor | None:
        """Closed-form Hessian of ``loss`` w.r.t. ``output`` times ``vectors``.

        ``vectors`` has shape ``(k, *output.shape)``. Return ``None`` to let the GGN use autograd.
        """
        return None

    def output_hessian_vector_product_(
        self, output: torch.Tensor, batch: Any, vectors: torch.Tensor
    ) -> torch.Tensor | None:
        """:meth:`output_hessian_vector_product` for a caller that owns ``vectors`` (the GGN's
        own JVPs): a loss may write the result into ``vectors`` and return it, saving one
        output-sized buffer (the logits of a language model). The default does not overwrite."""
        return self.output_hessian_vector_product(output, batch, vectors)

    def sampled_output_hessian_vector_product(
        self,
        output: torch.Tensor,
        batch: Any,
        vectors: torch.Tensor,
        generator: torch.Generator,
        mc_samples: int,
    ) -> torch.Tensor:
        """Monte-Carlo estimate of the output Hessian times ``vectors`` from targets drawn from
        the model's predictive distribution (the MC Fisher). ``vectors``: ``(k, *output.shape)``."""
        raise NotImplementedError(
            f"{type(self).__name__} has no predictive distribution to sample from; the MC Fisher "
            "supports mean-squared error, cross-entropy and binary cross-entropy with logits"
        )

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """``loss_fn(model, batch)``: the scalar loss, as the Hessian needs it."""
        return self.loss(self.forward(model, batch), batch)


class CallableLoss(LossFunction):
    """Wraps a plain ``loss_fn(model, batch) -> scalar``; enough for the Hessian only."""

    def __init__(self, fn: Any, reduction: Reduction = "mean") -> None:
        self.fn = fn
        self.reduction = reduction

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.fn(model, batch)


class SplitLoss(LossFunction):
    """A ``forward_fn(model, batch)`` and a ``loss_of_output_fn(output, batch)`` (the seed library's
    GGN signature). A loss-of-output object with its own ``output_hessian_vector_product`` (such as
    :func:`hf_lm_loss_of_output`) supplies the closed form."""

    def __init__(self, forward_fn: Any, loss_of_output_fn: Any, reduction: Reduction = "mean"):
        self.forward_fn = forward_fn
        self.loss_of_output_fn = loss_of_output_fn
        self.reduction = getattr(loss_of_output_fn, "reduction", reduction)

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.forward_fn(model, batch)

    def loss(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        return self.loss_of_output_fn(output, batch)

    def _delegate(self, name: str) -> Any:
        return getattr(self.loss_of_output_fn, name, None)

    def num_samples(self, batch: Any) -> int:
        method = self._delegate("num_samples")
        return method(batch) if method is not None else super().num_samples(batch)

    def per_sample_losses(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        method = self._delegate("per_sample_losses")
        if method is None:
            return super().per_sample_losses(output, batch)
        return method(output, batch)

    def output_hessian_vector_product(
        self, output: torch.Tensor, batch: Any, vectors: torch.Tensor
    ) -> torch.Tensor | None:
        method = self._delegate("output_hessian_vector_product")
        return None if method is None else method(output, batch, vectors)

    def sampled_output_hessian_vector_product(
        self,
        output: torch.Tensor,
        batch: Any,
        vectors: torch.Tensor,
        generator: torch.Generator,
        mc_samples: int,
    ) -> torch.Tensor:
        method = self._delegate("sampled_output_hessian_vector_product")
        if method is None:
            return super().sampled_output_hessian_vector_product(
                output, batch, vectors, generator, mc_samples
            )
        return method(output, batch, vectors, generator, mc_samples)


def as_loss_function(loss_fn: Any, loss_of_output_fn: Any = None) -> LossFunction:
    """Normalise what users pass as a loss into a :class:`LossFunction`."""
    if loss_of_output_fn is not None:
        if not callable(loss_fn) or not callable(loss_of_output_fn):
            raise TypeError("forward_fn and loss_of_output_fn must both be callables")
        return SplitLoss(loss_fn, loss_of_output_fn)
    if isinstance(loss_fn, LossFunction):
        return loss_fn
    if isinstance(loss_fn, nn.Module) and hasattr(loss_fn, "reduction"):
        raise TypeError(
            f"got the criterion {type(loss_fn).__name__} itself; wrap it so the operator knows how "
            f"to call the model: supervised_loss(nn.{type(loss_fn).__name__}())"
        )
    if callable(loss_fn):
        return CallableLoss(loss_fn)
    raise TypeError(
        f"loss_fn must be a LossFunction (e.g. supervised_loss(F.mse_loss)) or a callable "
        f"(model, batch) -> scalar loss, got {type(loss_fn).__name__}"
    )
