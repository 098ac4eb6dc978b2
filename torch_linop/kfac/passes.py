"""One pass over the data with forward and backward hooks: what KFAC and EKFAC accumulate.

A forward hook on each covered layer hands its input to ``on_inputs`` and registers a tensor hook
on its output; every backpropagated signal then hands (input, output gradient) to
``on_gradients``. No per-sample gradient is formed (EKFAC's visitor forms per-*example* ones for
its correction). Hooks are removed and the parameters' ``requires_grad`` flags restored even
when the pass raises; the model's mode and buffers are never changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torch_linop.data import move_to_device
from torch_linop.kfac.layers import KFACLayer, layer_inputs, layer_output_gradients
from torch_linop.kfac.signals import KFACLoss
from torch_linop.kfac.types import FisherType

InputsVisitor = Callable[[KFACLayer, torch.Tensor], None]
GradientsVisitor = Callable[[KFACLayer, torch.Tensor, torch.Tensor], None]


@dataclass
class DataSpec:
    """How to walk the data: (inputs, targets) batches, the forward call, the batch size."""

    batches: Iterable[Any]
    forward: Callable[[nn.Module, Any], torch.Tensor]
    batch_size: Callable[[Any], int]
    device: torch.device

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        for batch in self.batches:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(
                    f"KFAC expects (inputs, targets) batches, got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                )
            inputs, targets = batch
            yield move_to_device(inputs, self.device), move_to_device(targets, self.device)


def default_forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    """``model(inputs)``; a dict is passed as keyword arguments, a tuple as positional ones."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


@contextlib.contextmanager
def _gradients_enabled(params: list[torch.Tensor]) -> Iterator[None]:
    """Make the selected parameters require grad for the pass; restore the flags after."""
    flags = [param.requires_grad for param in params]
    try:
        for param in params:
            param.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for param, flag in zip(params, flags):
            param.requires_grad_(flag)


def count_data(data: DataSpec, loss: KFACLoss) -> tuple[int, int]:
    """(samples, loss rows) of the batches, from one walk over them (no forward)."""
    num_samples = num_rows = 0
    for inputs, targets in data:
        num_samples += data.batch_size(inputs)
        num_rows += loss.num_rows(targets)
    return num_samples, num_rows


def hooked_pass(
    model: nn.Module,
    layers: list[KFACLayer],
    params: list[torch.Tensor],
    data: DataSpec,
    loss: KFACLoss,
    fisher_type: FisherType,
    mc_samples: int,
    seed: int,
    num_rows_total: int,
    on_inputs: InputsVisitor | None,
    on_gradients: GradientsVisitor | None,
) -> None:
    """Walk the data once; call the visitors with ``(batch, shared, dim)`` tensors."""
    backward = on_gradients is not None and fisher_type != FisherType.FORWARD_ONLY
    generator = torch.Generator(device=data.device)
    generator.manual_seed(seed)
    handles: list[Any] = []

    def forward_hook(layer: KFACLayer, module: nn.Module, args: Any, output: Any) -> None:
        if len(args) != 1 or not isinstance(output, torch.Tensor):
            raise ValueError(
                f"layer '{layer.name}' was called with {len(args)} inputs; KFAC needs one input "
                "tensor and one output tensor per call"
            )
        inputs = layer_inputs(module, args[0].detach())
        if on_inputs is not None:
            on_inputs(layer, inputs)
        if backward and output.requires_grad:

            def tensor_hook(gradient: torch.Tensor) -> None:
                gradients = layer_output_gradients(module, gradient.detach())
                on_gradients(layer, inputs, gradients)  # type: ignore[misc]

            output.register_hook(tensor_hook)

    try:
        for layer in layers:
            hook = _bind(forward_hook, layer)
            handles.append(layer.module.register_forward_hook(hook))
        with _gradients_enabled(params if backward else []):
            for inputs, targets in data:
                with torch.set_grad_enabled(backward):
                    output = data.forward(model, inputs)
                if not backward:
                    continue
                logits, targets_rows = loss.rows(output, targets)
                signals = list(
                    loss.signals(
                        logits, targets_rows, num_rows_total, fisher_type, mc_samples, generator
                    )
                )
                for index, signal in enumerate(signals):
                    torch.autograd.grad(
                        logits,
                        params,
                        grad_outputs=signal,
                        retain_graph=index < len(signals) - 1,
                        allow_unused=True,
                    )
    finally:
        for handle in handles:
            handle.remove()


def _bind(hook: Callable[..., None], layer: KFACLayer) -> Callable[..., None]:
    def bound(module: nn.Module, args: Any, output: Any) -> None:
        hook(layer, module, args, output)

    return bound
