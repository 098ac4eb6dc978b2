"""Which layers KFAC covers, and their inputs and output gradients as ``(batch, shared, dim)``.

A layer is covered when its weight acts linearly on (patches of) its input: ``nn.Linear`` (any
number of leading dimensions after the batch, each a weight-shared position), Hugging Face's
``Conv1D`` (GPT-2's linear layer, weight stored transposed as ``(in, out)``) and ``nn.Conv2d``
(each output location a weight-shared position; the input as unfolded patches, averaged over
channel groups as curvlinops does). Any other layer holding a selected parameter is refused by
name, or left out of the operator when the caller asks for that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
SUPPORTED_NAMES = "nn.Linear, nn.Conv2d, transformers' Conv1D"


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (``y = x @ W + b``, ``W`` of shape ``(in, out)``), recognised
    without importing transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED_LAYERS) or is_hf_conv1d(module)


@dataclass(frozen=True)
class KFACLayer:
    """One covered layer: its name, the module, and where its weight and bias sit among the
    operator's parameters (``None`` where that parameter is not selected)."""

    name: str
    module: nn.Module
    weight_index: int | None
    bias_index: int | None

    @property
    def weight_transposed(self) -> bool:
        """The parameter holds ``W^T`` (``(in, out)``, Hugging Face's Conv1D)."""
        return is_hf_conv1d(self.module)

    @property
    def out_features(self) -> int:
        """Rows of the weight (output features / channels): the gradient factor's size."""
        weight = self.module.weight  # type: ignore[union-attr]
        return int(weight.shape[1 if self.weight_transposed else 0])  # type: ignore[index]

    @property
    def in_features(self) -> int:
        """Columns of the weight flattened to a matrix (input features, or channels x kernel)."""
        weight = self.module.weight  # type: ignore[union-attr]
        if self.weight_transposed:
            return int(weight.shape[0])  # type: ignore[index]
        return int(weight[0].numel())  # type: ignore[index]


def find_layers(
    model: nn.Module, params: Sequence[torch.Tensor], names: Sequence[str], skip_unsupported: bool
) -> tuple[list[KFACLayer], list[int]]:
    """The covered layers of ``params`` and the indices of the parameters kept.

    Raises ValueError naming the first parameter that lives in an unsupported layer (or in no
    layer) unless ``skip_unsupported``, in which case such parameters are dropped.
    """
    index_of = {id(param): index for index, param in enumerate(params)}
    layers: list[KFACLayer] = []
    covered: set[int] = set()
    owner_of: dict[int, str] = {}
    for module_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owner_of.setdefault(id(param), f"{type(module).__name__} '{module_name}'")
        if not is_supported(module):
            continue
        weight_index = index_of.get(id(module.weight))
        bias = module.bias
        bias_index = index_of.get(id(bias)) if bias is not None else None
        if weight_index is None and bias_index is None:
            continue
        layers.append(KFACLayer(module_name, module, weight_index, bias_index))
        covered.update(i for i in (weight_index, bias_index) if i is not None)
    for index, param in enumerate(params):
        if index in covered or skip_unsupported:
            continue
        owner = owner_of.get(id(param), "no layer of the model")
        raise ValueError(
            f"parameter '{names[index]}' belongs to {owner}, which KFAC does not support "
            f"(supported: {SUPPORTED_NAMES}); leave it out of the selected parameters, or pass "
            "skip_unsupported=True to approximate only the supported layers"
        )
    return layers, sorted(covered)


def _conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        pads = []  # "same" with stride 1: total padding dilation * (kernel - 1), split evenly
        for kernel, dilation in zip(_pair(module.kernel_size), _pair(module.dilation)):
            total = dilation * (kernel - 1)
            if total % 2:
                raise NotImplementedError(
                    f"Conv2d with padding='same' and an even kernel {module.kernel_size} pads "
                    "unequally, which KFAC's patch extraction does not support; pad explicitly"
                )
            pads.append(total // 2)
        return (pads[0], pads[1])
    return _pair(padding)  # type: ignore[return-value]


def layer_inputs(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``(batch, shared, in_features)``: each shared row is one position
    the weight is applied to (a Linear's leading dims, a Conv2d's output locations)."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise NotImplementedError(
                f"Conv2d '{module}' uses padding_mode={module.padding_mode!r}; KFAC supports "
                "zero padding only"
            )
        batch, channels = inputs.shape[:2]
        groups = module.groups
        grouped = inputs.reshape(batch, groups, channels // groups, *inputs.shape[2:]).mean(1)
        patches = F.unfold(
            grouped,
            module.kernel_size,
            dilation=module.dilation,
            padding=_conv_padding(module),
            stride=module.stride,
        )
        return patches.transpose(1, 2)
    return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])


def layer_output_gradients(module: nn.Module, gradients: torch.Tensor) -> torch.Tensor:
    """Gradients w.r.t. the layer's output as ``(batch, shared, out_features)``."""
    if isinstance(module, nn.Conv2d):
        return gradients.flatten(2).transpose(1, 2)
    return gradients.reshape(gradients.shape[0], -1, gradients.shape[-1])
