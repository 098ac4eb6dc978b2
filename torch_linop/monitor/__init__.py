"""Curvature during training: sharpness, Adam-preconditioned sharpness and trace, checked every
few steps with warm-started Lanczos (:class:`CurvatureMonitor`), kept as JSON, plotted, and logged
from a HuggingFace ``Trainer`` (:class:`CurvatureCallback`, imported on first use so that this
package does not import transformers)."""

from typing import Any

from torch_linop.monitor.monitor import CurvatureMonitor
from torch_linop.monitor.preconditioner import adam_threshold, gradient_descent_threshold
from torch_linop.monitor.records import CheckRecord, load_history, save_history

__all__ = [
    "CheckRecord",
    "CurvatureCallback",
    "CurvatureMonitor",
    "adam_threshold",
    "gradient_descent_threshold",
    "load_history",
    "plot_history",
    "save_history",
]


def __getattr__(name: str) -> Any:
    if name == "CurvatureCallback":
        from torch_linop.monitor.callback import CurvatureCallback

        return CurvatureCallback
    if name == "plot_history":
        from torch_linop.monitor.plot import plot_history

        return plot_history
    raise AttributeError(f"module 'torch_linop.monitor' has no attribute {name!r}")
