"""Matrix-free solvers on curvature operators (shipped as ``torch_linop.solvers``).

Every solver takes a scipy ``LinearOperator`` / numpy array / scipy sparse matrix (numpy path) or
a torch operator with ``device``, ``torch_dtype`` and ``shape`` / a square ``torch.Tensor`` (torch
path, run on the operator's device), and returns a frozen result record. An operator's optional
``vector_space`` (:class:`VectorSpace`) says where its vectors live: the solvers take every
inner product, norm, QR, probe and seed through it, so they run unchanged on sharded vectors.
"""

from ._space import VectorSpace
from .desa2018power import power_iteration
from .eigenpairs import lanczos
from .estimators import diagonal, trace
from .results import DiagonalResult, EigenResult, SpectralDensityResult, TraceResult
from .slq import spectral_density

__all__ = [
    "DiagonalResult",
    "EigenResult",
    "SpectralDensityResult",
    "TraceResult",
    "VectorSpace",
    "diagonal",
    "lanczos",
    "power_iteration",
    "spectral_density",
    "trace",
]
