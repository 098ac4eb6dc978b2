"""``supervised_loss(criterion)``: (input, target) batches with a standard or custom criterion."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torch_linop.losses import closed_form
from torch_linop.losses.base import LossFunction, Reduction


@dataclass(frozen=True)
class CriterionKind:
    """What the operators know about a criterion: its family, reduction and ignore_index."""

    family: str  # "mse" | "cross_entropy" | "bce_logits" | "generic"
    reduction: Reduction
    ignore_index: int = -100
    label_smoothing: float = 0.0


def classify_criterion(criterion: Callable[..., torch.Tensor]) -> CriterionKind:
    """Recognise MSE, cross-entropy and BCE-with-logits (function or module, also wrapped in
    ``functools.partial``) for closed forms."""
    keywords: dict[str, Any] = {}
    while isinstance(criterion, functools.partial):  # partial(F.mse_loss, reduction="sum")
        keywords = {**criterion.keywords, **keywords}
        criterion = criterion.func
    reduction = keywords.get("reduction", getattr(criterion, "reduction", "mean"))
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"criterion reduction={reduction!r} is not supported: the loss must be a scalar; "
            "use reduction='mean' or 'sum'"
        )
    if set(keywords) - {"reduction", "ignore_index", "label_smoothing"}:
        return CriterionKind("generic", reduction)  # weights etc.: autograd, not a closed form
    if criterion is F.mse_loss or isinstance(criterion, nn.MSELoss):
        return CriterionKind("mse", reduction)
    if criterion is F.cross_entropy or (
        isinstance(criterion, nn.CrossEntropyLoss) and criterion.weight is None
    ):
        ignore_index = keywords.get("ignore_index", getattr(criterion, "ignore_index", -100))
        smoothing = keywords.get("label_smoothing", getattr(criterion, "label_smoothing", 0.0))
        return CriterionKind("cross_entropy", reduction, ignore_index, smoothing)
    if criterion is F.binary_cross_entropy_with_logits or (
        isinstance(criterion, nn.BCEWithLogitsLoss)
        and criterion.weight is None
        and criterion.pos_weight is None
    ):
        return CriterionKind("bce_logits", reduction)
    return CriterionKind("generic", reduction)


def class_weighting(criterion: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, int] | None:
    """``(class weights, ignore_index)`` of a class-weighted cross-entropy or NLL criterion
    (module, function or ``functools.partial``), else None."""
    keywords: dict[str, Any] = {}
    while isinstance(criterion, functools.partial):
        keywords = {**criterion.keywords, **keywords}
        criterion = criterion.func
    if isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss)):
        weight, ignore_index = criterion.weight, criterion.ignore_index
    elif criterion is F.cross_entropy or criterion is F.nll_loss:
        weight, ignore_index = keywords.get("weight"), keywords.get("ignore_index", -100)
    else:
        return None
    return None if weight is None else (weight, int(ignore_index))


class SupervisedLoss(LossFunction):
    """``criterion(model(inputs), targets)`` on ``(inputs, targets)`` batches.

    ``inputs`` may be a tensor, a tuple (unpacked as positional arguments) or a dict (keyword
    arguments). MSE, cross-entropy (class axis 1, ``ignore_index``, label smoothing) and BCE with
    logits get closed-form output Hessians; other criteria use autograd.
    """

    def __init__(self, criterion: Callable[..., torch.Tensor]) -> None:
        if not callable(criterion):
            raise TypeError(f"criterion must be callable, got {type(criterion).__name__}")
        self.criterion = criterion
        self.kind = classify_criterion(criterion)
        self.reduction = self.kind.reduction
        self.class_weighting = class_weighting(criterion)

    @staticmethod
    def _split(batch: Any) -> tuple[Any, torch.Tensor]:
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[0], batch[1]
        raise ValueError(
            f"supervised_loss expects (inputs, targets) batches, got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + "; for other batch layouts subclass torch_linop.LossFunction"
        )

    def forward(self, model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, _ = self._split(batch)
        if isinstance(inputs, Mapping):
            return model(**inputs)
        if isinstance(inputs, tuple):
            return model(*inputs)
        return model(inputs)

    def loss(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        targets = self._split(batch)[1]
        self._check_elementwise_shapes(output, targets)
        if self.kind.family == "mse" and self.reduction == "mean":
            # the same number, but F.mse_loss(reduction="mean") breaks forward-over-reverse AD
            # (PyTorch issue #123996: "ZeroTensors are immutable"), which method="forward" needs
            count = torch.broadcast_shapes(output.shape, targets.shape).numel()
            return F.mse_loss(output, targets, reduction="sum") / count
        return self.criterion(output, targets)

    def _check_elementwise_shapes(self, output: torch.Tensor, targets: Any) -> None:
        """MSE and BCE compare output and target elementwise: a (N, 1) output against (N,)
        targets would broadcast to (N, N) pairs and silently give another loss."""
        if self.kind.family not in ("mse", "bce_logits") or not isinstance(targets, torch.Tensor):
            return
        if output.shape != targets.shape:
            raise ValueError(
                f"the model output has shape {tuple(output.shape)} but the targets "
                f"{tuple(targets.shape)}; {self.kind.family} compares them elementwise (PyTorch "
                "would broadcast them into a different loss). Give the targets the output's "
                "shape, e.g. y.view_as(output) or y.unsqueeze(-1) for one output per sample"
            )

    def _valid_targets(self, targets: torch.Tensor) -> torch.Tensor | None:
        if self.kind.family != "cross_entropy" or targets.is_floating_point():
            return None
        return targets != self.kind.ignore_index

    def num_samples(self, batch: Any) -> int:
        targets = self._split(batch)[1]
        if self.kind.family == "cross_entropy":
            valid = self._valid_targets(targets)
            if valid is not None:
                return int(valid.sum())
            return int(targets.numel() // targets.shape[1]) if targets.dim() > 1 else 1
        if self.kind.family == "bce_logits":
            return int(targets.numel())
        return int(targets.shape[0]) if targets.dim() > 0 else 1

    def batch_weight(self, batch: Any) -> float | None:
        """Class-weighted cross-entropy/NLL with class-index targets: the sum of the targets'
        class weights (ignored targets excluded), which its mean divides by. Probability
        targets and unweighted criteria: None (the sample count)."""
        targets = self._split(batch)[1]
        if self.class_weighting is None or not isinstance(targets, torch.Tensor):
            return None
        if targets.is_floating_point():  # torch divides by the number of rows here
            return None
        weight, ignore_index = self.class_weighting
        valid = targets[targets != ignore_index]
        return float(weight.to(valid.device)[valid].sum())

    def _scale(self, output: torch.Tensor, batch: Any) -> float:
        """1 / (number of elements the mean runs over) for a mean reduction, else 1."""
        if self.reduction == "sum":
            return 1.0
        if self.kind.family == "mse":
            return 1.0 / output.numel()
        return 1.0 / max(self.num_samples(batch), 1)

    def per_sample_losses(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        targets = self._split(batch)[1]
        self._check_elementwise_shapes(output, targets)
        family = self.kind.family
        if family == "cross_entropy":
            losses = F.cross_entropy(
                output,
                targets,
                reduction="none",
                ignore_index=self.kind.ignore_index,
                label_smoothing=self.kind.label_smoothing,
            ).reshape(-1)
            valid = self._valid_targets(targets)
            return losses[valid.reshape(-1)] if valid is not None else losses
        if family == "bce_logits":
            return F.binary_cross_entropy_with_logits(output, targets, reduction="none").reshape(-1)
        if family == "mse":
            elementwise = F.mse_loss(output, targets, reduction="none")
        else:
            elementwise = self._unreduced_losses(output, targets)
        if elementwise.dim() == 0:
            return elementwise.reshape(1)
        per_sample = elementwise.reshape(elementwise.shape[0], -1)
        return per_sample.mean(1) if self.reduction == "mean" else per_sample.sum(1)

    def _unreduced_losses(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Elementwise losses of a criterion without a closed form: a torch loss module is
        called as a copy with ``reduction="none"`` (its weights, ``pos_weight`` etc. kept), a
        function with ``reduction="none"``."""
        if self.class_weighting is not None:
            raise NotImplementedError(
                "the empirical Fisher of a class-weighted criterion (weight=...) is not "
                "supported: its mean divides by the targets' total class weight, so samples are "
                "not equally weighted. Use the GGN or the Hessian (both support class weights), "
                "or the criterion without weight="
            )
        criterion = self.criterion
        if isinstance(criterion, nn.Module) and isinstance(
            getattr(criterion, "reduction", None), str
        ):
            unreduced = copy.copy(criterion)  # shares the module's buffers (pos_weight, weight)
            object.__setattr__(unreduced, "reduction", "none")
            return unreduced(output, targets)
        try:
            return criterion(output, targets, reduction="none")
        except TypeError as error:
            raise NotImplementedError(
                "the empirical Fisher needs per-sample losses; this criterion does not accept "
                "reduction='none'. Subclass LossFunction and implement per_sample_losses()"
            ) from error

    def _rows(self, output: torch.Tensor, vectors: torch.Tensor, batch: Any):
        """Logits and vectors with the class axis last, and the valid-row mask."""
        targets = self._split(batch)[1]
        if output.dim() == 1:  # unbatched (C,) input
            return output, vectors, self._valid_targets(targets)
        logits = output.movedim(1, -1)
        moved = vectors.movedim(2, -1)
        return logits, moved, self._valid_targets(targets)

    def output_hessian_vector_product(
        self, output: torch.Tensor, batch: Any, vectors: torch.Tensor
    ) -> torch.Tensor | None:
        family = self.kind.family
        self._check_elementwise_shapes(output, self._split(batch)[1])
        scale = self._scale(output, batch)
        if family == "mse":
            return closed_form.mse_hvp(vectors, scale)
        if family == "bce_logits":
            return closed_form.bce_logits_hvp(output, vectors, scale)
        if family == "cross_entropy":
            logits, moved, valid = self._rows(output, vectors, batch)
            result = closed_form.softmax_ce_rows_hvp(logits, moved, valid, scale)
            result = self._times_target_mass(result, batch)
            return result.movedim(-1, 2) if output.dim() > 1 else result
        return None

    def _target_mass(self, batch: Any) -> torch.Tensor | None:
        """Per-row total target probability of cross-entropy with probability targets, class
        axis dropped (None for class-index targets, whose mass is 1).

        The output Hessian of ``-sum_c q_c log softmax(z)_c`` is ``(sum_c q_c)(diag p - p p^T)``:
        rows that do not sum to 1 (unnormalised or partial soft labels) scale it. Label smoothing
        mixes in ``eps / C`` per class, giving mass ``(1 - eps) sum q + eps``."""
        targets = self._split(batch)[1]
        if not (isinstance(targets, torch.Tensor) and targets.is_floating_point()):
            return None
        mass = targets.sum(dim=1 if targets.dim() > 1 else 0)
        smoothing = self.kind.label_smoothing
        return mass * (1.0 - smoothing) + smoothing if smoothing else mass

    def _times_target_mass(self, rows: torch.Tensor, batch: Any) -> torch.Tensor:
        """``rows`` (``(k, ..., C)``, class axis last) times each row's target mass."""
        mass = self._target_mass(batch)
        if mass is None:
            return rows
        return rows * mass.to(rows.dtype).unsqueeze(-1)

    def sampled_output_hessian_vector_product(
        self,
        output: torch.Tensor,
        batch: Any,
        vectors: torch.Tensor,
        generator: torch.Generator,
        mc_samples: int,
    ) -> torch.Tensor:
        family = self.kind.family
        scale = self._scale(output, batch)
        if family == "mse":
            return closed_form.mse_sampled_hvp(output, vectors, scale, generator, mc_samples)
        if family == "bce_logits":
            return closed_form.bce_logits_sampled_hvp(output, vectors, scale, generator, mc_samples)
        if family == "cross_entropy":
            logits, moved, valid = self._rows(output, vectors, batch)
            result = closed_form.softmax_ce_rows_sampled_hvp(
                logits, moved, valid, scale, generator, mc_samples
            )
            result = self._times_target_mass(result, batch)
            return result.movedim(-1, 2) if output.dim() > 1 else result
        return super().sampled_output_hessian_vector_product(
            output, batch, vectors, generator, mc_samples
        )


def supervised_loss(criterion: Callable[..., torch.Tensor]) -> SupervisedLoss:
    """Loss for ``(inputs, targets)`` batches: ``criterion(model(inputs), targets)``.

    Example: ``HessianOperator(model, data, supervised_loss(F.mse_loss))``.
    """
    return SupervisedLoss(criterion)


def supervised_forward(model: nn.Module, batch: Any) -> torch.Tensor:
    """Seed-compatible ``forward_fn``: ``model(inputs)`` of an ``(inputs, targets)`` batch."""
    return SupervisedLoss(F.mse_loss).forward(model, batch)


class _SupervisedLossOfOutput(SupervisedLoss):
    """``loss_of_output_fn(output, batch)`` form of :class:`SupervisedLoss`."""

    def __call__(self, output: torch.Tensor, batch: Any) -> torch.Tensor:  # type: ignore[override]
        return self.loss(output, batch)


def supervised_loss_of_output(criterion: Callable[..., torch.Tensor]) -> SupervisedLoss:
    """Seed-compatible ``loss_of_output_fn``; it also carries the closed-form output Hessian."""
    return _SupervisedLossOfOutput(criterion)
