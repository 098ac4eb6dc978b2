"""``CriterionLoss``: curvlinops' ``(model_func, loss_func)`` pair as one of our loss objects.

curvlinops calls ``loss_func(model_func(X), y)`` on ``(X, y)`` batches and weighs batch ``b`` by
``batch_size_fn(X) / N`` (``reduction="mean"``) or 1 (``"sum"``), where ``batch_size_fn``
defaults to ``X.shape[0]``. Its empirical Fisher flattens the output into rows (cross-entropy:
``(batch, C, ...) -> (batch*..., C)``, others: ``(batch, ..., C) -> (batch*..., C)``), takes the
gradient of the criterion per row without its mean factor, and divides the sum of their outer
products by the number of rows (cross-entropy) or of output entries (MSE, BCE). This module
reproduces those conventions on top of :class:`~torch_linop.losses.LossFunction`; the closed-form
output Hessians and their Monte-Carlo versions come from :class:`SupervisedLoss`.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from torch_linop.losses import closed_form
from torch_linop.losses.base import LossFunction, Reduction
from torch_linop.losses.supervised import SupervisedLoss

SUPPORTED_CRITERIA = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)

BatchSizeFn = Callable[[Any], int]


def _check_reduction(criterion: Any) -> Reduction:
    reduction = getattr(criterion, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"loss_func must have reduction 'mean' or 'sum', got {reduction!r} on "
            f"{type(criterion).__name__}; e.g. nn.CrossEntropyLoss(reduction='mean')"
        )
    return cast(Reduction, reduction)


class CriterionLoss(LossFunction):
    """``loss_func(model_func(X), y)`` with curvlinops' batch weights and EF normalisation.

    ``criterion=None`` (Jacobians) gives a loss-free object that only counts samples.
    """

    def __init__(self, criterion: Any, batch_size_fn: BatchSizeFn | None = None) -> None:
        self.criterion = criterion
        self.batch_size_fn = batch_size_fn
        if criterion is None:
            self.reduction = "sum"
            self._closed_form: SupervisedLoss | None = None
            return
        if not callable(criterion):
            raise TypeError(
                f"loss_func must be a criterion module such as nn.MSELoss(), got "
                f"{type(criterion).__name__}"
            )
        self.reduction = _check_reduction(criterion)
        self._closed_form = SupervisedLoss(criterion)

    # ---------------------------------------------------------------- forward and loss
    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return model(batch[0])

    def loss(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        if self.criterion is None:
            raise ValueError("this operator has no loss function (a Jacobian)")
        return self.criterion(output, batch[1])

    def num_samples(self, batch: Any) -> int:
        inputs = batch[0]
        if self.batch_size_fn is not None:
            return int(self.batch_size_fn(inputs))
        if isinstance(inputs, MutableMapping):
            raise ValueError("When using dict-like custom data, `batch_size_fn` is required.")
        return int(inputs.shape[0])

    def batch_factor(self, batch: Any, num_data: int) -> float:
        """curvlinops' per-batch normalisation factor: ``n_b / N`` for a mean, 1 for a sum."""
        return 1.0 if self.reduction == "sum" else self.num_samples(batch) / num_data

    # ---------------------------------------------------------------- GGN and MC Fisher
    def _supervised(self) -> SupervisedLoss:
        if self._closed_form is None:
            raise ValueError("this operator has no loss function (a Jacobian)")
        return self._closed_form

    def output_hessian_vector_product(
        self, output: torch.Tensor, batch: Any, vectors: torch.Tensor
    ) -> torch.Tensor | None:
        return self._supervised().output_hessian_vector_product(output, batch, vectors)

    def sampled_output_hessian_vector_product(
        self,
        output: torch.Tensor,
        batch: Any,
        vectors: torch.Tensor,
        generator: torch.Generator,
        mc_samples: int,
    ) -> torch.Tensor:
        criterion = require_supported(self.criterion, "the Monte-Carlo Fisher")
        if isinstance(criterion, nn.MSELoss) and output.dim() > 2:
            # curvlinops draws one Gaussian per output row (batch, ..., C) -> (batch*..., C)
            columns = output.shape[-1]
            scale = 1.0 / output.numel() if self.reduction == "mean" else 1.0
            rows = closed_form.mse_sampled_hvp(
                output.reshape(-1, columns),
                vectors.reshape(vectors.shape[0], -1, columns),
                scale,
                generator,
                mc_samples,
            )
            return rows.reshape(vectors.shape)
        return self._supervised().sampled_output_hessian_vector_product(
            output, batch, vectors, generator, mc_samples
        )

    # ---------------------------------------------------------------- empirical Fisher
    def per_sample_losses(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        """Unreduced loss of every output row (curvlinops' flattening): its gradient is the
        row gradient curvlinops' empirical Fisher takes outer products of."""
        criterion = require_supported(self.criterion, "the empirical Fisher")
        targets = batch[1]
        if isinstance(criterion, nn.CrossEntropyLoss):
            elementwise = F.cross_entropy(
                output,
                targets,
                weight=criterion.weight,
                ignore_index=criterion.ignore_index,
                label_smoothing=criterion.label_smoothing,
                reduction="none",
            )
            return elementwise.reshape(-1)
        if isinstance(criterion, nn.MSELoss):
            elementwise = F.mse_loss(output, targets, reduction="none")
        else:
            elementwise = F.binary_cross_entropy_with_logits(
                output,
                targets,
                weight=cast(torch.Tensor | None, criterion.weight),
                pos_weight=cast(torch.Tensor | None, criterion.pos_weight),
                reduction="none",
            )
        columns = elementwise.shape[-1] if elementwise.dim() > 1 else 1
        return elementwise.reshape(-1, columns).sum(dim=1)

    def ef_scale(self, batch: Any, num_rows: int) -> float:
        """Factor on ``sum_rows g g^T`` that gives curvlinops' per-batch empirical Fisher.

        curvlinops scales each row gradient by ``R * kappa`` (``R`` = rows for cross-entropy,
        output entries otherwise; ``kappa`` = the criterion's mean factor) and divides the sum
        of outer products by ``R``: the factor is ``R * kappa**2`` (1 for a sum).
        """
        if self.reduction == "sum":
            return 1.0
        criterion = self.criterion
        targets = batch[1]
        if not isinstance(criterion, nn.CrossEntropyLoss):
            return 1.0 / targets.numel()  # R = kappa^-1 = number of output entries
        if targets.is_floating_point():  # class probabilities: mean over rows
            return 1.0 / num_rows
        valid = targets != criterion.ignore_index
        if criterion.weight is None:
            total_weight = float(valid.sum())
        else:
            total_weight = float(criterion.weight[targets[valid]].sum())
        if total_weight == 0.0:
            return 0.0
        return num_rows / total_weight**2


def require_supported(criterion: Any, what: str) -> nn.Module:
    """curvlinops supports only MSE, cross-entropy and BCE-with-logits for EF and MC Fisher."""
    if not isinstance(criterion, SUPPORTED_CRITERIA):
        raise NotImplementedError(
            f"{what} supports loss_func in {[c.__name__ for c in SUPPORTED_CRITERIA]}, got "
            f"{type(criterion).__name__}; use GGNLinearOperator or HessianLinearOperator instead"
        )
    return criterion
