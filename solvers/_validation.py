"""Argument checks shared by the solvers: raised where the value enters, naming value and fix."""

from __future__ import annotations

import math
from typing import Any


def check_int(name: str, value: Any, minimum: int) -> None:
    """ValueError unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_tol(tol: Any) -> None:
    """ValueError unless ``tol`` is a positive finite number."""
    if not (isinstance(tol, int | float) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number (e.g. 1e-8), got {tol!r}")
