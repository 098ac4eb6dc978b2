"""What KFAC backpropagates: the output-gradient "signals" of each Fisher type.

The loss is one of MSE, cross-entropy or BCE-with-logits, seen as a sum over *rows* (one row =
one sample, or one sequence position / pixel of a sample) of a per-row negative log-likelihood.
Every row carries the weight the exact operators give it: ``1 / (rows in the data set)`` for a
mean reduction, 1 for a sum; MSE and BCE with a mean reduction also average over the row's
``C`` outputs (a factor ``1 / C``). A signal is a ``(rows, C)`` tensor; the gradient factor is
the sum over signals of ``g g^T`` where ``g`` is the signal backpropagated to a layer's output:

- type-2: column ``c`` of each row's output-Hessian square root ``S`` (``S S^T = H``);
- MC: the gradient of the row loss at labels drawn from the model's predictive distribution,
  ``1/sqrt(mc_samples)``-scaled (draws as curvlinops makes them, from one seeded generator);
- empirical: the gradient at the true labels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torch_linop.kfac.types import FisherType


@dataclass(frozen=True)
class KFACLoss:
    """The loss KFAC approximates the curvature of.

    ``family``: ``"mse"``, ``"cross_entropy"`` or ``"bce_logits"``; ``class_dim``: the logits'
    class axis for cross-entropy (1 as in ``F.cross_entropy``; -1 for sequence logits
    ``(batch, seq, C)``); ``ignore_index``: cross-entropy targets to leave out.
    """

    family: str
    reduction: str = "mean"
    ignore_index: int = -100
    class_dim: int = 1

    def __post_init__(self) -> None:
        if self.family not in ("mse", "cross_entropy", "bce_logits"):
            raise ValueError(
                f"KFAC supports the losses 'mse', 'cross_entropy' and 'bce_logits', got "
                f"{self.family!r}"
            )
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {self.reduction!r}")

    # ------------------------------------------------------------------ rows
    def rows(self, output: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``(rows, C)`` view of the output (differentiable) and the targets per row."""
        if output.dim() < 2:
            raise ValueError(
                f"KFAC needs a batched output of at least 2 dimensions (batch, C), got shape "
                f"{tuple(output.shape)}; reshape the output to (batch, 1) for one output per sample"
            )
        if self.family == "cross_entropy":
            logits = output.movedim(self.class_dim, -1)
            return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        if targets.shape != output.shape:
            raise ValueError(
                f"the model output has shape {tuple(output.shape)} but the targets "
                f"{tuple(targets.shape)}; {self.family} compares them elementwise"
            )
        return output.reshape(-1, output.shape[-1]), targets.reshape(-1, targets.shape[-1])

    def num_rows(self, targets: torch.Tensor) -> int:
        """Rows of a batch that carry a loss (cross-entropy: targets not ``ignore_index``)."""
        if self.family == "cross_entropy":
            return int((targets != self.ignore_index).sum())
        return int(targets.shape[:-1].numel())

    def row_weights(self, targets_rows: torch.Tensor, num_rows_total: int, like: torch.Tensor):
        """Weight of each row's loss in the data-set loss (0 for ignored rows), ``(rows,)``."""
        weight = 1.0 / num_rows_total if self.reduction == "mean" else 1.0
        weights = torch.full((targets_rows.shape[0],), weight, dtype=like.dtype, device=like.device)
        if self.family == "cross_entropy":
            weights = weights * (targets_rows != self.ignore_index).to(like.dtype)
        return weights

    def output_scale(self, num_outputs: int) -> float:
        """The ``1 / C`` of MSE and BCE averaging over a row's outputs (mean reduction)."""
        if self.family in ("mse", "bce_logits") and self.reduction == "mean":
            return 1.0 / num_outputs
        return 1.0

    # ------------------------------------------------------------------ per-row quantities
    def hessian_sqrt(self, logits: torch.Tensor) -> torch.Tensor:
        """Per row ``S`` with ``S S^T`` the unit-weight row loss Hessian, ``(rows, C, C)``."""
        rows, classes = logits.shape
        if self.family == "mse":
            eye = torch.eye(classes, dtype=logits.dtype, device=logits.device)
            return eye.expand(rows, classes, classes) * math.sqrt(2.0)
        if self.family == "bce_logits":
            probs = logits.sigmoid()
            return torch.diag_embed((probs * (1 - probs)).sqrt())
        probs = logits.softmax(-1)
        sqrt_probs = probs.sqrt()
        return torch.diag_embed(sqrt_probs) - probs.unsqueeze(-1) * sqrt_probs.unsqueeze(-2)

    def sample_labels(self, logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Labels drawn from the predictive distribution (curvlinops' draws, in its order)."""
        if self.family == "mse":
            noise = torch.randn(
                logits.shape, device=logits.device, dtype=logits.dtype, generator=generator
            )
            return logits + math.sqrt(0.5) * noise
        if self.family == "bce_logits":
            return logits.sigmoid().bernoulli(generator=generator)
        return logits.softmax(1).multinomial(num_samples=1, generator=generator).squeeze(-1)

    def row_gradients(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Gradient of the unit-weight row loss w.r.t. the logits, ``(rows, C)``."""
        if self.family == "mse":
            return 2.0 * (logits - labels)
        if self.family == "bce_logits":
            return logits.sigmoid() - labels
        safe = labels.clamp(min=0, max=logits.shape[-1] - 1)  # ignored rows get weight 0
        return logits.softmax(-1) - F.one_hot(safe, logits.shape[-1]).to(logits.dtype)

    # ------------------------------------------------------------------ signals
    def signals(
        self,
        logits: torch.Tensor,
        targets_rows: torch.Tensor,
        num_rows_total: int,
        fisher_type: FisherType,
        mc_samples: int,
        generator: torch.Generator,
    ) -> Iterator[torch.Tensor]:
        """The ``(rows, C)`` signals to backpropagate for one batch (see the module doc)."""
        logits = logits.detach()
        weights = self.row_weights(targets_rows, num_rows_total, logits)
        weights = weights * self.output_scale(logits.shape[-1])
        sqrt_weights = weights.sqrt().unsqueeze(-1)
        if fisher_type == FisherType.TYPE2:
            roots = self.hessian_sqrt(logits)
            for column in range(roots.shape[-1]):
                yield roots[:, :, column] * sqrt_weights
        elif fisher_type == FisherType.MC:
            for _ in range(mc_samples):
                labels = self.sample_labels(logits, generator)
                yield self.row_gradients(logits, labels) * (sqrt_weights / math.sqrt(mc_samples))
        elif fisher_type == FisherType.EMPIRICAL:
            yield self.row_gradients(logits, targets_rows) * sqrt_weights
        else:
            raise ValueError(f"{fisher_type} has no backward signals")


def kfac_loss_of(loss: Any, class_dim: int = 1) -> KFACLoss:
    """Recognise a loss: an ``nn.MSELoss``/``CrossEntropyLoss``/``BCEWithLogitsLoss`` module,
    the matching ``torch.nn.functional`` function (also in ``functools.partial``), a
    ``supervised_loss(...)`` of one of them, or a :class:`KFACLoss` itself."""
    if isinstance(loss, KFACLoss):
        return loss
    from torch_linop.losses.supervised import SupervisedLoss, classify_criterion

    criterion: Callable[..., torch.Tensor] = (
        loss.criterion if isinstance(loss, SupervisedLoss) else loss
    )
    if not callable(criterion):
        raise TypeError(f"loss must be a criterion or supervised_loss(...), got {loss!r}")
    base = criterion
    while isinstance(base, functools.partial):
        base = base.func
    if isinstance(base, nn.CrossEntropyLoss) and base.weight is not None:
        raise ValueError("KFAC does not support class weights in CrossEntropyLoss")
    kind = classify_criterion(criterion)
    if kind.family == "generic":
        raise ValueError(
            f"KFAC needs one of MSE, cross-entropy or BCE-with-logits as the loss, got {loss!r}"
            " (without class weights, pos_weight or other options)"
        )
    if kind.label_smoothing:
        raise ValueError("KFAC does not support label smoothing; use label_smoothing=0")
    return KFACLoss(kind.family, kind.reduction, kind.ignore_index, class_dim)
