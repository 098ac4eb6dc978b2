"""Argument checks shared by the solvers: raised where the value enters, naming value and fix."""

from __future__ import annotations

import math
from typing import Any

import torch


def check_int(name: str, value: Any, minimum: int) -> None:
    """ValueError unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """TypeError unless ``value`` is True or False (a string such as "no" would be truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def as_device(name: str, value: Any) -> torch.device:
    """``torch.device(value)``, or a ValueError naming the option and valid examples."""
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"{name}={value!r} is not a device; use e.g. 'cpu', 'cuda', 'cuda:1' or a torch.device"
        ) from error


def check_tol(tol: Any) -> None:
    """ValueError unless ``tol`` is a positive finite number."""
    if not (isinstance(tol, int | float) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number (e.g. 1e-8), got {tol!r}")
