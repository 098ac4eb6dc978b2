"""``--model MODULE:FACTORY``: import the user's factory, call it, check what it returns."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torch_linop.cli.errors import UsageError
from torch_linop.cli.workload import Workload
from torch_linop.losses import LossFunction, as_loss_function, supervised_loss

FACTORY_CONTRACT = (
    "FACTORY must be a callable taking no arguments and returning (model, data) or "
    "(model, data, loss): model an nn.Module, data a list (or re-iterable DataLoader) of batches, "
    "loss a torch_linop LossFunction such as supervised_loss(F.cross_entropy) or a callable "
    "(model, batch) -> scalar"
)


def split_spec(spec: str) -> tuple[str, str]:
    """``"pkg.mod:build"`` or ``"path/to/file.py:build"`` -> (module part, attribute name)."""
    module_part, separator, attribute = spec.rpartition(":")
    if not separator or not module_part or not attribute:
        raise UsageError(
            f"--model {spec!r} is not MODULE:FACTORY; write e.g. --model my_project.curvature:build "
            "or --model path/to/script.py:build"
        )
    return module_part, attribute


def import_module(module_part: str) -> ModuleType:
    """Import a dotted module (the working directory is searched first, as with ``python -m``)
    or execute a ``.py`` file."""
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise UsageError(f"--model: no such file {str(path)!r}")
        spec = importlib.util.spec_from_file_location(f"_torch_linop_user_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise UsageError(f"--model: cannot import {str(path)!r} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        _run_user_code(lambda: spec.loader.exec_module(module), f"importing {path}")  # type: ignore[union-attr]
        return module
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(module_part)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if module_part == missing or module_part.startswith(missing + "."):
            raise UsageError(
                f"--model: no module named {missing!r} (searched the working directory and "
                f"sys.path); check the spelling, run from the directory that holds it, or give a "
                f"file path such as --model path/to/{module_part.split('.')[-1]}.py:FACTORY"
            ) from None
        raise UsageError(
            f"--model: importing {module_part!r} failed because its dependency {missing!r} is "
            f"not installed: pip install {missing.split('.')[0]}"
        ) from None
    except Exception as error:
        raise UsageError(_describe_user_exception(f"importing {module_part!r}", error)) from None


def _describe_user_exception(what: str, error: BaseException) -> str:
    frames = "".join(traceback.format_exception(type(error), error, error.__traceback__)[-6:])
    return f"--model: {what} raised {type(error).__name__}: {error}\n{frames.rstrip()}"


def _run_user_code(function: Any, what: str) -> Any:
    try:
        return function()
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(_describe_user_exception(what, error)) from None


def load_factory(spec: str) -> Any:
    """The callable named by ``spec``."""
    module_part, attribute = split_spec(spec)
    module = import_module(module_part)
    if not hasattr(module, attribute):
        callables = sorted(
            name
            for name, value in vars(module).items()
            if callable(value)
            and not name.startswith("_")
            and not isinstance(value, type)
            and getattr(value, "__module__", None) == module.__name__
        )
        hint = f"; its functions are {', '.join(callables)}" if callables else ""
        raise UsageError(f"--model: module {module_part!r} has no attribute {attribute!r}{hint}")
    factory = getattr(module, attribute)
    if not callable(factory):
        raise UsageError(
            f"--model: {spec} is a {type(factory).__name__}, not a callable; {FACTORY_CONTRACT}"
        )
    return factory


def infer_loss(first_batch: Any) -> LossFunction:
    """Cross-entropy for integer targets, mean-squared error for float targets, for
    ``(inputs, targets)`` batches; anything else needs an explicit loss."""
    if not (isinstance(first_batch, list | tuple) and len(first_batch) == 2):
        raise UsageError(
            f"--model: the factory returned no loss and the batches are "
            f"{type(first_batch).__name__}s, not (inputs, targets) pairs, so the loss cannot be "
            "guessed; return (model, data, loss) with e.g. supervised_loss(F.cross_entropy)"
        )
    targets = first_batch[1]
    if isinstance(targets, torch.Tensor) and not targets.is_floating_point():
        return supervised_loss(F.cross_entropy)
    if isinstance(targets, torch.Tensor):
        return supervised_loss(F.mse_loss)
    raise UsageError(
        f"--model: batch targets are {type(targets).__name__}, not tensors; return (model, data, "
        "loss) with a loss that understands your batches"
    )


def _first_batch(data: Any, spec: str) -> Any:
    if isinstance(data, Iterator):
        raise UsageError(
            f"--model: {spec} returned a one-shot iterator ({type(data).__name__}) as data; the "
            "operators pass over the data once per product, so return a list of batches or a "
            "DataLoader"
        )
    try:
        iterator = iter(data)
    except TypeError:
        raise UsageError(
            f"--model: the data returned by {spec} is a {type(data).__name__}, which is not "
            f"iterable; {FACTORY_CONTRACT}"
        ) from None
    for batch in iterator:
        return batch
    raise UsageError(f"--model: the data returned by {spec} holds no batches")


def _describe_data(data: Any) -> str:
    try:
        return f"{len(data):,} batches ({type(data).__name__})"
    except TypeError:
        return type(data).__name__


def user_workload(spec: str) -> Workload:
    """Call the factory and check its result against the contract."""
    factory = load_factory(spec)
    result = _run_user_code(factory, f"calling {spec}()")
    if not isinstance(result, tuple | list) or len(result) not in (2, 3):
        described = (
            f"a {len(result)}-tuple" if isinstance(result, tuple | list) else type(result).__name__
        )
        raise UsageError(f"--model: {spec}() returned {described}; {FACTORY_CONTRACT}")
    model, data, *rest = result
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"--model: the first item {spec}() returned is a {type(model).__name__}, not an "
            f"nn.Module; {FACTORY_CONTRACT}"
        )
    first = _first_batch(data, spec)
    if rest:
        try:
            loss = as_loss_function(rest[0])
        except TypeError as error:
            raise UsageError(
                f"--model: the loss {spec}() returned is not usable: {error}"
            ) from None
    else:
        loss = infer_loss(first)
    return Workload(
        model=model,
        data=data,
        loss=loss,
        model_name=f"{type(model).__name__} from {spec}",
        data_name=_describe_data(data),
    )
