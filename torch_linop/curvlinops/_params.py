"""curvlinops' ``params`` argument (a list of the model's parameters, or a ``{name: value}`` dict)
turned into the named tensors our operators are taken over."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


def check_model(model_func: Any) -> nn.Module:
    """Our operators re-parametrise the model, so ``model_func`` must be an ``nn.Module``."""
    if not isinstance(model_func, nn.Module):
        raise TypeError(
            f"model_func must be a torch.nn.Module, got {type(model_func).__name__}; wrap a "
            "function in a Module whose forward calls it with the module's parameters"
        )
    return model_func


def named_params(
    model: nn.Module, params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` in the order given.

    A list must hold parameters of ``model`` (found by identity, possibly a subset); a dict maps
    parameter names of ``model`` to the values the model is evaluated at.
    """
    if isinstance(params, Mapping):
        named = _from_dict(model, params)
    elif isinstance(params, (list, tuple)):
        named = _from_list(model, params)
    else:
        raise TypeError(
            f"params must be a list of the model's parameters or a dict {{name: tensor}}, got "
            f"{type(params).__name__}; e.g. [p for p in model.parameters() if p.requires_grad]"
        )
    if not named:
        raise ValueError(
            "params is empty; pass at least one parameter, e.g. list(model.parameters())"
        )
    devices = {tensor.device for tensor in named.values()}
    dtypes = {tensor.dtype for tensor in named.values()}
    if len(devices) > 1 or len(dtypes) > 1:
        raise ValueError(
            f"params must share one device and dtype, got devices {sorted(map(str, devices))} "
            f"and dtypes {sorted(map(str, dtypes))}; move them with model.to(device, dtype)"
        )
    return named


def _from_list(model: nn.Module, params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    name_of = {id(param): name for name, param in model.named_parameters()}
    named: dict[str, torch.Tensor] = {}
    for index, param in enumerate(params):
        if not isinstance(param, torch.Tensor):
            raise TypeError(f"params[{index}] must be a tensor, got {type(param).__name__}")
        name = name_of.get(id(param))
        if name is None:
            raise ValueError(
                f"params[{index}] (shape {tuple(param.shape)}) is not a parameter of model_func; "
                "pass tensors from model_func.parameters(), or a dict {name: value} to evaluate "
                "the model at other values"
            )
        if name in named:
            raise ValueError(f"params[{index}] ({name!r}) is listed twice")
        named[name] = param
    return named


def _from_dict(model: nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    known = dict(model.named_parameters(remove_duplicate=False))
    named: dict[str, torch.Tensor] = {}
    for name, value in params.items():
        if name not in known:
            raise ValueError(
                f"params has key {name!r}, which is not a parameter name of model_func; its "
                f"parameters are {list(known)[:8]}{' ...' if len(known) > 8 else ''}"
            )
        if not isinstance(value, torch.Tensor) or value.shape != known[name].shape:
            raise ValueError(
                f"params[{name!r}] must be a tensor of shape {tuple(known[name].shape)}, got "
                f"{getattr(value, 'shape', type(value).__name__)}"
            )
        named[name] = value
    return named
