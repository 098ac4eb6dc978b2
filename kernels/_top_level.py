"""Give the top-level name ``kernels`` to the installed package that owns it (HuggingFace's).

Python returns whatever ``sys.modules[name]`` holds once a module's code has run, so a module
can stand aside by putting another in its place. Used only when this folder is imported under
the bare name ``kernels`` (the repository root on ``sys.path``); as ``torch_linop.kernels``
nothing changes.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over_top_level_name(name: str, init_file: str) -> bool:
    """If ``name`` is ``"kernels"`` and another ``kernels`` package is on ``sys.path`` after this
    repository's root, load it as ``sys.modules["kernels"]`` and return True."""
    if name != "kernels":
        return False
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    others = [entry for entry in sys.path if os.path.abspath(entry or os.getcwd()) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, others)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return True
