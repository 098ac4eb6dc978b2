"""Brief training before the analysis, so the curvature is that of a fitted model, not of its
random initialisation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from torch_linop.data import move_to_device


def train(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: Any,
    *,
    steps: int,
    learning_rate: float,
    progress: bool,
) -> list[float]:
    """``steps`` Adam steps cycling over ``data``; returns the loss of every step.

    The model is left in eval mode (dropout off), as the curvature operators expect.
    """
    losses: list[float] = []
    if steps == 0:
        model.eval()
        return losses
    from tqdm.auto import tqdm

    parameters = [param for param in model.parameters() if param.requires_grad]
    device = parameters[0].device
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    model.train()
    bar = tqdm(range(steps), desc="training", unit="step", disable=not progress, leave=False)
    batches = _cycle(data)
    for _ in bar:
        batch = move_to_device(next(batches), device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    model.eval()
    return losses


def _cycle(data: Iterable[Any]) -> Iterator[Any]:
    """The batches over and over (a DataLoader is re-iterated, not cached)."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("cannot train on data without batches")
