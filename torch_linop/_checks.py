"""Checks on what user code returns inside a product (losses, outputs)."""

from __future__ import annotations

import torch


def check_loss(loss: object, where: str = "loss_fn", *, finite: bool = True) -> torch.Tensor:
    """A scalar, finite, floating loss tensor, or a clear error (``finite=False`` skips the value
    check, which cannot run inside ``vmap``)."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{where} must return a torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"{where} must return a scalar loss, got shape {tuple(loss.shape)}; reduce it with "
            ".mean() or .sum() (or use reduction='mean')"
        )
    if not loss.is_floating_point():
        raise TypeError(f"{where} returned a {loss.dtype} tensor; the loss must be floating point")
    if finite and not bool(torch.isfinite(loss)):
        raise ValueError(
            f"{where} returned a non-finite loss ({loss.item()}); check the data for NaN/Inf and "
            "the model for overflow (for half precision, try float32)"
        )
    return loss.reshape(())
