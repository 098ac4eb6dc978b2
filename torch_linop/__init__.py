"""torch-linop: curvature matrices of PyTorch models as scipy LinearOperators.

Hessian, generalized Gauss-Newton, empirical and Monte-Carlo Fisher, each a
``scipy.sparse.linalg.LinearOperator`` that also computes on torch tensors without leaving the
device, plus solvers (Lanczos, trace, diagonal, spectral density) in ``torch_linop.solvers``.
"""

from torch_linop.algebra import DiagonalOperator, IdentityOperator
from torch_linop.empirical_fisher import EmpiricalFisherOperator
from torch_linop.ggn import GGNOperator
from torch_linop.hessian import HessianOperator
from torch_linop.kernels import ce_hvp
from torch_linop.kfac import EKFACOperator, KFACInverseOperator, KFACOperator
from torch_linop.kfac.quality import approximation_quality
from torch_linop.linear_operator import TorchLinearOperator
from torch_linop.losses import (
    LossFunction,
    supervised_forward,
    supervised_loss,
    supervised_loss_of_output,
)
from torch_linop.losses.encoders import hf_classification_loss, hf_masked_lm_loss
from torch_linop.losses.language_models import (
    hf_lm_forward,
    hf_lm_loss,
    hf_lm_loss_of_output,
    hf_seq2seq_loss,
)
from torch_linop.losses.transformer_lens import tlens_forward, tlens_loss, tlens_loss_of_output
from torch_linop.mc_fisher import MCFisherOperator
from torch_linop.monitor import CurvatureMonitor
from torch_linop.operator import CurvatureOperator
from torch_linop.options import ProductOptions
from torch_linop.params import (
    match_names,
    match_regex,
    parameters_to_vector,
    select_parameters,
    vector_to_parameters,
)
from torch_linop.planning import Plan, plan
from torch_linop.solvers import (
    DiagonalResult,
    EigenResult,
    SpectralDensityResult,
    TraceResult,
    diagonal,
    lanczos,
    power_iteration,
    spectral_density,
    trace,
)

__version__ = "0.1.0"

__all__ = [
    "CurvatureMonitor",
    "CurvatureOperator",
    "DiagonalOperator",
    "DiagonalResult",
    "EigenResult",
    "SpectralDensityResult",
    "TorchLinearOperator",
    "TraceResult",
    "ce_hvp",
    "approximation_quality",
    "EKFACOperator",
    "KFACInverseOperator",
    "KFACOperator",
    "diagonal",
    "hf_classification_loss",
    "hf_lm_forward",
    "hf_lm_loss",
    "hf_lm_loss_of_output",
    "hf_masked_lm_loss",
    "hf_seq2seq_loss",
    "lanczos",
    "plan",
    "Plan",
    "power_iteration",
    "spectral_density",
    "tlens_forward",
    "tlens_loss",
    "tlens_loss_of_output",
    "trace",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "LossFunction",
    "MCFisherOperator",
    "ProductOptions",
    "match_names",
    "match_regex",
    "parameters_to_vector",
    "select_parameters",
    "supervised_forward",
    "supervised_loss",
    "supervised_loss_of_output",
    "vector_to_parameters",
]
