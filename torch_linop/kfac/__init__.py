"""Kronecker-factored curvature (KFAC, EKFAC) and its inverses, as torch-linop operators."""

from torch_linop.kfac.ekfac import EKFACOperator
from torch_linop.kfac.inverse import KFACInverseOperator
from torch_linop.kfac.operator import KFACOperator
from torch_linop.kfac.quality import ApproximationQuality, approximation_quality
from torch_linop.kfac.signals import KFACLoss
from torch_linop.kfac.types import FisherType, KFACType

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
