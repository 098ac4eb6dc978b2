"""Fused kernels for curvature products (shipped as ``torch_linop.kernels``)."""
