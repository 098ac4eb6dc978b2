"""What one run analyses: a model, its data, its loss, and how to describe them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torch_linop.cli.errors import UsageError


@dataclass
class Workload:
    """A model with a list of batches and a loss, plus the words the report uses for them.

    ``default_train_steps`` is how long the job trains when ``--train-steps`` is not given;
    ``evaluate`` (optional) returns a one-line summary such as accuracies after training.
    """

    model: nn.Module
    data: Iterable[Any]
    loss: Any
    model_name: str
    data_name: str
    sample_name: str = "samples"  # what the loss averages over, e.g. "target tokens"
    default_train_steps: int = 0
    learning_rate: float = 1e-2
    evaluate: Callable[[], str] | None = field(default=None, repr=False)


def resolve_device(text: str) -> torch.device:
    """``auto`` means CUDA when available, else the CPU; anything else must exist here."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as error:
        raise UsageError(
            f"--device {text!r} is not a torch device ({error}); use cpu or cuda[:N]"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
    return device


def cast_floating(batch: Any, dtype: torch.dtype) -> Any:
    """``batch`` with its floating-point tensors cast to ``dtype`` (integer labels untouched)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {key: cast_floating(value, dtype) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(cast_floating(value, dtype) for value in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(cast_floating(value, dtype) for value in batch)
    return batch


def count_parameters(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters() if param.requires_grad)
