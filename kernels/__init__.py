"""Fused kernels for curvature products (shipped as ``torch_linop.kernels``).

This folder is imported as a top-level ``kernels`` only when the repository root is on
``sys.path`` (``python -m pytest`` or ``python -c`` there, or ``PYTHONPATH=$PWD``). That name
belongs to HuggingFace's ``kernels`` package, which transformers (5.25 and later require it)
imports by name: when it is installed, this module hands the name over to it
(:mod:`torch_linop.kernels._top_level`), so transformers keeps working in the repository root.
"""

from ._top_level import hand_over_top_level_name

if not hand_over_top_level_name(__name__, __file__):
    from .ce_hvp import ce_hvp

    __all__ = ["ce_hvp"]
