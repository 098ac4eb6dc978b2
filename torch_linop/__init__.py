"""torch-linop: curvature matrices of PyTorch models as scipy LinearOperators."""

__version__ = "0.1.0"
