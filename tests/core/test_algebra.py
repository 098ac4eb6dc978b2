"""Operator algebra that keeps torch: sums, differences, scalings, negations, chains, transposes,
shifts, identity and diagonal operators of curvature operators multiply torch tensors on the
device, match the same algebra on dense float64 matrices (built independently by
``torch_linop.reference``), stay scipy ``LinearOperator`` objects, and run in our solvers and scipy's."""

# ruff: noqa: E741  (I is the identity, as in the algebra it mirrors)
from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import scipy.sparse
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, aslinearoperator, cg, eigsh
from torch import nn

from torch_linop import (
    DiagonalOperator,
    GGNOperator,
    HessianOperator,
    IdentityOperator,
    TorchLinearOperator,
    lanczos,
    supervised_loss,
)
from torch_linop.algebra import ChainOperator, ScaledOperator, SumOperator
from torch_linop.reference import dense_ggn, dense_hessian
from torch_linop.solvers._operator import as_operator

DTYPE = torch.float64
TOLERANCE = 1e-10


class Operands:
    """H and G of the tiny MLP, an identity and a diagonal, and their dense float64 truths."""

    def __init__(self, case: Any) -> None:
        self.H = HessianOperator(case.model, case.data, case.loss)
        self.G = GGNOperator(case.model, case.data, case.loss)
        size = self.H.shape[0]
        self.I = IdentityOperator(size)
        generator = torch.Generator().manual_seed(3)
        self.diagonal = torch.rand(size, generator=generator, dtype=DTYPE) + 0.5
        self.D = DiagonalOperator(self.diagonal)
        self.dense = {
            "H": dense_hessian(case.model, case.data, case.loss),
            "G": dense_ggn(case.model, case.data, case.loss),
            "I": torch.eye(size, dtype=DTYPE),
            "D": torch.diag(self.diagonal),
        }


@pytest.fixture(scope="module")
def operands() -> Operands:
    """A tiny float64 MLP with cross-entropy on two uneven batches (module scope: the dense
    references are the slow part, and no test modifies the operands)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    generator = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(size, 4, generator=generator, dtype=DTYPE),
            torch.randint(0, 3, (size,), generator=generator),
        )
        for size in (5, 3)
    ]
    return Operands(SimpleNamespace(model=model, data=data, loss=supervised_loss(F.cross_entropy)))


Build = Callable[[Any, Any, Any, Any], Any]
# name -> (composite of H, G, I, D; the same on dense matrices; symmetric?)
COMPOSITES: dict[str, tuple[Build, Build, bool]] = {
    "sum": (lambda H, G, I, D: H + G, lambda H, G, I, D: H + G, True),
    "difference": (lambda H, G, I, D: H - G, lambda H, G, I, D: H - G, True),
    "scalar_left": (lambda H, G, I, D: 2.5 * H, lambda H, G, I, D: 2.5 * H, True),
    "scalar_right": (lambda H, G, I, D: G * -0.75, lambda H, G, I, D: -0.75 * G, True),
    "division": (lambda H, G, I, D: H / 4, lambda H, G, I, D: H / 4, True),
    "numpy_scalar": (lambda H, G, I, D: np.float64(3.0) * G, lambda H, G, I, D: 3 * G, True),
    "negation": (lambda H, G, I, D: -H, lambda H, G, I, D: -H, True),
    "chain": (lambda H, G, I, D: H @ G, lambda H, G, I, D: H @ G, False),
    "chain_by_star": (lambda H, G, I, D: H * G, lambda H, G, I, D: H @ G, False),
    "transpose": (lambda H, G, I, D: (H @ G).T, lambda H, G, I, D: (H @ G).T, False),
    "adjoint": (lambda H, G, I, D: (G @ H).H, lambda H, G, I, D: (G @ H).T, False),
    "transpose_method": (
        lambda H, G, I, D: (2 * H @ G - G).transpose(),
        lambda H, G, I, D: (2 * H @ G - G).T,
        False,
    ),
    "shift": (lambda H, G, I, D: H.shift(0.3), lambda H, G, I, D: H + 0.3 * I, True),
    "identity": (lambda H, G, I, D: I, lambda H, G, I, D: I, True),
    "diagonal": (lambda H, G, I, D: D, lambda H, G, I, D: D, True),
    "nested": (
        lambda H, G, I, D: 2 * H - G @ G + 1e-3 * I,
        lambda H, G, I, D: 2 * H - G @ G + 1e-3 * I,
        True,  # G @ G is a palindrome of one symmetric operator: provably symmetric
    ),
    "preconditioned": (lambda H, G, I, D: D @ H @ D, lambda H, G, I, D: D @ H @ D, True),
    "power": (lambda H, G, I, D: H**2, lambda H, G, I, D: H @ H, True),
    "scaled_chain": (
        lambda H, G, I, D: (0.5 * H) @ (G * 4) @ I,
        lambda H, G, I, D: 2 * H @ G,
        False,
    ),
    "sum_of_sums": (
        lambda H, G, I, D: (H + D) - (G - 2 * (H + I)) / 2,
        lambda H, G, I, D: (H + D) - (G - 2 * (H + I)) / 2,
        True,
    ),
}


@pytest.mark.parametrize("name", list(COMPOSITES))
def test_composites_keep_torch_and_match_dense_algebra(operands: Operands, name: str) -> None:
    build, build_dense, symmetric = COMPOSITES[name]
    composite = build(operands.H, operands.G, operands.I, operands.D)
    expected = build_dense(*(operands.dense[key] for key in "HGID"))
    assert isinstance(composite, TorchLinearOperator)
    assert isinstance(composite, LinearOperator)
    assert composite.is_symmetric is symmetric
    assert composite.shape == tuple(expected.shape)
    assert composite.torch_dtype == DTYPE and composite.device == operands.H.device

    generator = torch.Generator().manual_seed(7)
    block = torch.randn(composite.shape[1], 3, generator=generator, dtype=DTYPE)
    vector = block[:, 0].clone()
    for result, reference in (
        (composite @ block, expected @ block),
        (composite @ vector, expected @ vector),
        (composite.matmat(block), expected @ block),
        (composite.matvec(vector), expected @ vector),
        (composite(vector), expected @ vector),
    ):
        assert isinstance(result, torch.Tensor) and result.device == operands.H.device
        torch.testing.assert_close(result, reference, rtol=TOLERANCE, atol=TOLERANCE)

    numpy_block = block.numpy()
    for result, reference in (
        (composite @ numpy_block, expected @ block),
        (composite.matvec(numpy_block[:, 0]), expected @ vector),
        (composite.matvec(numpy_block[:, :1]), expected @ block[:, :1]),
        (composite.rmatvec(numpy_block[:, 0]), expected.T @ vector),
        (composite.rmatmat(numpy_block), expected.T @ block),
    ):
        assert type(result) is np.ndarray and result.shape == tuple(reference.shape)
        np.testing.assert_allclose(result, reference.numpy(), rtol=TOLERANCE, atol=TOLERANCE)


def test_transposes_of_symmetric_composites_are_themselves(operands: Operands) -> None:
    H, G, I, D = operands.H, operands.G, operands.I, operands.D
    for composite in (H + G, 2 * H, D @ H @ D, G.shift(1.0), I, D):
        assert composite.T is composite and composite.H is composite
    chain = H @ G
    assert isinstance(chain.T, ChainOperator) and chain.T.operators == (G, H)


def test_sums_flatten_and_scalars_fold(operands: Operands) -> None:
    H, G, I = operands.H, operands.G, operands.I
    many = H
    for index in range(9):
        many = many + (G if index % 2 else H)
    assert isinstance(many, SumOperator) and len(many.terms) == 10
    assert all(not isinstance(term, SumOperator) for _, term in many.terms)
    expected = 6 * operands.dense["H"] + 4 * operands.dense["G"]
    vector = torch.linspace(-1, 1, H.shape[0], dtype=DTYPE)
    torch.testing.assert_close(many @ vector, expected @ vector, rtol=TOLERANCE, atol=TOLERANCE)

    damped = 2 * H - G + 1e-3 * I
    assert [c for c, _ in damped.terms] == [2.0, -1.0, 1e-3]
    assert [op for _, op in damped.terms] == [H, G, I]
    halved = damped / 2
    assert [c for c, _ in halved.terms] == [1.0, -0.5, 5e-4]
    scaled_twice = 3 * (2 * H)
    assert isinstance(scaled_twice, ScaledOperator) and scaled_twice.scale == 6.0
    chained = (2 * H) @ (G @ (3 * G))  # one flat chain, the scale in front
    assert isinstance(chained, ScaledOperator) and chained.scale == 6.0
    assert chained.operator.operators == (H, G, G)
    assert (I @ H) is H and (H @ I) is H


def test_products_keep_inference_and_no_grad_callers_working(operands: Operands) -> None:
    composite = operands.H.shift(0.1) - operands.G
    expected = (operands.dense["H"] + 0.1 * operands.dense["I"] - operands.dense["G"])[:, 0]
    unit = torch.zeros(composite.shape[0], dtype=DTYPE)
    unit[0] = 1.0
    with torch.inference_mode():
        inference_unit = unit.clone()
        result = composite @ inference_unit
    torch.testing.assert_close(result, expected, rtol=TOLERANCE, atol=TOLERANCE)
    with torch.no_grad():
        torch.testing.assert_close(composite @ unit, expected, rtol=TOLERANCE, atol=TOLERANCE)
    # the identity term never hands back (or writes into) the caller's tensor
    assert (operands.I @ unit) is not unit and float(unit[0]) == 1.0


def test_lanczos_and_eigsh_on_a_sum_agree_with_eigvalsh(operands: Operands) -> None:
    total = operands.H + operands.G
    assert as_operator(total).returns_numpy is False  # our solvers take the torch path
    eigenvalues = np.linalg.eigvalsh((operands.dense["H"] + operands.dense["G"]).numpy())
    largest_magnitude = np.sort(eigenvalues[np.argsort(-np.abs(eigenvalues))[:3]])

    result = lanczos(total, k=3, seed=0)
    assert result.converged.all()
    assert isinstance(result.eigenvectors, torch.Tensor)  # the torch path: vectors stay torch
    computed = np.sort(np.asarray(result.eigenvalues))
    np.testing.assert_allclose(computed, largest_magnitude, rtol=0, atol=1e-8)

    start = np.random.default_rng(0).standard_normal(total.shape[0])
    arpack = eigsh(total, k=3, which="LM", tol=0, v0=start, return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(arpack), largest_magnitude, rtol=0, atol=1e-8)


def test_cg_on_a_damped_ggn_through_scipy(operands: Operands) -> None:
    damped = operands.G + 1e-3 * operands.I
    rhs = np.random.default_rng(1).standard_normal(damped.shape[0])
    solution, info = cg(damped, rhs, rtol=1e-12, maxiter=5000)
    assert info == 0
    dense = (operands.dense["G"] + 1e-3 * operands.dense["I"]).numpy()
    np.testing.assert_allclose(dense @ solution, rhs, rtol=0, atol=1e-8)
    torch_solution = torch.from_numpy(solution)
    shifted = operands.G.shift(1e-3)
    torch.testing.assert_close(shifted @ torch_solution, torch.from_numpy(rhs), atol=1e-8, rtol=0)


def test_foreign_scipy_operands_keep_scipy_numpy_semantics(operands: Operands) -> None:
    H = operands.H
    size = H.shape[0]
    foreign = aslinearoperator(scipy.sparse.identity(size))
    x = np.random.default_rng(2).standard_normal(size)
    expected = (operands.dense["H"] + operands.dense["I"]).numpy() @ x
    for composite in (H + foreign, foreign + H, H - (-1 * foreign)):
        assert isinstance(composite, LinearOperator)
        assert not isinstance(composite, TorchLinearOperator)
        np.testing.assert_allclose(composite @ x, expected, rtol=TOLERANCE, atol=TOLERANCE)
    chain = H @ foreign
    assert not isinstance(chain, TorchLinearOperator)
    np.testing.assert_allclose(chain.matvec(x), operands.dense["H"].numpy() @ x, rtol=1e-12)
    # a foreign operand inside one of our sums: the outer sum falls back to scipy as well
    nested = (H + operands.G) + foreign
    assert not isinstance(nested, TorchLinearOperator)
    np.testing.assert_allclose(
        nested @ x,
        (operands.dense["H"] + operands.dense["G"] + operands.dense["I"]).numpy() @ x,
        rtol=TOLERANCE,
        atol=TOLERANCE,
    )


def test_numpy_path_shapes_and_dtypes(operands: Operands) -> None:
    composite = operands.H + operands.D
    size = composite.shape[0]
    expected = (operands.dense["H"] + operands.dense["D"]).numpy()
    x = np.arange(size, dtype=np.float64) / size
    assert composite.matvec(x.reshape(size, 1)).shape == (size, 1)
    assert composite.matmat(np.stack([x, x], axis=1)).shape == (size, 2)
    as_float32 = composite.matvec(x.astype(np.float32))
    assert as_float32.dtype == np.float32
    np.testing.assert_allclose(as_float32, expected @ x.astype(np.float32), rtol=1e-5)
    from_ints = composite.matvec(np.ones(size, dtype=np.int64))
    assert from_ints.dtype == np.float64
    np.testing.assert_allclose(from_ints, expected.sum(axis=1), rtol=1e-12)
    from_list = composite.matvec(list(x))  # scipy's own wrapper, then our numpy hook
    np.testing.assert_allclose(from_list, expected @ x, rtol=1e-12)
    empty = composite @ torch.zeros(size, 0, dtype=DTYPE)
    assert empty.shape == (size, 0)
    with pytest.raises(ValueError, match=rf"dimension mismatch.*vectors of shape \({size},\)"):
        composite.matvec(np.zeros(size + 1))
    with pytest.raises(ValueError, match=rf"dimension mismatch.*matrices of shape \({size}, k\)"):
        composite.matmat(np.zeros((size - 1, 2)))
    with pytest.raises(ValueError, match="expected 2-d ndarray"):
        composite.matmat(np.zeros(size))
    with pytest.raises(ValueError, match="NaN or Inf"):
        composite.matvec(np.full(size, np.nan))
    with pytest.raises(TypeError, match="complex vectors are not supported"):
        composite.matvec(np.zeros(size, dtype=np.complex128))


def test_bad_compositions_and_inputs_get_clear_errors(operands: Operands) -> None:
    H = operands.H
    size = H.shape[0]
    with pytest.raises(ValueError, match=r"cannot add a HessianOperator of shape .* summands"):
        H + IdentityOperator(size + 1)
    with pytest.raises(TypeError, match=r"torch.float32 IdentityOperator.*one dtype"):
        H + IdentityOperator(size, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"on cpu and a IdentityOperator on meta"):
        H - IdentityOperator(size, device="meta")
    with pytest.raises(ValueError, match=r"cannot chain a HessianOperator of shape .* needs"):
        H @ DiagonalOperator(torch.ones(size - 1, dtype=DTYPE))
    with pytest.raises(ValueError, match="shift.*needs a square operator"):
        _Dense(torch.ones(2, 3, dtype=DTYPE)).shift(1.0)
    with pytest.raises(ValueError, match="size must be a positive int"):
        IdentityOperator(0)
    with pytest.raises(TypeError, match="shift.*needs a real scalar"):
        H.shift("0.1")
    with pytest.raises(ValueError, match="non-empty 1-d torch.Tensor"):
        DiagonalOperator(torch.ones(2, 2))
    with pytest.raises(TypeError, match="floating dtype"):
        DiagonalOperator(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ZeroDivisionError):
        H / 0
    composite = H + operands.G
    with pytest.raises(ValueError, match=rf"expected a vector of shape \({size},\).*\(7,\)"):
        composite @ torch.zeros(7, dtype=DTYPE)
    with pytest.raises(TypeError, match="torch.float32 does not match the operator's"):
        composite @ torch.zeros(size, dtype=torch.float32)
    with pytest.raises(ValueError, match="matvec expects a vector"):
        composite.matvec(torch.zeros(size, 2, dtype=DTYPE))
    with pytest.raises(ValueError, match="Scalar operands are not allowed"):
        composite @ 2.0
    nan_diagonal = DiagonalOperator(torch.full((size,), float("nan"), dtype=DTYPE))
    with pytest.raises(ValueError, match="SumOperator product is not finite.*the diagonal"):
        (H + nan_diagonal) @ torch.ones(size, dtype=DTYPE)


def test_vector_spaces_are_forwarded_and_never_mixed(operands: Operands) -> None:
    size = operands.H.shape[0]
    space, other_space = object(), object()
    D = DiagonalOperator(operands.diagonal, vector_space=space)
    assert operands.H.vector_space is None
    for composite in (operands.H + D, D @ operands.H @ D, 2 * D, -D, D.shift(1.0), D.T, D**0):
        assert composite.vector_space is space
    assert (operands.H + operands.G).vector_space is None
    other = IdentityOperator(size, vector_space=other_space)
    with pytest.raises(ValueError, match="different vector spaces"):
        D + other
    with pytest.raises(ValueError, match="different vector spaces"):
        D @ other


class _Dense(TorchLinearOperator):
    """A dense, possibly rectangular matrix: a subclass with the one hook and an adjoint."""

    def __init__(self, matrix: torch.Tensor, with_adjoint: bool = True) -> None:
        self.matrix = matrix
        self.with_adjoint = with_adjoint
        super().__init__(tuple(matrix.shape), matrix.dtype, matrix.device)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self.matrix @ X

    def _adjoint_torch_operator(self) -> TorchLinearOperator | None:
        return _Dense(self.matrix.T) if self.with_adjoint else None


def test_subclasses_with_one_hook_get_the_whole_interface() -> None:
    generator = torch.Generator().manual_seed(5)
    matrix = torch.randn(4, 6, generator=generator, dtype=DTYPE)
    A = _Dense(matrix)
    assert A.dtype == np.float64 and A.shape == (4, 6)
    x = torch.randn(6, generator=generator, dtype=DTYPE)
    y = torch.randn(4, generator=generator, dtype=DTYPE)
    torch.testing.assert_close(A @ x, matrix @ x, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(A.rmatvec(y), matrix.T @ y, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(y @ A, y @ matrix, rtol=1e-14, atol=1e-14)  # row vector, torch
    rows = torch.randn(2, 4, generator=generator, dtype=DTYPE)
    torch.testing.assert_close(rows @ A, rows @ matrix, rtol=1e-14, atol=1e-14)
    assert IdentityOperator(np.int64(6)).shape == (6, 6)
    gram = A.T @ A  # (6, 6), not provably symmetric from its factors
    assert gram.shape == (6, 6) and not gram.is_symmetric
    torch.testing.assert_close(gram.shift(2.0) @ x, (matrix.T @ matrix) @ x + 2 * x)
    np.testing.assert_allclose(A.H.matvec(y.numpy()), (matrix.T @ y).numpy(), rtol=1e-14)
    as_float32 = A.to_scipy(np.float32)
    assert as_float32.matvec(x.numpy()).dtype == np.float32
    np.testing.assert_allclose(as_float32.rmatvec(y.numpy()), (matrix.T @ y).numpy(), rtol=1e-6)
    without_adjoint = _Dense(matrix, with_adjoint=False)
    with pytest.raises(NotImplementedError, match="_Dense has no adjoint.*_adjoint_torch_operator"):
        _ = without_adjoint.T
    with pytest.raises(NotImplementedError, match="_Dense has no adjoint"):
        _ = (2 * without_adjoint).H


class _ProtocolMatrix:
    """A user-written curvlinops-style operator: shape, dtype, device, @ on tensors, adjoint(),
    and chaining from the right (``ours @ theirs``) through ``__rmatmul__``."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.shape = tuple(matrix.shape)
        self.dtype = matrix.dtype
        self.device = matrix.device

    def __matmul__(self, x: Any) -> Any:
        return self.matrix @ x

    def __rmatmul__(self, other: Any) -> Any:
        return ("chained", other, self)

    def adjoint(self) -> _ProtocolMatrix:
        return _ProtocolMatrix(self.matrix.T)


def test_ours_at_a_foreign_protocol_operator_defers_to_its_rmatmul(operands: Operands) -> None:
    """``H @ theirs`` is left to ``theirs.__rmatmul__`` (scipy's ``dot`` would fail on it)."""
    theirs = _ProtocolMatrix(operands.dense["D"])
    assert operands.H @ theirs == ("chained", operands.H, theirs)
