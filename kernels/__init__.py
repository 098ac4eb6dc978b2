"""Fused kernels for curvature products (shipped as ``torch_linop.kernels``)."""

from .ce_hvp import ce_hvp

__all__ = ["ce_hvp"]
