"""Kronecker-factored curvature (KFAC, EKFAC) and its inverses, as torch-linop operators."""

from torch_linop.kfac.operator import KFACOperator
from torch_linop.kfac.signals import KFACLoss
from torch_linop.kfac.types import FisherType, KFACType

__all__ = ["FisherType", "KFACLoss", "KFACOperator", "KFACType"]
