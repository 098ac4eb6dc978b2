"""Per-batch curvature products composed from parts chosen once when an operator is built.

- :mod:`~torch_linop.products.capability`: what the model supports (vmap, forward-mode AD),
  probed at the first product that needs it and recorded;
- :mod:`~torch_linop.products.jvp`: how ``J V`` is taken (forward mode, double backward,
  central or one-sided differences);
- :mod:`~torch_linop.products.middle`: what sits between ``J`` and ``J^T`` (the exact output
  Hessian, a Monte-Carlo estimate of it, the empirical Fisher's scaling);
- :mod:`~torch_linop.products.sandwich`: ``J^T M J V`` from a JVP strategy and a middle.

The Hessian's products (double backward, forward-over-reverse, central differences of
gradients) live in :mod:`torch_linop.hessian`; kept graphs and CUDA-graph replay wrap either in
:mod:`torch_linop._graph_cache` and :mod:`torch_linop._cuda_graph`.
"""

from torch_linop.products.capability import Capabilities, Capability
from torch_linop.products.jvp import JVP_METHODS, make_jvp
from torch_linop.products.middle import SampledOutputHessian, empirical_fisher_middle, output_hvp_of
from torch_linop.products.sandwich import Sandwich

__all__ = [
    "JVP_METHODS",
    "Capabilities",
    "Capability",
    "SampledOutputHessian",
    "Sandwich",
    "empirical_fisher_middle",
    "make_jvp",
    "output_hvp_of",
]
