"""Drop-in for curvlinops 3: ``import torch_linop.curvlinops as curvlinops``.

Every operator here obeys curvlinops 3's ``PyTorchLinearOperator`` contract (torch ``dtype`` and
``device``, ``@`` on tensors and tensor lists, algebra, ``adjoint()``, ``to_scipy()``; see
:mod:`torch_linop.curvlinops._torch_base`); the curvature operators hold one of our operators
(``.operator``, a scipy ``LinearOperator`` with numpy ``dtype``), whose products they use.
"""

from torch_linop.curvlinops._torch_base import PyTorchLinearOperator
from torch_linop.curvlinops.diagonal import hutchinson_diag, xdiag
from torch_linop.curvlinops.ekfac import EKFACLinearOperator
from torch_linop.curvlinops.empirical_fisher import EFLinearOperator
from torch_linop.curvlinops.estimator_classes import (
    HutchinsonDiagonalEstimator,
    HutchinsonSquaredFrobeniusNormEstimator,
    HutchinsonTraceEstimator,
    HutchPPTraceEstimator,
)
from torch_linop.curvlinops.fisher import FisherMCLinearOperator
from torch_linop.curvlinops.ggn import GGNLinearOperator
from torch_linop.curvlinops.hessian import HessianLinearOperator
from torch_linop.curvlinops.inverse import (
    CGInverseLinearOperator,
    LSMRInverseLinearOperator,
    NeumannInverseLinearOperator,
)
from torch_linop.curvlinops.jacobian import (
    JacobianLinearOperator,
    TransposedJacobianLinearOperator,
)
from torch_linop.curvlinops.kfac import FisherType, KFACLinearOperator, KFACType
from torch_linop.curvlinops.kfac_inverse import KFACInverseLinearOperator
from torch_linop.curvlinops.norm import hutchinson_squared_fro
from torch_linop.curvlinops.spectrum import (
    LanczosApproximateLogSpectrumCached,
    LanczosApproximateSpectrumCached,
    approximate_boundaries,
    approximate_boundaries_abs,
    lanczos_approximate_log_spectrum,
    lanczos_approximate_spectrum,
)
from torch_linop.curvlinops.submatrix import SubmatrixLinearOperator
from torch_linop.curvlinops.trace import hutchinson_trace, hutchpp_trace, xtrace

__all__ = [
    "PyTorchLinearOperator",
    "CGInverseLinearOperator",
    "EFLinearOperator",
    "EKFACLinearOperator",
    "FisherMCLinearOperator",
    "GGNLinearOperator",
    "HessianLinearOperator",
    "HutchPPTraceEstimator",
    "HutchinsonDiagonalEstimator",
    "HutchinsonSquaredFrobeniusNormEstimator",
    "HutchinsonTraceEstimator",
    "FisherType",
    "JacobianLinearOperator",
    "KFACInverseLinearOperator",
    "KFACLinearOperator",
    "KFACType",
    "LSMRInverseLinearOperator",
    "NeumannInverseLinearOperator",
    "SubmatrixLinearOperator",
    "TransposedJacobianLinearOperator",
    "LanczosApproximateLogSpectrumCached",
    "LanczosApproximateSpectrumCached",
    "approximate_boundaries",
    "approximate_boundaries_abs",
    "hutchinson_diag",
    "hutchinson_squared_fro",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos_approximate_log_spectrum",
    "lanczos_approximate_spectrum",
    "xdiag",
    "xtrace",
]
