"""Losses that drive every curvature operator (see :class:`LossFunction`)."""

from torch_linop.losses.base import CallableLoss, LossFunction, SplitLoss, as_loss_function
from torch_linop.losses.supervised import (
    SupervisedLoss,
    supervised_forward,
    supervised_loss,
    supervised_loss_of_output,
)

__all__ = [
    "CallableLoss",
    "LossFunction",
    "SplitLoss",
    "SupervisedLoss",
    "as_loss_function",
    "supervised_forward",
    "supervised_loss",
    "supervised_loss_of_output",
]
