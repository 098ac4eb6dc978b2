"""Draw a curvature history: one panel per quantity against the training step, with the
stability lines (``2/lr`` beside the sharpness, Adam's ``(2 + 2 beta1)/((1 - beta1) lr)``
beside the preconditioned sharpness) and the trace's error bars, on a log scale where all values
are positive; unconverged checks circled in red."""

from __future__ import annotations

import os
from typing import Any

from torch_linop.monitor.records import CheckRecord

_TITLES = {
    "top_eigenvalue": ("sharpness (top eigenvalue)", "2/lr"),
    "preconditioned_top_eigenvalue": ("preconditioned sharpness (P^-1/2 H P^-1/2)", "adam"),
    "trace": ("trace (Hutch++, +/- 1 s.e.)", None),
}
_LINE_LABELS = {"2/lr": "2 / lr", "adam": "(2 + 2 beta1) / ((1 - beta1) lr)"}


def plot_history(records: list[CheckRecord], path: str | os.PathLike[str] | None = None) -> Any:
    """A matplotlib Figure of ``records`` (saved to ``path`` if given); ValueError if empty."""
    if not records:
        raise ValueError("the history is empty: run some checks (monitor.step) before plotting")
    import matplotlib.pyplot as plt

    names = [name for name in _TITLES if any(name in record.values for record in records)]
    figure, axes = plt.subplots(len(names), 1, figsize=(6.4, 2.6 * len(names)), sharex=True)
    axes = [axes] if len(names) == 1 else list(axes)
    for axis, name in zip(axes, names):
        title, line = _TITLES[name]
        rows = [record for record in records if name in record.values]
        steps = [record.step for record in rows]
        num_values = max(len(record.values[name]) for record in rows)
        for index in range(num_values):
            values = [record.values[name][index] for record in rows]
            errors = [record.stderr.get(name, 0.0) for record in rows]
            label = "top" if index == 0 else f"#{index + 1}"
            if name == "trace":
                axis.errorbar(steps, values, yerr=errors, marker="o", ms=3, label="trace")
            else:
                axis.plot(steps, values, marker="o", ms=3, label=label)
            rough = [(s, v) for s, v, r in zip(steps, values, rows) if not r.converged[name]]
            if rough:
                axis.scatter(*zip(*rough), facecolors="none", edgecolors="red", zorder=3,
                             label="unconverged" if index == 0 else None)  # fmt: skip
        if line is not None and any(line in record.thresholds for record in rows):
            threshold = [record.thresholds.get(line, float("nan")) for record in rows]
            axis.plot(steps, threshold, "k--", lw=1, label=_LINE_LABELS[line])
        plotted = [y for line_ in axis.get_lines() for y in line_.get_ydata()]
        if plotted and min(plotted) > 0:  # sharpness and its line are orders of magnitude apart
            axis.set_yscale("log")
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("training step")
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure
