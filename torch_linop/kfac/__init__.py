"""Kronecker-factored curvature (KFAC, EKFAC) and its inverses, as torch-linop operators.

``approximation_quality`` (and its result type) compares an approximation with the exact operator
by running the solvers, a layer above the operators: it lives in ``torch_linop.kfac.quality`` and
is resolved here on first access, so importing the KFAC operators does not import the solvers.
"""

from __future__ import annotations

from typing import Any

from torch_linop.kfac.ekfac import EKFACOperator
from torch_linop.kfac.inverse import KFACInverseOperator
from torch_linop.kfac.operator import KFACOperator
from torch_linop.kfac.signals import KFACLoss
from torch_linop.kfac.types import FisherType, KFACType

_LAZY = {
    "ApproximationQuality": ("torch_linop.kfac.quality", "ApproximationQuality"),
    "approximation_quality": ("torch_linop.kfac.quality", "approximation_quality"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'torch_linop.kfac' has no attribute {name!r}")


__all__ = [
    "ApproximationQuality",
    "EKFACOperator",
    "FisherType",
    "KFACInverseOperator",
    "KFACLoss",
    "KFACOperator",
    "KFACType",
    "approximation_quality",
]
