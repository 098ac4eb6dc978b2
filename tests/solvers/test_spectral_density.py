"""spectral_density (SLQ): quadrature facts that hold exactly (weights sum to 1, the density
integrates to 1, n steps give the exact spectrum), unbiased moments, and mass and peak location
on a two-cluster spectrum."""

from __future__ import annotations

import sys

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import scipy.integrate
import torch

from torch_linop.solvers import SpectralDensityResult, spectral_density

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def two_clusters(make_matrix):
    rng = np.random.default_rng(30)
    spectrum = np.concatenate([rng.normal(1.0, 0.05, 280), rng.normal(5.0, 0.05, 120)])
    return make_matrix(spectrum, seed=30), spectrum


def test_mass_and_peaks_of_a_two_cluster_spectrum(two_clusters):
    matrix, _ = two_clusters
    result = spectral_density(matrix, num_runs=8, lanczos_steps=40, seed=0)
    assert isinstance(result, SpectralDensityResult)
    assert scipy.integrate.trapezoid(result.density, result.grid) == pytest.approx(1.0)
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, rtol=1e-12)
    low = result.grid < 3.0
    low_mass = scipy.integrate.trapezoid(result.density[low], result.grid[low])
    assert low_mass == pytest.approx(0.7, abs=0.05)
    assert result.grid[low][np.argmax(result.density[low])] == pytest.approx(1.0, abs=0.1)
    assert result.grid[~low][np.argmax(result.density[~low])] == pytest.approx(5.0, abs=0.1)
    assert result.num_matvecs == 8 * 40


def test_quadrature_moments_are_unbiased(two_clusters):
    matrix, spectrum = two_clusters
    result = spectral_density(matrix, num_runs=20, lanczos_steps=10, seed=1)
    for power in (1, 2):
        per_run = (result.weights * result.nodes**power).sum(axis=1)
        truth = np.mean(spectrum**power)
        stderr = per_run.std(ddof=1) / np.sqrt(len(per_run))
        assert abs(per_run.mean() - truth) < 4 * stderr


def test_n_steps_give_the_exact_spectrum(make_matrix):
    spectrum = np.linspace(-2.0, 3.0, 30)
    result = spectral_density(make_matrix(spectrum, seed=31), num_runs=2, lanczos_steps=30, seed=0)
    for run_nodes in result.nodes:
        np.testing.assert_allclose(run_nodes, spectrum, atol=1e-10)


def test_early_invariant_subspace_ends_the_run_with_exact_quadrature(make_matrix):
    spectrum = np.concatenate([[1.0, 2.0, 3.0], np.zeros(47)])
    result = spectral_density(make_matrix(spectrum, seed=32), num_runs=3, lanczos_steps=20, seed=0)
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, rtol=1e-12)
    for run_nodes, run_weights in zip(result.nodes, result.weights, strict=True):
        used = run_nodes[run_weights > 1e-12]
        distance = np.abs(used[:, None] - np.array([0.0, 1.0, 2.0, 3.0])[None]).min(axis=1)
        assert distance.max() < 1e-10


def test_torch_float32_and_seeds(two_clusters):
    matrix, _ = two_clusters
    first = spectral_density(torch.from_numpy(matrix).float(), num_runs=2, lanczos_steps=15, seed=5)
    second = spectral_density(
        torch.from_numpy(matrix).float(), num_runs=2, lanczos_steps=15, seed=5
    )
    np.testing.assert_array_equal(first.density, second.density)
    numpy_result = spectral_density(matrix, num_runs=2, lanczos_steps=15, seed=5)
    np.testing.assert_allclose(first.nodes, numpy_result.nodes, rtol=1e-4, atol=1e-4)
    unseeded = [spectral_density(matrix, num_runs=1, lanczos_steps=5).nodes for _ in range(2)]
    assert not np.array_equal(unseeded[0], unseeded[1])


def test_plot_draws_on_a_log_axis(two_clusters):
    result = spectral_density(two_clusters[0], num_runs=1, lanczos_steps=10, seed=0)
    ax = result.plot()
    assert ax.get_yscale() == "log" and len(ax.lines) == 1
    assert ax.get_ylim()[0] == pytest.approx(1e-8 * result.density.max())
    assert result.plot(log=False).get_yscale() == "linear"
    plt.close("all")


def test_plot_without_matplotlib_names_the_extra(two_clusters, monkeypatch):
    result = spectral_density(two_clusters[0], num_runs=1, lanczos_steps=5, seed=0)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r'pip install "torch-linop\[plot\]"'):
        result.plot()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_runs": 0}, "num_runs must be an integer >= 1"),
        ({"lanczos_steps": 401}, "exceeds the operator size n=400"),
        ({"lanczos_steps": 0}, "lanczos_steps must be an integer >= 1"),
        ({"sigma": -1.0}, "sigma must be None"),
        ({"grid_size": 1}, "grid_size must be an integer >= 2"),
    ],
)
def test_bad_arguments(two_clusters, kwargs, message):
    with pytest.raises(ValueError, match=message):
        spectral_density(two_clusters[0], **kwargs)
