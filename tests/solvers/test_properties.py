"""Property-based tests (hypothesis): for any symmetric matrix of size 5..60 whose spectrum meets
the documented conditions, the solvers agree with numpy, never return NaN and stop within a
bounded number of products.

Documented conditions (docs/concepts/solvers.md): eigenvalues of magnitude 1e-100 to 1e100 (or
zero) in float64, i.e. far from underflow and overflow; Lanczos guarantees ``|theta_i - lambda_i| <=
tol * ||H||`` for the wanted pairs, and a single start vector sees one direction of each
eigenspace, so an eigenvalue of multiplicity ``p`` among the k + 1 most wanted ones needs
``block_size >= p``. The strategy draws spectra with repeated and nearly repeated values
anywhere, scales from 1e-6 to 1e6 and either sign; the test passes ``block_size`` = that
multiplicity (values closer than 1e-6 ||H|| counted as equal), as the documentation tells users,
and checks: no NaN, at most the default budget of products, every pair reported converged within
``tol * ||H||`` of numpy's, an unconverged run warns, and a run whose basis holds the whole space
(n a multiple of the block, n <= 100) converges. (Thick-restarted block runs with little room
per cycle can need more than the default budget: tiny operators with blocks near n / 4.)
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from torch_linop.solvers import EigenResult, lanczos, spectral_density, trace

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same examples on every run: no flaky CI
    database=None,  # nothing written into the repository
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no explain phase: no patch files
    suppress_health_check=[HealthCheck.too_slow],
)
CLUSTER = 1e-6  # eigenvalues closer than this (relative to ||H||) count as repeated


@st.composite
def symmetric_matrices(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """A dense symmetric ``Q diag(lambda) Q^T`` and its exact spectrum ``lambda``."""
    size = draw(st.integers(5, 60))
    value = st.floats(-1.0, 1.0, allow_nan=False, allow_subnormal=False)
    # documented range: operator norms within 1e-100 ... 1e100 in float64 (zero included)
    value = value.map(lambda x: x if abs(x) > 1e-94 else 0.0)
    base = draw(st.lists(value, min_size=1, max_size=size))
    # cycle the drawn values to length n: repeated eigenvalues appear naturally
    spectrum = np.resize(np.asarray(base), size)
    shape = draw(st.sampled_from(["linear", "geometric", "shifted"]))
    if shape == "geometric":  # decaying like a Hessian's: 10 decades
        spectrum = np.sign(spectrum) * 10.0 ** (-10 * (1 - np.abs(spectrum)))
    elif shape == "shifted":  # definite, with the bulk away from zero
        spectrum = spectrum + draw(st.sampled_from([-3.0, 3.0]))
    spectrum = spectrum * 10.0 ** draw(st.integers(-6, 6))
    seed = draw(st.integers(0, 2**16))
    orthogonal, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((size, size)))
    matrix = (orthogonal * spectrum) @ orthogonal.T
    return (matrix + matrix.T) / 2, np.sort(spectrum)


def wanted_end(spectrum: np.ndarray, count: int, which: str) -> np.ndarray:
    return spectrum[::-1][:count] if which == "LA" else spectrum[:count]


def fits(size: int, k: int, block_size: int) -> bool:
    """Whether a basis of whole blocks within ``size`` holds k pairs and two blocks (the
    solver's own minimum)."""
    return k + 2 * block_size <= size - size % block_size


def run_lanczos(matrix: np.ndarray, k: int, **options) -> EigenResult:
    """``lanczos``, checking that an unconverged result warns."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = lanczos(matrix, k, **options)
    if not result.converged.all():
        assert any("eigenpairs converged" in str(warning.message) for warning in caught)
    size = matrix.shape[0]
    if size % options["block_size"] == 0:
        assert result.converged.all()  # the basis spans the space: the run completes
    assert np.isfinite(result.eigenvalues).all() and np.isfinite(result.residuals).all()
    # bounded: the default Krylov budget max(1000, 20 * basis), plus the residual products
    assert result.num_matvecs - result.num_residual_matvecs <= max(1000, 20 * size)
    assert result.num_residual_matvecs <= result.num_matvecs // 2 + k
    return result


def assert_converged_pairs_match(result: EigenResult, truth: np.ndarray, norm: float) -> None:
    """The documented bound |theta - lambda| <= tol * ||H|| for every converged pair (plus
    rounding in forming the matrix)."""
    size = len(result.eigenvectors[0]) if result.eigenvectors is not None else 60
    bound = result.tol * norm * 1.01 + 64 * size * np.finfo(float).eps * norm + 1e-300
    errors = np.abs(result.eigenvalues - truth)[result.converged]
    np.testing.assert_array_less(errors, bound)


def multiplicity(spectrum: np.ndarray, wanted: np.ndarray, norm: float) -> int:
    """The largest multiplicity in ``spectrum`` of a ``wanted`` value (within 1e-6 ||H||)."""
    return max(int((np.abs(spectrum - value) <= CLUSTER * norm).sum()) for value in wanted)


@SETTINGS
@given(problem=symmetric_matrices(), k=st.integers(1, 4), which=st.sampled_from(["LA", "SA"]))
def test_lanczos_matches_numpy(problem, k, which):
    matrix, spectrum = problem
    size = len(spectrum)
    k = min(k, size - 1)
    norm = float(np.abs(spectrum).max())
    numpy_values = np.linalg.eigvalsh(matrix)  # of the matrix as formed (rounding included)
    wanted = wanted_end(numpy_values, k + 1, which)
    block_size = multiplicity(numpy_values, wanted, norm)
    assume(fits(size, k, block_size))
    result = run_lanczos(matrix, k, which=which, block_size=block_size, seed=0)
    assert np.isfinite(result.eigenvectors).all()
    assert_converged_pairs_match(result, wanted[:k], norm)


@SETTINGS
@given(problem=symmetric_matrices())
def test_lanczos_both_ends_and_eigenvalue_only_mode(problem):
    matrix, spectrum = problem
    size = len(spectrum)
    norm = float(np.abs(spectrum).max())
    numpy_values = np.linalg.eigvalsh(matrix)
    ends = np.concatenate([numpy_values[:2], numpy_values[-2:]])
    block_size = multiplicity(numpy_values, np.concatenate([ends, numpy_values[[2, -3]]]), norm)
    assume(fits(size, 4, block_size))
    result = run_lanczos(
        matrix, 4, which="BE", block_size=block_size, seed=1, return_eigenvectors=False
    )
    assert result.eigenvectors is None and not result.residuals_are_true
    assert_converged_pairs_match(result, ends, norm)


@SETTINGS
@given(problem=symmetric_matrices(), spare=st.integers(0, 2))
def test_hutchpp_with_a_spanning_sketch_is_exact(problem, spare):
    """With 3n (+ up to 2) products the Hutch++ sketch spans the space: the estimate is the
    trace up to rounding, and the deflated Hutchinson part (hence the stderr) is rounding
    noise, whatever the spectrum."""
    matrix, spectrum = problem
    size = len(spectrum)
    norm = float(np.abs(spectrum).max())
    result = trace(matrix, 3 * size + spare, method="hutch++", seed=2)
    assert np.isfinite(result.estimate) and np.isfinite(result.stderr)
    assert result.num_matvecs == 3 * size + spare
    assert abs(result.estimate - np.trace(matrix)) <= 1e-9 * size * norm + 1e-300
    assert result.stderr <= 1e-9 * size * norm + 1e-300


@SETTINGS
@given(problem=symmetric_matrices(), steps=st.integers(1, 60))
def test_spectral_density_is_a_probability_density_on_the_spectrum(problem, steps):
    matrix, spectrum = problem
    size = len(spectrum)
    steps = min(steps, size)
    norm = float(np.abs(spectrum).max())
    result = spectral_density(matrix, num_runs=2, lanczos_steps=steps, grid_size=200, seed=3)
    assert np.isfinite(result.density).all() and (result.density >= 0).all()
    assert result.num_matvecs <= 2 * steps
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, rtol=1e-10)
    assert (
        np.trapezoid(result.density, result.grid) == np.float64(1.0)
        or abs(np.trapezoid(result.density, result.grid) - 1.0) < 1e-10
    )
    # Gauss nodes are Ritz values: inside the spectrum's range (up to rounding)
    slack = 1e-8 * max(norm, 1e-300)
    used = result.weights > 0
    assert (result.nodes[used] >= spectrum.min() - slack).all()
    assert (result.nodes[used] <= spectrum.max() + slack).all()


def test_properties_see_the_torch_path_too():
    """One torch-path run of the same strategy's kind of input (float32 operator)."""
    rng = np.random.default_rng(0)
    orthogonal, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    spectrum = np.concatenate([[5.0, 4.0, 3.0], rng.uniform(-1, 1, 27)])
    matrix = (orthogonal * spectrum) @ orthogonal.T
    result = lanczos(torch.from_numpy((matrix + matrix.T) / 2).float(), 3, which="LA", seed=0)
    assert torch.isfinite(result.eigenvectors).all()
    np.testing.assert_allclose(result.eigenvalues, [5.0, 4.0, 3.0], rtol=1e-4)
