"""Drop-in for curvlinops: ``import torch_linop.curvlinops as curvlinops``."""

from torch_linop.curvlinops.empirical_fisher import EFLinearOperator
from torch_linop.curvlinops.fisher import FisherMCLinearOperator
from torch_linop.curvlinops.ggn import GGNLinearOperator
from torch_linop.curvlinops.hessian import HessianLinearOperator

__all__ = [
    "EFLinearOperator",
    "FisherMCLinearOperator",
    "GGNLinearOperator",
    "HessianLinearOperator",
]
