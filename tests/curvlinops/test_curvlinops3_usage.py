"""curvlinops 3's documented usage, run unchanged on the drop-in and on curvlinops itself.

Every test takes ``library`` (``torch_linop.curvlinops`` or ``curvlinops``; the latter skipped
when it is absent) and checks against truths built here with ``torch.func`` on float64 copies
of a tiny model: operators from ``(model_func, loss_func, params, data)`` on a float32 model,
``to_scipy()`` with ``eigsh``/``cg`` (float64 by default), algebra with a user-written
curvlinops-style operator, and every estimator on a non-symmetric matrix with the fewest
products each accepts.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
from typing import Any

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import cg, eigsh
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

import torch_linop.curvlinops as ours
from torch_linop import trace as our_trace
from torch_linop.solvers import diagonal as our_diagonal

HAVE_CURVLINOPS = importlib.util.find_spec("curvlinops") is not None
LIBRARIES = [
    pytest.param("torch_linop.curvlinops", id="drop-in"),
    pytest.param(
        "curvlinops",
        id="curvlinops",
        marks=pytest.mark.skipif(not HAVE_CURVLINOPS, reason="curvlinops is not installed"),
    ),
]
NUM_DATA, NUM_CLASSES = 10, 3


@pytest.fixture(params=LIBRARIES)
def library(request: pytest.FixtureRequest) -> Any:
    return importlib.import_module(request.param)


def base_class(library: Any) -> type:
    """The library's ``PyTorchLinearOperator`` (where curvlinops 3 keeps it)."""
    return importlib.import_module(f"{library.__name__}._torch_base").PyTorchLinearOperator


# ---------------------------------------------------------------------- model, data, truths
def setup() -> tuple[nn.Module, nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A float32 MLP, mean cross-entropy and two uneven batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, NUM_CLASSES))
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(NUM_DATA, 3, generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (NUM_DATA,), generator=generator)
    return model, nn.CrossEntropyLoss(), [(inputs[:6], targets[:6]), (inputs[6:], targets[6:])]


def truths(model: nn.Module, data: list) -> dict[str, torch.Tensor]:
    """Dense float64 Hessian, GGN, empirical Fisher and Jacobian from ``torch.func``."""
    inputs = torch.cat([x for x, _ in data]).double()
    targets = torch.cat([y for _, y in data])
    named = {name: p.detach().double() for name, p in model.named_parameters()}
    shapes = [p.shape for p in named.values()]
    flat = torch.cat([p.flatten() for p in named.values()])
    model64 = copy.deepcopy(model).double()

    def unflatten(vector: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = [s.numel() for s in shapes]
        return {n: c.reshape(s) for n, c, s in zip(named, vector.split(sizes), shapes)}

    def outputs(vector: torch.Tensor, x: torch.Tensor = inputs) -> torch.Tensor:
        return functional_call(model64, unflatten(vector), (x,))

    def loss(vector: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs(vector), targets)

    jacobian = jacrev(outputs)(flat)  # (N, C, D)
    probabilities = outputs(flat).softmax(-1)
    output_hessian = (
        torch.diag_embed(probabilities) - probabilities[:, :, None] * probabilities[:, None, :]
    )
    ggn = torch.einsum("ncd,nce,nef->df", jacobian, output_hessian, jacobian) / NUM_DATA

    def sample_loss(vector: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs(vector, x[None]), y[None])

    gradients = vmap(jacrev(sample_loss), in_dims=(None, 0, 0))(flat, inputs, targets)
    return {
        "HessianLinearOperator": hessian(loss)(flat),
        "GGNLinearOperator": ggn,
        "EFLinearOperator": gradients.T @ gradients / NUM_DATA,
        "JacobianLinearOperator": jacobian.reshape(-1, flat.numel()),
        "per-sample gradients": gradients,
    }


@functools.cache
def reference() -> dict[str, torch.Tensor]:
    """:func:`truths` of :func:`setup` (deterministic), computed once per session."""
    model, _, data = setup()
    return truths(model, data)


def dense(operator: Any) -> torch.Tensor:
    """The operator's matrix in float64 from products with the identity's columns."""
    identity = torch.eye(operator.shape[1], dtype=operator.dtype, device=operator.device)
    return (operator @ identity).double()


CURVATURE = ("HessianLinearOperator", "GGNLinearOperator", "EFLinearOperator")
FLOAT32 = 2e-5  # relative error of a float32 product against the float64 truth


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    scale = max(1.0, float(expected.abs().max()))
    assert float((actual.double() - expected.double()).abs().max()) <= tolerance * scale


# ---------------------------------------------------------------------- operators
@pytest.mark.parametrize("name", CURVATURE)
def test_each_operator_in_its_dtype_and_in_float64_through_scipy(library: Any, name: str) -> None:
    model, loss, data = setup()
    params = [p for p in model.parameters() if p.requires_grad]
    A = getattr(library, name)(model, loss, params, data)
    truth = reference()[name]
    assert A.dtype == torch.float32 and A.device == torch.device("cpu")
    v = torch.rand(A.shape[1], dtype=A.dtype, device=A.device)  # curvlinops' own idiom
    assert_close(A @ v, truth @ v.double(), FLOAT32)
    assert A.adjoint() is A

    as_list = [p.detach().clone() for p in params]
    product = A @ as_list
    assert [t.shape for t in product] == [p.shape for p in params]
    expected = truth @ torch.cat([t.flatten() for t in as_list]).double()
    assert_close(torch.cat([t.flatten() for t in product]), expected, FLOAT32)
    columns = [torch.stack([t, -t], dim=-1) for t in as_list]  # trailing column axis
    assert [t.shape for t in A @ columns] == [(*p.shape, 2) for p in params]

    as_scipy = A.to_scipy()
    assert as_scipy.dtype == np.float64  # numpy's default, whatever the model's dtype
    top = eigsh(as_scipy, k=3, which="LA", return_eigenvectors=False)
    assert top.dtype == np.float64
    top_truth = torch.linalg.eigvalsh(truth)[-3:]
    assert_close(torch.as_tensor(np.sort(top)), top_truth, 1e-4)
    assert A.to_scipy(np.float32).dtype == np.float32


def test_jacobian_and_its_adjoint(library: Any) -> None:
    model, _, data = setup()
    params = list(model.parameters())
    J = library.JacobianLinearOperator(model, params, data)
    truth = reference()["JacobianLinearOperator"]
    assert J.shape == tuple(truth.shape) and J.dtype == torch.float32
    assert_close(dense(J), truth, FLOAT32)
    JT = library.TransposedJacobianLinearOperator(model, params, data)
    assert_close(dense(JT), truth.T, FLOAT32)
    assert_close(dense(J.adjoint()), truth.T, FLOAT32)
    vector = np.random.default_rng(0).standard_normal(J.shape[0])
    np.testing.assert_allclose(
        J.to_scipy().rmatvec(vector), truth.T.numpy() @ vector, rtol=1e-4, atol=1e-4
    )


def test_monte_carlo_fisher_is_a_fixed_symmetric_psd_matrix(library: Any) -> None:
    model, loss, data = setup()
    F = library.FisherMCLinearOperator(model, loss, list(model.parameters()), data, seed=3)
    matrix = dense(F)
    assert F.dtype == torch.float32 and torch.equal(matrix, dense(F))
    assert_close(matrix, matrix.T, 1e-6)
    assert float(torch.linalg.eigvalsh(matrix).min()) > -1e-5
    (top,) = eigsh(F.to_scipy(), k=1, which="LA", return_eigenvectors=False)
    assert abs(top - float(torch.linalg.eigvalsh(matrix)[-1])) < 1e-4 * max(1.0, top)


def identity_class(library: Any) -> type:
    """A user-written curvlinops 3 operator: ``scale * I`` on the parameters' tensor list."""

    class ScaledIdentity(base_class(library)):  # type: ignore[misc]
        SELF_ADJOINT = True

        def __init__(self, shapes: list, scale: float, dtype: torch.dtype) -> None:
            super().__init__(shapes, shapes)
            self.scale, self._dtype = scale, dtype

        def _matmat(self, X: list[torch.Tensor]) -> list[torch.Tensor]:
            return [self.scale * x for x in X]

        @property
        def device(self) -> torch.device:
            return torch.device("cpu")

        @property
        def dtype(self) -> torch.dtype:
            return self._dtype

    return ScaledIdentity


def test_damped_ggn_with_cg_and_fisher_sums(library: Any) -> None:
    """``G + damping * IdentityLinearOperator(...)`` solved with scipy's ``cg``, and
    ``fisher_sum += fisher`` accumulated over data sets."""
    model, loss, data = setup()
    params = list(model.parameters())
    shapes = [tuple(p.shape) for p in params]
    G = library.GGNLinearOperator(model, loss, params, data)
    damping = 1e-2
    damped = G + damping * identity_class(library)(shapes, 1.0, G.dtype)
    truth = reference()
    damped_truth = truth["GGNLinearOperator"] + damping * torch.eye(G.shape[0], dtype=torch.float64)
    gradient = np.random.default_rng(1).standard_normal(G.shape[0])
    step, info = cg(damped.to_scipy(), gradient, rtol=1e-10, maxiter=1000)
    assert info == 0
    expected = np.linalg.solve(damped_truth.numpy(), gradient)
    np.testing.assert_allclose(step, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())

    fisher_sum = library.EFLinearOperator(model, loss, params, data[:1])
    for batch in data[1:]:
        fisher_sum += library.EFLinearOperator(model, loss, params, [batch])
    gradients = truth["per-sample gradients"]  # each batch's EF is the mean over its samples
    expected_sum = sum(
        part.T @ part / part.shape[0] for part in gradients.split([len(y) for _, y in data])
    )
    as_list = [torch.ones_like(p) for p in params]
    product = fisher_sum @ as_list
    assert isinstance(product, list) and [t.shape for t in product] == [p.shape for p in params]
    ones = torch.ones(G.shape[0], dtype=torch.float64)
    assert_close(torch.cat([t.flatten() for t in product]), expected_sum @ ones, FLOAT32)


def test_submatrix_and_inverses_of_a_damped_ggn(library: Any) -> None:
    model, loss, data = setup()
    params = list(model.parameters())
    shapes = [tuple(p.shape) for p in params]
    G = library.GGNLinearOperator(model, loss, params, data)
    G_truth = reference()["GGNLinearOperator"]
    rows, cols = [0, 5, 3, 20], [7, 1, 2]
    sub = library.SubmatrixLinearOperator(G, rows, cols)
    assert sub.shape == (4, 3) and sub.dtype == torch.float32
    assert_close(dense(sub), G_truth[rows][:, cols], FLOAT32)
    assert_close(dense(sub.adjoint()), G_truth[rows][:, cols].T, FLOAT32)
    np.testing.assert_allclose(
        sub.to_scipy() @ np.ones(3), G_truth[rows][:, cols].sum(1).numpy(), rtol=1e-4, atol=1e-5
    )

    damping = 0.5
    damped = G + damping * identity_class(library)(shapes, 1.0, G.dtype)
    damped_truth = G_truth + damping * torch.eye(G.shape[0], dtype=torch.float64)
    rhs = torch.randn(G.shape[0], 2, generator=torch.Generator().manual_seed(11))
    solution = torch.linalg.solve(damped_truth, rhs.double())
    spectrum = torch.linalg.eigvalsh(damped_truth)
    scale = 2 / float(spectrum[0] + spectrum[-1])  # the fastest Neumann series
    inverses = {
        "cg": library.CGInverseLinearOperator(damped, tolerance=1e-6, max_iter=100),
        "lsmr": library.LSMRInverseLinearOperator(damped, atol=1e-7, btol=1e-7, maxiter=100),
        "neumann": library.NeumannInverseLinearOperator(damped, num_terms=30, scale=scale),
    }
    for what, inverse in inverses.items():
        result = inverse @ rhs
        assert isinstance(result, torch.Tensor) and result.dtype == torch.float32, what
        assert_close(result, solution, 1e-3)
    listed = inverses["cg"] @ [torch.ones(*p.shape, 1) for p in params]  # parameter spaces
    assert [t.shape for t in listed] == [(*p.shape, 1) for p in params]
    flat = torch.cat([t.flatten() for t in listed])
    assert_close(flat, torch.linalg.solve(damped_truth, torch.ones(G.shape[0]).double()), 1e-3)


def user_matrix_operator(library: Any, matrix: torch.Tensor, shapes: list) -> Any:
    """A user-written, non-symmetric curvlinops 3 operator ``matrix`` on tensor lists."""

    class DenseOperator(base_class(library)):  # type: ignore[misc]
        def __init__(self, matrix: torch.Tensor, shapes: list) -> None:
            super().__init__(shapes, shapes)
            self.matrix = matrix

        def _matmat(self, X: list[torch.Tensor]) -> list[torch.Tensor]:
            flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in X])
            result = self.matrix @ flat
            sizes = [int(np.prod(s)) for s in shapes]
            return [r.reshape(*s, -1) for r, s in zip(result.split(sizes), shapes)]

        def _adjoint(self) -> DenseOperator:
            return DenseOperator(self.matrix.T, shapes)

        @property
        def device(self) -> torch.device:
            return self.matrix.device

        @property
        def dtype(self) -> torch.dtype:
            return self.matrix.dtype

    return DenseOperator(matrix, shapes)


def test_algebra_with_a_user_written_operator(library: Any) -> None:
    model, loss, data = setup()
    params = list(model.parameters())
    shapes = [tuple(p.shape) for p in params]
    H = library.HessianLinearOperator(model, loss, params, data)
    H_truth = reference()["HessianLinearOperator"]
    generator = torch.Generator().manual_seed(2)
    M_truth = torch.randn(H.shape[0], H.shape[0], generator=generator, dtype=torch.float64)
    M = user_matrix_operator(library, M_truth.float(), shapes)
    combinations = {
        "ours + theirs": (H + M, H_truth + M_truth),
        "theirs + ours": (M + H, M_truth + H_truth),
        "difference": (H - M, H_truth - M_truth),
        "scalar multiples": (2.0 * H + M * 0.5, 2.0 * H_truth + 0.5 * M_truth),
        "chain": (H @ M, H_truth @ M_truth),
        "reverse chain": (M @ H, M_truth @ H_truth),
        "longer chain": (M @ (H + M) @ H, M_truth @ (H_truth + M_truth) @ H_truth),
        "adjoint": ((H @ M).adjoint(), (H_truth @ M_truth).T),
    }
    vector = torch.randn(H.shape[0], generator=generator)
    for what, (operator, truth) in combinations.items():
        assert operator.shape == H.shape and operator.dtype == torch.float32, what
        product = operator @ vector
        assert isinstance(product, torch.Tensor), what
        assert_close(product, truth @ vector.double(), 1e-4)
        as_list = [
            t.reshape(p.shape) for t, p in zip(vector.split([p.numel() for p in params]), params)
        ]
        listed = operator @ as_list
        assert [t.shape for t in listed] == [p.shape for p in params], what
        assert_close(torch.cat([t.flatten() for t in listed]), truth @ vector.double(), 1e-4)
        assert operator.to_scipy().dtype == np.float64


def test_the_drop_in_mixes_with_curvlinops_classes() -> None:
    """Our operators and curvlinops' own in one expression, both orders where curvlinops allows
    (its ``@`` accepts only its own class on the right, so ``theirs @ ours`` raises there)."""
    curvlinops = pytest.importorskip("curvlinops")
    model, loss, data = setup()
    params = list(model.parameters())
    H = ours.HessianLinearOperator(model, loss, params, data)
    G = curvlinops.GGNLinearOperator(model, loss, params, data)
    truth = reference()
    H_truth, G_truth = truth["HessianLinearOperator"], truth["GGNLinearOperator"]
    vector = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(3))
    for operator, expected in [
        (H + G, H_truth + G_truth),
        (G + H, G_truth + H_truth),  # curvlinops' own _SumPyTorchLinearOperator over ours
        (G - 0.5 * H, G_truth - 0.5 * H_truth),
        (H @ G, H_truth @ G_truth),
    ]:
        assert_close(operator @ vector, expected @ vector.double(), 1e-4)
        assert operator.to_scipy().dtype == np.float64


class DuckOperator:
    """Only the protocol: ``shape``, ``dtype``, ``device``, ``@`` on tensors, ``adjoint()``."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix, self.shape = matrix, tuple(matrix.shape)
        self.dtype, self.device = matrix.dtype, matrix.device

    def __matmul__(self, other: Any) -> Any:
        if not isinstance(other, torch.Tensor):
            return NotImplemented  # operators on the right compose through their __rmatmul__
        return self.matrix @ other

    def adjoint(self) -> DuckOperator:
        return DuckOperator(self.matrix.T)


def test_the_drop_in_composes_with_protocol_only_operators() -> None:
    model, loss, data = setup()
    params = list(model.parameters())
    G = ours.GGNLinearOperator(model, loss, params, data)
    G_truth = reference()["GGNLinearOperator"]
    M_truth = torch.randn(G.shape[0], G.shape[0], generator=torch.Generator().manual_seed(4))
    M = DuckOperator(M_truth)
    vector = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(5))
    for operator, expected in [
        (G + M, G_truth + M_truth.double()),
        (M + G, M_truth.double() + G_truth),
        (M @ G, M_truth.double() @ G_truth),
        (3.0 * (G - M), 3.0 * (G_truth - M_truth.double())),
        ((G @ M).adjoint(), (G_truth @ M_truth.double()).T),
    ]:
        assert_close(operator @ vector, expected @ vector.double(), 1e-4)
        as_list = [torch.ones_like(p) for p in params]
        flat = torch.cat([t.flatten() for t in operator @ as_list])
        assert_close(flat, expected @ torch.ones(G.shape[0], dtype=torch.float64), 1e-4)
    with pytest.raises(ValueError, match="Dtypes"):
        G + DuckOperator(M_truth.double())


# ---------------------------------------------------------------------- estimators
SIZE = 30


def non_symmetric() -> torch.Tensor:
    """A float64 matrix with a decaying spectrum plus a large skew-symmetric part."""
    generator = torch.Generator().manual_seed(6)
    basis, _ = torch.linalg.qr(torch.randn(SIZE, SIZE, generator=generator, dtype=torch.float64))
    symmetric = basis @ torch.diag(torch.logspace(1, -2, SIZE, dtype=torch.float64)) @ basis.T
    skew = torch.randn(SIZE, SIZE, generator=generator, dtype=torch.float64)
    return symmetric + (skew - skew.T) + torch.diag(torch.linspace(-1, 1, SIZE).double())


# (name, fewest products curvlinops accepts)
ESTIMATORS = [
    ("hutchinson_trace", 1),
    ("hutchpp_trace", 3),
    ("xtrace", 2),
    ("hutchinson_diag", 1),
    ("xdiag", 2),
    ("hutchinson_squared_fro", 1),
]
HUTCHINSON = ("hutchinson_trace", "hutchinson_diag", "hutchinson_squared_fro")
# sketching estimators and a budget whose sketch (4 vectors) spans a rank-3 matrix's range
SKETCHING = [("hutchpp_trace", 12), ("xtrace", 8), ("xdiag", 8)]


def truth_of(name: str, matrix: torch.Tensor) -> torch.Tensor:
    if name.endswith("diag"):
        return torch.diag(matrix)
    if name.endswith("fro"):
        return (matrix**2).sum()
    return matrix.trace()


@pytest.mark.parametrize(("name", "fewest"), ESTIMATORS)
def test_estimators_take_non_symmetric_operators_and_the_fewest_products(
    library: Any, name: str, fewest: int
) -> None:
    matrix = non_symmetric()
    assert float((matrix - matrix.T).abs().max()) > 1.0
    shapes = [(5, 2), (SIZE - 10,)]
    estimator = getattr(library, name)
    truth = truth_of(name, matrix)
    for operand in (matrix, user_matrix_operator(library, matrix, shapes)):
        torch.manual_seed(7)
        estimate = estimator(operand, fewest)
        assert isinstance(estimate, torch.Tensor) and estimate.dtype == torch.float64
        assert estimate.shape == truth.shape and estimate.device == matrix.device
        assert bool(torch.isfinite(estimate).all())
    if name not in HUTCHINSON:
        return
    for distribution in ("rademacher", "normal"):  # unbiased: one-probe estimates average out
        torch.manual_seed(8)
        repeats = 300
        estimates = torch.stack([estimator(matrix, 1, distribution) for _ in range(repeats)])
        error = (estimates.mean(0) - truth).abs()
        standard_error = estimates.std(0) / repeats**0.5
        assert bool((error <= 5 * standard_error + 1e-9).all()), (name, float(error.max()))


@pytest.mark.parametrize(("name", "budget"), SKETCHING)
def test_sketching_estimators_are_exact_on_non_symmetric_low_rank_matrices(
    library: Any, name: str, budget: int
) -> None:
    """With a sketch spanning the range of a rank-3 non-symmetric ``A``, Hutch++, XTrace and
    XDiag are exact (each uses ``A`` and ``A^T`` as they are, never ``A = A^T``)."""
    generator = torch.Generator().manual_seed(9)
    left, right = (torch.randn(SIZE, 3, generator=generator, dtype=torch.float64) for _ in "lr")
    matrix = left @ right.T
    truth = truth_of(name, matrix)
    for operand in (matrix, user_matrix_operator(library, matrix, [(SIZE,)])):
        torch.manual_seed(10)
        estimate = getattr(library, name)(operand, budget)
        assert_close(estimate, truth, 1e-9)


def test_estimators_reject_what_curvlinops_rejects(library: Any) -> None:
    matrix = non_symmetric()
    with pytest.raises(ValueError, match="less than"):
        library.hutchinson_trace(matrix, SIZE)
    with pytest.raises(ValueError, match="divisible by 3"):
        library.hutchpp_trace(matrix, 4)
    with pytest.raises(ValueError, match="divisible by 2"):
        library.xdiag(matrix, 3)
    with pytest.raises(ValueError, match="square"):
        library.xtrace(matrix[:10], 2)


def test_spectral_density_of_an_operator(library: Any) -> None:
    model, loss, data = setup()
    G = library.GGNLinearOperator(model, loss, list(model.parameters()), data)
    eigenvalues = torch.linalg.eigvalsh(reference()["GGNLinearOperator"])
    torch.manual_seed(9)
    boundaries = (float(eigenvalues[0]), float(eigenvalues[-1]))  # skips eigsh on a singular G
    grid, density = library.lanczos_approximate_spectrum(
        G, 12, num_points=256, num_repeats=3, boundaries=boundaries
    )
    assert isinstance(density, torch.Tensor) and grid.shape == density.shape == (256,)
    assert float(grid[0]) <= float(eigenvalues[0]) and float(grid[-1]) >= float(eigenvalues[-1])
    assert abs(float(torch.trapezoid(density, grid)) - 1.0) < 0.1


def test_our_solvers_take_non_symmetric_operators_and_one_probe() -> None:
    """``torch_linop.trace``/``diagonal``: plain Hutchinson is valid for any square operator, and
    one probe gives an estimate with a NaN standard error."""
    matrix = non_symmetric()
    single = our_trace(matrix, 1, method="hutchinson", seed=0)
    assert single.num_matvecs == 1 and np.isnan(single.stderr) and np.isfinite(single.estimate)
    estimates = [our_trace(matrix, 10, method="hutchinson", seed=s) for s in range(60)]
    mean = np.mean([e.estimate for e in estimates])
    spread = np.std([e.estimate for e in estimates]) / np.sqrt(len(estimates))
    assert abs(mean - float(matrix.trace())) < 5 * spread
    stderrs = np.array([e.stderr for e in estimates])
    assert np.all(np.isfinite(stderrs))
    one_probe = our_diagonal(matrix.numpy(), 1, method="hutchinson", seed=0)
    assert isinstance(one_probe.estimate, np.ndarray) and np.isnan(one_probe.stderr).all()
    with pytest.raises(ValueError, match="not symmetric"):
        our_trace(matrix, 9, method="hutch++", seed=0)  # its own methods still ask for symmetry
