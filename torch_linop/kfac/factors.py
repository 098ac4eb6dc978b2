"""KFAC's Kronecker factors from one hooked pass (curvlinops 3's scaling).

Input factor ``A`` of a layer: ``(1 / (N S)) sum_{n,s} a a^T`` for KFAC-expand (``S`` shared
positions), ``(1 / N) sum_n abar abar^T`` with ``abar`` the mean over positions for KFAC-reduce;
with a joined bias, ``a`` gets a trailing 1. Gradient factor ``G``: ``sum_{n,s} g g^T`` (expand)
or ``sum_n (sum_s g)(sum_s g)^T`` (reduce) over all backward signals, whose row weights already
carry the loss reduction; the identity for the forward-only Fisher.
"""

from __future__ import annotations

import torch

from torch_linop.kfac.layers import KFACLayer
from torch_linop.kfac.types import KFACType


def with_bias_column(inputs: torch.Tensor) -> torch.Tensor:
    """``inputs`` with a trailing column of ones (joined weight and bias)."""
    return torch.cat([inputs, inputs.new_ones(*inputs.shape[:-1], 1)], dim=-1)


class FactorAccumulator:
    """Visitors for :func:`torch_linop.kfac.passes.hooked_pass` that sum the factors."""

    def __init__(self, approx: KFACType, separate_weight_and_bias: bool, num_data: int) -> None:
        self.approx = approx
        self.separate_weight_and_bias = separate_weight_and_bias
        self.num_data = num_data
        self.input_covariances: dict[str, torch.Tensor] = {}
        self.gradient_covariances: dict[str, torch.Tensor] = {}

    def joins_bias(self, layer: KFACLayer) -> bool:
        """Weight and bias form one ``[W | b]`` block with an augmented input factor."""
        return (
            not self.separate_weight_and_bias
            and layer.weight_index is not None
            and layer.bias_index is not None
        )

    def on_inputs(self, layer: KFACLayer, inputs: torch.Tensor) -> None:
        if layer.weight_index is None:
            return
        if self.approx == KFACType.EXPAND:
            scale = self.num_data * inputs.shape[1]
            rows = inputs.reshape(-1, inputs.shape[-1])
        else:
            scale = self.num_data
            rows = inputs.mean(1)
        if self.joins_bias(layer):
            rows = with_bias_column(rows)
        _add(self.input_covariances, layer.name, rows.T @ rows / scale)

    def on_gradients(self, layer: KFACLayer, inputs: torch.Tensor, gradients: torch.Tensor) -> None:
        if self.approx == KFACType.EXPAND:
            rows = gradients.reshape(-1, gradients.shape[-1])
        else:
            rows = gradients.sum(1)
        _add(self.gradient_covariances, layer.name, rows.T @ rows)


def _add(store: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    if key in store:
        store[key] += value
    else:
        store[key] = value
