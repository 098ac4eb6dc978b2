"""Identity, diagonal and composite torch operators: the results of ``A + B``, ``c * A``,
``A @ B``, ``A.T`` and ``A.shift(sigma)`` on :class:`TorchLinearOperator` objects.

Composites multiply torch tensors by calling their operands' ``_matmat_torch``, so
``(H + 1e-3 * I) @ t`` never leaves the device; they are scipy ``LinearOperator`` objects too, and an
operand's products run once per composite product. Shapes, dtypes, devices and solver vector
spaces of the operands are checked where the composite is built. Sums flatten
(``H1 + ... + H10`` is one sum of ten terms), scalars fold into sums and float out of chains.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from torch_linop.linear_operator import TorchLinearOperator


# ----------------------------------------------------------------- compatibility
def _name(operator: TorchLinearOperator) -> str:
    return type(operator).__name__


def _check_same_dtype_and_device(operators: Sequence[TorchLinearOperator], what: str) -> None:
    """TypeError/ValueError naming both operands if they differ in dtype or device."""
    first = operators[0]
    for other in operators[1:]:
        if other.torch_dtype != first.torch_dtype:
            raise TypeError(
                f"cannot {what} a {first.torch_dtype} {_name(first)} and a {other.torch_dtype} "
                f"{_name(other)}: build both in one dtype (e.g. IdentityOperator(n, "
                "dtype=H.torch_dtype, device=H.device), or H.shift(sigma))"
            )
        if other.device != first.device:
            raise ValueError(
                f"cannot {what} a {_name(first)} on {first.device} and a {_name(other)} on "
                f"{other.device}: build both on one device"
            )


def shared_vector_space(operators: Iterable[Any]) -> Any:
    """The one non-None ``vector_space`` the operands carry (None if none does); ValueError if
    two operands carry different spaces (their vectors would not be the same kind)."""
    space = None
    for operator in operators:
        candidate = getattr(operator, "vector_space", None)
        if candidate is None or candidate is space:
            continue
        if space is not None and candidate != space:
            raise ValueError(
                f"cannot combine operators with different vector spaces ({space!r} and "
                f"{candidate!r}): their vectors are laid out differently (e.g. sharded over "
                "other process groups); build the operands over one vector space"
            )
        space = candidate
    return space


def _joined_hints(operators: Iterable[TorchLinearOperator]) -> str:
    hints = dict.fromkeys(operator._non_finite_hint() for operator in operators)
    return "; ".join(hints)


def _describe(operator: TorchLinearOperator) -> str:
    return operator._describe() if isinstance(operator, _Composite) else _name(operator)


# ----------------------------------------------------------------- leaves
class IdentityOperator(TorchLinearOperator):
    """The ``(size, size)`` identity in ``dtype`` on ``device``: ``H + 1e-3 * I`` stays torch.
    (``H.shift(1e-3)`` builds the same without naming dtype and device.)"""

    is_symmetric = True

    def __init__(
        self,
        size: int,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        vector_space: Any = None,
    ) -> None:
        if not isinstance(size, numbers.Integral) or isinstance(size, bool) or int(size) < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        size = int(size)
        super().__init__((size, size), dtype, device, vector_space=vector_space)

    def _matmat_torch(self, X: Tensor) -> Tensor:
        return X.clone()  # never hand back the caller's own tensor


class DiagonalOperator(TorchLinearOperator):
    """``diag(diagonal)``, on the diagonal's device and in its dtype; e.g. a preconditioner
    ``P^-1/2`` in ``D @ H @ D`` (a symmetric chain). The diagonal is used as given, not copied."""

    is_symmetric = True

    def __init__(self, diagonal: Tensor, *, vector_space: Any = None) -> None:
        if not isinstance(diagonal, Tensor) or diagonal.dim() != 1 or diagonal.numel() == 0:
            shape = tuple(diagonal.shape) if isinstance(diagonal, Tensor) else type(diagonal)
            raise ValueError(f"diagonal must be a non-empty 1-d torch.Tensor, got {shape}")
        if not diagonal.is_floating_point():
            raise TypeError(
                f"diagonal has dtype {diagonal.dtype}; convert it to a floating dtype, "
                "e.g. diagonal.double()"
            )
        self.diagonal = diagonal
        size = diagonal.shape[0]
        super().__init__((size, size), diagonal.dtype, diagonal.device, vector_space=vector_space)

    def _matmat_torch(self, X: Tensor) -> Tensor:
        return self.diagonal.unsqueeze(1) * X

    def _non_finite_hint(self) -> str:
        return "the diagonal holds NaN or Inf, or overflows the product"


# ----------------------------------------------------------------- composites
class _Composite(TorchLinearOperator):
    """Shared by composites: dtype, device and vector space from the (checked) operands."""

    operands: tuple[TorchLinearOperator, ...]

    def _init_from(
        self, shape: tuple[int, int], operands: Sequence[TorchLinearOperator], what: str
    ) -> None:
        _check_same_dtype_and_device(operands, what)
        self.operands = tuple(operands)
        first = operands[0]
        space = shared_vector_space(operands)
        TorchLinearOperator.__init__(
            self, shape, first.torch_dtype, first.device, vector_space=space
        )

    def _non_finite_hint(self) -> str:
        return _joined_hints(self.operands)

    def _describe(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"<{_name(self)} {self.shape[0]}x{self.shape[1]} = {self._describe()}, "
            f"dtype={self.torch_dtype}, device={self.device}>"
        )


class ScaledOperator(_Composite):
    """``scale * operator`` for a real ``scale``."""

    def __init__(self, scale: float, operator: TorchLinearOperator) -> None:
        self.scale = float(scale)
        self.operator = operator
        self._init_from(operator.shape, [operator], "scale")
        self.is_symmetric = operator.is_symmetric

    def _matmat_torch(self, X: Tensor) -> Tensor:
        # out of place: an operand may hand back a buffer it reuses (CUDA-graph replay)
        return self.operator._matmat_torch(X) * self.scale

    def _adjoint_torch_operator(self) -> TorchLinearOperator:
        return ScaledOperator(self.scale, self.operator._adjoint())

    def _describe(self) -> str:
        return f"{self.scale!r} * {_describe(self.operator)}"


class SumOperator(_Composite):
    """``sum_i coefficient_i * operator_i`` over ``terms`` of ``(coefficient, operator)``: one
    flat sum for ``H1 + ... + H10`` or ``2 * H - G + 1e-3 * I``. Symmetric if every term is."""

    def __init__(self, terms: Sequence[tuple[float, TorchLinearOperator]]) -> None:
        if not terms:
            raise ValueError("a SumOperator needs at least one term")
        self.terms = tuple((float(coefficient), operator) for coefficient, operator in terms)
        operators = [operator for _, operator in self.terms]
        shape = operators[0].shape
        for operator in operators[1:]:
            if operator.shape != shape:
                raise ValueError(
                    f"cannot add a {_name(operators[0])} of shape {shape} and a "
                    f"{_name(operator)} of shape {operator.shape}: summands need one shape"
                )
        self._init_from(shape, operators, "add")
        self.is_symmetric = all(operator.is_symmetric for operator in operators)

    def _matmat_torch(self, X: Tensor) -> Tensor:
        total: Tensor | None = None
        owned = False  # whether ``total`` is ours to write in place (not an operand's output)
        for coefficient, operator in self.terms:
            product = X if type(operator) is IdentityOperator else operator._matmat_torch(X)
            if total is None:
                total, owned = (
                    (product, False) if coefficient == 1.0 else (product * coefficient, True)
                )
            elif owned:
                total.add_(product, alpha=coefficient)
            else:
                total, owned = torch.add(total, product, alpha=coefficient), True
        assert total is not None  # at least one term
        return total if owned or total is not X else total.clone()

    def _adjoint_torch_operator(self) -> TorchLinearOperator:
        return SumOperator([(c, operator._adjoint()) for c, operator in self.terms])

    def _describe(self) -> str:
        parts = []
        for index, (coefficient, operator) in enumerate(self.terms):
            sign = "-" if coefficient < 0 else "+"
            magnitude = abs(coefficient)
            term = _describe(operator)
            if isinstance(operator, SumOperator):
                term = f"({term})"
            text = term if magnitude == 1.0 else f"{magnitude!r} * {term}"
            parts.append((("-" if sign == "-" else "") if index == 0 else f" {sign} ") + text)
        return "".join(parts)


class ChainOperator(_Composite):
    """``operators[0] @ operators[1] @ ... @ operators[-1]`` (the last one applied first).
    Symmetric when provably so: a palindrome of symmetric operators (``D @ H @ D``)."""

    def __init__(self, operators: Sequence[TorchLinearOperator]) -> None:
        if not operators:
            raise ValueError("a ChainOperator needs at least one operator")
        for left, right in zip(operators, operators[1:]):
            if left.shape[1] != right.shape[0]:
                raise ValueError(
                    f"cannot chain a {_name(left)} of shape {left.shape} with a {_name(right)} "
                    f"of shape {right.shape}: the left one needs {right.shape[0]} columns"
                )
        shape = (operators[0].shape[0], operators[-1].shape[1])
        self.operators = tuple(operators)
        self._init_from(shape, operators, "chain")
        self.is_symmetric = all(
            left is right and left.is_symmetric
            for left, right in zip(self.operators, reversed(self.operators))
        )

    def _matmat_torch(self, X: Tensor) -> Tensor:
        for operator in reversed(self.operators):
            X = operator._matmat_torch(X)
        return X

    def _adjoint_torch_operator(self) -> TorchLinearOperator:
        return ChainOperator([operator._adjoint() for operator in reversed(self.operators)])

    def _describe(self) -> str:
        parts = []
        for operator in self.operators:
            term = _describe(operator)
            parts.append(f"({term})" if isinstance(operator, _Composite) else term)
        return " @ ".join(parts)


# ----------------------------------------------------------------- constructors used by the operators
def _terms(operator: TorchLinearOperator) -> list[tuple[float, TorchLinearOperator]]:
    if isinstance(operator, SumOperator):
        return list(operator.terms)
    if isinstance(operator, ScaledOperator):
        return [(operator.scale, operator.operator)]
    return [(1.0, operator)]


def add(left: TorchLinearOperator, right: TorchLinearOperator, sign: float = 1.0) -> SumOperator:
    """``left + sign * right`` as one flat sum."""
    terms = _terms(left) + [(sign * c, operator) for c, operator in _terms(right)]
    return SumOperator(terms)


def scaled(scale: float, operator: TorchLinearOperator) -> TorchLinearOperator:
    """``scale * operator``: folded into a sum's coefficients or an existing scale."""
    if isinstance(operator, SumOperator):
        return SumOperator([(scale * c, term) for c, term in operator.terms])
    if isinstance(operator, ScaledOperator):
        return ScaledOperator(scale * operator.scale, operator.operator)
    return ScaledOperator(scale, operator)


def chain(left: TorchLinearOperator, right: TorchLinearOperator) -> TorchLinearOperator:
    """``left @ right``: chains flatten, identity factors drop out, scales float to the front."""
    if left.shape[1] != right.shape[0]:
        raise ValueError(
            f"cannot chain a {_name(left)} of shape {left.shape} with a {_name(right)} of "
            f"shape {right.shape}: the left one needs {right.shape[0]} columns"
        )
    _check_same_dtype_and_device([left, right], "chain")
    space = shared_vector_space([left, right])
    scale = 1.0
    factors: list[TorchLinearOperator] = []
    for operator in (left, right):
        if isinstance(operator, ScaledOperator):
            scale *= operator.scale
            operator = operator.operator
        if isinstance(operator, ChainOperator):
            factors.extend(operator.operators)
        elif type(operator) is not IdentityOperator:
            factors.append(operator)
    result: TorchLinearOperator
    if not factors:
        result = IdentityOperator(
            left.shape[0], dtype=left.torch_dtype, device=left.device, vector_space=space
        )
    elif len(factors) == 1:
        result = factors[0]
    else:
        result = ChainOperator(factors)
    return result if scale == 1.0 else ScaledOperator(scale, result)


def _square_size(operator: TorchLinearOperator, what: str) -> int:
    rows, columns = operator.shape
    if rows != columns:
        raise ValueError(
            f"{what} needs a square operator, got {_name(operator)} of shape {operator.shape}"
        )
    return rows


def power(operator: TorchLinearOperator, exponent: int) -> TorchLinearOperator:
    """``operator ** exponent`` for an int >= 0, as a chain (identity for 0)."""
    size = _square_size(operator, f"operator ** {exponent}")
    if exponent == 0:
        return IdentityOperator(
            size,
            dtype=operator.torch_dtype,
            device=operator.device,
            vector_space=operator.vector_space,
        )
    return functools.reduce(chain, [operator] * exponent)


def shifted(operator: TorchLinearOperator, sigma: float) -> SumOperator:
    """``operator + sigma * I`` with the identity in the operator's dtype, device and space."""
    size = _square_size(operator, "shift(sigma)")
    identity = IdentityOperator(
        size, dtype=operator.torch_dtype, device=operator.device, vector_space=operator.vector_space
    )
    return add(operator, ScaledOperator(float(sigma), identity))
