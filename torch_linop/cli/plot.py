"""The PNG figure: spectral density (log-scaled where the spectrum spans decades) with the top
eigenvalues marked, the top eigenvalues themselves, and the per-tensor diagonal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import ticker

from torch_linop.cli.analysis import CURVATURE_NAMES, Analysis
from torch_linop.cli.report import METHOD_NAMES

LOG_SCALE_RATIO = 1e3  # log-scale the density when its peak exceeds its median by this much
EIGEN_COLOR = "#c0392b"
DENSITY_COLOR = "#1f4e79"
LOWEST_COLOR = "#2e7d32"


def _use_log_scale(density: np.ndarray) -> bool:
    positive = density[density > 0]
    if positive.size == 0:
        return False
    return float(positive.max()) > LOG_SCALE_RATIO * float(np.median(positive))


def _density_panel(ax: Any, analysis: Analysis) -> None:
    """The SLQ density with its smoothing width, the Lanczos eigenvalues, and for an indefinite
    Hessian its lowest Ritz value; a PSD matrix's curve starts at 0 (the Gaussian smoothing's
    tail below 0 is not drawn, and the legend says so). The legend sits below the axes."""
    density = analysis.density
    grid = np.asarray(density.grid, dtype=np.float64)
    values = np.asarray(density.density, dtype=np.float64)
    nodes = np.asarray(density.nodes, dtype=np.float64)
    runs, steps = nodes.shape
    clip_at_zero = analysis.positive_semidefinite and grid.min() < 0
    if clip_at_zero:
        values, grid = values[grid >= 0], grid[grid >= 0]
    log = _use_log_scale(values)
    if log:
        floor = float(values.max()) * 1e-6
        shown = np.maximum(values, floor)
        ax.set_yscale("log")
        ax.set_ylim(floor, float(values.max()) * 3)
    else:
        shown = values
        ax.set_ylim(0, float(values.max()) * 1.1)
    ax.fill_between(grid, shown, shown.min(), color=DENSITY_COLOR, alpha=0.18, linewidth=0)
    ax.plot(
        grid,
        shown,
        color=DENSITY_COLOR,
        linewidth=1.4,
        label=f"SLQ density ({runs} runs x {steps} steps), Gaussian smoothing "
        f"$\\sigma$ = {density.sigma:.2g}",
    )
    if clip_at_zero:
        ax.plot([], [], " ", label="PSD matrix: the smoothing's tail below 0 is not drawn")
    if analysis.eigen is not None:
        for index, value in enumerate(np.asarray(analysis.eigen.eigenvalues)):
            ax.axvline(
                value,
                color=EIGEN_COLOR,
                linestyle="--",
                linewidth=0.9,
                alpha=0.6,
                label=f"top-{len(analysis.eigen.eigenvalues)} eigenvalues (Lanczos)"
                if index == 0
                else None,
            )
    if not analysis.positive_semidefinite:
        lowest = float(nodes.min())
        ax.axvline(
            lowest,
            color=LOWEST_COLOR,
            linestyle=":",
            linewidth=1.4,
            label=f"lowest SLQ Ritz value {lowest:.2g} (bounds the most negative eigenvalue above)",
        )
    ax.set_xlim(grid.min(), grid.max())
    ax.set_xlabel(r"eigenvalue $\lambda$")
    ax.set_ylabel("density (log scale)" if log else "density")
    ax.set_title("Spectral density")
    if analysis.trace is not None:
        method = METHOD_NAMES.get(analysis.trace.method, analysis.trace.method)
        error = "" if analysis.trace.method == "exact" else f" ± {analysis.trace.stderr:.2g}"
        ax.plot([], [], " ", label=f"trace {analysis.trace.estimate:.4g}{error} ({method})")
    ax.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        fontsize=8,
        frameon=False,
        ncol=1,
    )
    ax.grid(True, which="major", alpha=0.3)


def _eigen_panel(ax: Any, analysis: Analysis) -> None:
    eigen = analysis.eigen
    values = np.asarray(eigen.eigenvalues, dtype=np.float64)
    converged = np.asarray(eigen.converged, dtype=bool)
    index = np.arange(1, len(values) + 1)
    ax.plot(index, values, color=EIGEN_COLOR, linewidth=1.0, alpha=0.5)
    ax.scatter(
        index[converged], values[converged], color=EIGEN_COLOR, zorder=3, s=28, label="converged"
    )
    if not converged.all():  # hollow markers: residual above the tolerance
        ax.scatter(
            index[~converged],
            values[~converged],
            facecolor="white",
            edgecolor=EIGEN_COLOR,
            zorder=3,
            s=28,
            label="not converged",
        )
    if np.all(values > 0) and values.max() / values.min() > 5:
        ax.set_yscale("log")
        if values.max() / values.min() < 100:  # few decades: plain numbers at 1, 2, 5 x 10^i
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xticks(index if len(index) <= 12 else index[:: max(1, len(index) // 10)])
    ax.set_xlabel("rank $i$")
    ax.set_ylabel(r"eigenvalue $\lambda_i$")
    how = "dense eigh" if eigen.num_iterations == 0 else "Lanczos"
    order = "" if analysis.positive_semidefinite else r", by $|\lambda|$"
    ax.set_title(f"Top-{len(values)} eigenvalues ({how}{order})")
    ax.text(
        0.98,
        0.96,
        f"max residual {np.max(eigen.residuals):.1e}\n{eigen.num_matvecs} products",
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=8.5,
        bbox={"boxstyle": "round,pad=0.35", "facecolor": "white", "edgecolor": "0.8"},
    )
    if not converged.all():
        ax.legend(loc="lower left", fontsize=8.5, frameon=False)
    ax.grid(True, which="major", alpha=0.3)


def _diagonal_panel(ax: Any, analysis: Analysis) -> None:
    """Mean diagonal entry per tensor, with the standard error of the mean as an error bar."""
    blocks = analysis.diagonal_blocks[::-1]  # first parameter on top
    names = [block["name"] for block in blocks]
    means = np.array([block["mean"] for block in blocks])
    errors = np.array([block.get("sum_stderr", 0.0) / block["size"] for block in blocks])
    positions = np.arange(len(blocks))
    ax.barh(
        positions,
        means,
        xerr=errors if np.any(errors > 0) else None,
        color=DENSITY_COLOR,
        alpha=0.75,
        error_kw={"ecolor": "0.2", "capsize": 3, "linewidth": 1},
    )
    ax.set_yticks(positions, names, fontsize=8 if len(names) < 20 else 6)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=4))  # no colliding labels
    if np.all(means - errors > 0) and means.max() / means.min() > 20:
        ax.set_xscale("log")
    ax.set_xlabel("mean diagonal entry (± standard error)")
    method = METHOD_NAMES.get(analysis.diagonal.method, analysis.diagonal.method)
    ax.set_title(f"Diagonal by parameter ({method})")
    ax.grid(True, axis="x", alpha=0.3)


def draw_figure(analysis: Analysis, model_name: str, sample_name: str = "samples") -> Any:
    """The matplotlib figure of ``analysis``; ``None`` when nothing plottable was computed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (draw, present)
        for draw, present in (
            (_density_panel, analysis.density is not None),
            (_eigen_panel, analysis.eigen is not None),
            (_diagonal_panel, analysis.diagonal is not None),
        )
        if present
    ]
    if not panels:
        return None
    widths = [1.6 if draw is _density_panel else 1.0 for draw, _ in panels]
    figure, axes = plt.subplots(
        1,
        len(panels),
        figsize=(3.9 * sum(widths) + 0.6, 4.9 if analysis.density is not None else 4.3),
        gridspec_kw={"width_ratios": widths},
        constrained_layout=True,
        squeeze=False,
    )
    for (draw, _), ax in zip(panels, axes[0]):
        draw(ax, analysis)
    name = CURVATURE_NAMES[analysis.curvature]
    figure.suptitle(
        f"{name} of {model_name}: {analysis.num_parameters:,} parameters, "
        f"{analysis.num_data:,} {sample_name}",
        fontsize=11.5,
    )
    return figure


def plot_analysis(
    analysis: Analysis, model_name: str, path: Path, sample_name: str = "samples"
) -> Path | None:
    """Write the figure to ``path``; ``None`` when nothing plottable was computed (trace only)."""
    import matplotlib.pyplot as plt

    figure = draw_figure(analysis, model_name, sample_name)
    if figure is None:
        return None
    path = path.expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
    plt.close(figure)
    return path
