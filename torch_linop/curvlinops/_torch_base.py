"""``PyTorchLinearOperator``: curvlinops 3's operator contract, which every drop-in class obeys.

The contract (curvlinops 3.0.1, ``curvlinops/_torch_base.py``), kept stable for the classes built
on it here (curvature operators, Jacobians, sub-matrices, inverses, KFAC):

- ``__init__(in_shape, out_shape)``: lists of shapes whose sizes add up to the columns and rows;
  they set ``shape = (rows, columns)`` and the tensor-list format.
- Subclasses implement ``_matmat(X: list[Tensor]) -> list[Tensor]``: ``X[i]`` has shape
  ``(*in_shape[i], K)``, the result ``(*out_shape[i], K)``; ``device`` and ``dtype`` (a
  ``torch.dtype``) as properties or attributes; ``_adjoint()`` unless ``SELF_ADJOINT = True``.
- Derived here once: ``A @ X`` for tensors ``(n,)``/``(n, K)`` and tensor lists (same format
  back), ``A @ B`` / ``A + B`` / ``A - B`` / ``c * A`` / ``A * c`` / ``-A`` (lazy composites),
  ``adjoint()`` and ``to_scipy(dtype=None)`` (a scipy ``LinearOperator`` in numpy's default
  dtype, float64, unless ``dtype`` is given; products run in torch).

The composites accept any operator that follows the protocol (``shape``, ``dtype``, ``device``,
``@`` on torch tensors, ``adjoint()``): curvlinops' own classes, a user's, or ours, in either
order (``ours + theirs`` here, ``theirs + ours`` through curvlinops' own composites, which find
``_in_shape``, ``_out_shape``, ``SELF_ADJOINT`` and list-format ``_matmat`` on ours).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Size, Tensor

Shapes = list[Size]


def is_protocol_operator(candidate: Any) -> bool:
    """Whether ``candidate`` is a linear operator in curvlinops 3's sense (or one of ours with a
    ``torch_dtype``): not a tensor, with a 2-d ``shape``, a ``device`` and a torch dtype."""
    if isinstance(candidate, (Tensor, np.ndarray, list, tuple)):
        return False
    if not all(hasattr(candidate, name) for name in ("shape", "device", "__matmul__")):
        return False
    return isinstance(operator_dtype(candidate), torch.dtype)


def operator_dtype(operator: Any) -> Any:
    """The torch dtype of a protocol operator (``torch_dtype`` first: ours keep numpy ``dtype``)."""
    torch_dtype = getattr(operator, "torch_dtype", None)
    return torch_dtype if isinstance(torch_dtype, torch.dtype) else getattr(operator, "dtype", None)


def _shapes_of(side: str, *operators: Any) -> Shapes:
    """``_in_shape``/``_out_shape`` of the first curvlinops-style operator among ``operators``
    (all of one shape), else one flat space."""
    for operator in operators:
        shapes = getattr(operator, f"_{side}_shape", None)
        if shapes is not None:
            return [Size(shape) for shape in shapes]
    return [Size((int(operators[0].shape[1 if side == "in" else 0]),))]


def _flatten(tensors: list[Tensor]) -> Tensor:
    """``[(*s_i, K)]`` to one ``(n, K)`` tensor."""
    return torch.cat([tensor.reshape(-1, tensor.shape[-1]) for tensor in tensors])


def _unflatten(flat: Tensor, shapes: Shapes) -> list[Tensor]:
    """One ``(m, K)`` tensor to ``[(*s_i, K)]``."""
    sizes = [int(shape.numel()) for shape in shapes]
    return [chunk.reshape(*shape, flat.shape[1]) for chunk, shape in zip(flat.split(sizes), shapes)]


def matmat_list(
    operator: Any, X: list[Tensor], in_shapes: Shapes, out_shapes: Shapes
) -> list[Tensor]:
    """``operator`` times the list-format matrix ``X`` (shapes ``in_shapes`` + ``(K,)``), returned
    in ``out_shapes``: through its own list ``_matmat`` when its spaces are these, else flat."""
    own_in = getattr(operator, "_in_shape", None)
    own_out = getattr(operator, "_out_shape", None)
    if (
        own_in is not None
        and own_out is not None
        and [Size(s) for s in own_in] == list(in_shapes)
        and [Size(s) for s in own_out] == list(out_shapes)
        and callable(getattr(operator, "_matmat", None))
        and not isinstance(operator, LinearOperator)  # scipy's _matmat takes ndarrays
    ):
        return operator._matmat(X)
    return _unflatten(operator @ _flatten(X), out_shapes)


class PyTorchLinearOperator:
    """A linear operator on torch tensors and tensor lists (curvlinops 3's contract, see the
    module docstring). Subclasses implement ``_matmat``, ``device``, ``dtype`` and ``_adjoint``
    (or set ``SELF_ADJOINT = True``).

    Attributes:
        SELF_ADJOINT: the operator equals its adjoint, so ``adjoint()`` returns itself.
    """

    SELF_ADJOINT: bool = False

    def __init__(
        self, in_shape: Sequence[Sequence[int]], out_shape: Sequence[Sequence[int]]
    ) -> None:
        self._in_shape = [Size(shape) for shape in in_shape]
        self._out_shape = [Size(shape) for shape in out_shape]
        self._in_shape_flat = [int(shape.numel()) for shape in self._in_shape]
        self._out_shape_flat = [int(shape.numel()) for shape in self._out_shape]
        self.shape = (sum(self._out_shape_flat), sum(self._in_shape_flat))

    # ------------------------------------------------------------------ to implement
    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        """``[(*in_i, K)]`` to ``[(*out_i, K)]``."""
        raise NotImplementedError

    def _adjoint(self) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} does not implement _adjoint (set SELF_ADJOINT = True if it "
            "equals its adjoint)"
        )

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    # ------------------------------------------------------------------ products
    def __matmul__(self, X: Any) -> Any:
        """``A @ X``: ``X`` a tensor ``(n,)``/``(n, K)``, a tensor list (``[(*in_i,)]`` or
        ``[(*in_i, K)]``, returned in the same format), or another operator (a lazy chain)."""
        if is_protocol_operator(X):
            return _ChainPyTorchLinearOperator(self, X)
        if isinstance(X, Tensor):
            return self._matmat_tensor(X)
        if isinstance(X, list) and all(isinstance(x, Tensor) for x in X):
            return self._matmat_tensor_list(X)
        hint = (
            "; for numpy, use A.to_scipy() @ x or A @ torch.as_tensor(x, dtype=A.dtype)"
            if isinstance(X, np.ndarray)
            else ""
        )
        raise ValueError(f"Input must be tensor or list of tensors. Got {type(X)}{hint}.")

    def __rmatmul__(self, X: Any) -> Any:
        if is_protocol_operator(X):
            return _ChainPyTorchLinearOperator(X, self)
        return NotImplemented

    def _matmat_tensor(self, X: Tensor) -> Tensor:
        if X.ndim not in (1, 2) or X.shape[0] != self.shape[1]:
            raise ValueError(
                f"Input tensor must have shape ({self.shape[1]},) or ({self.shape[1]}, K), with K "
                f"arbitrary. Got {tuple(X.shape)}."
            )
        columns = X.unsqueeze(-1) if X.ndim == 1 else X
        AX = self._checked_matmat(_unflatten(columns, self._in_shape), columns.shape[1])
        result = _flatten(AX) if AX else columns.new_zeros((0, columns.shape[1]))
        return result.squeeze(-1) if X.ndim == 1 else result

    def _matmat_tensor_list(self, X: list[Tensor]) -> list[Tensor]:
        if len(X) != len(self._in_shape):
            raise ValueError(f"List must contain {len(self._in_shape)} tensors. Got {len(X)}.")
        if all(x.shape == s for x, s in zip(X, self._in_shape)):
            AX = self._checked_matmat([x.unsqueeze(-1) for x in X], 1)
            return [Ax.squeeze(-1) for Ax in AX]
        trailing = {x.shape[-1] for x in X if x.ndim > 0}
        if len(trailing) != 1 or any(
            x.ndim != len(s) + 1 or x.shape[:-1] != s for x, s in zip(X, self._in_shape)
        ):
            raise ValueError(
                f"Input list must contain tensors with shapes {[tuple(s) for s in self._in_shape]} "
                "and optional trailing dimension for the matrix columns. Got "
                f"{[tuple(x.shape) for x in X]}."
            )
        return self._checked_matmat(X, trailing.pop())

    def _checked_matmat(self, X: list[Tensor], num_columns: int) -> list[Tensor]:
        AX = self._matmat(X)
        expected = [(*shape, num_columns) for shape in self._out_shape]
        if len(AX) != len(expected) or any(tuple(a.shape) != e for a, e in zip(AX, expected)):
            raise ValueError(
                f"{type(self).__name__}._matmat returned shapes {[tuple(a.shape) for a in AX]}, "
                f"expected {expected}"
            )
        return AX

    def adjoint(self) -> Any:
        """The adjoint operator (itself when ``SELF_ADJOINT``)."""
        return self if self.SELF_ADJOINT else self._adjoint()

    # ------------------------------------------------------------------ algebra
    def __add__(self, other: Any) -> Any:
        if not is_protocol_operator(other):
            return NotImplemented
        return _SumPyTorchLinearOperator(self, other)

    def __radd__(self, other: Any) -> Any:
        if not is_protocol_operator(other):
            return NotImplemented
        return _SumPyTorchLinearOperator(other, self)

    def __sub__(self, other: Any) -> Any:
        if not is_protocol_operator(other):
            return NotImplemented
        return _SumPyTorchLinearOperator(self, _ScalePyTorchLinearOperator(other, -1.0))

    def __rsub__(self, other: Any) -> Any:
        if not is_protocol_operator(other):
            return NotImplemented
        return _SumPyTorchLinearOperator(other, _ScalePyTorchLinearOperator(self, -1.0))

    def __mul__(self, scalar: Any) -> Any:
        if not _is_scalar(scalar):
            return NotImplemented
        return _ScalePyTorchLinearOperator(self, scalar)

    def __rmul__(self, scalar: Any) -> Any:
        return self.__mul__(scalar)

    def __neg__(self) -> Any:
        return _ScalePyTorchLinearOperator(self, -1.0)

    # ------------------------------------------------------------------ scipy export
    def to_scipy(self, dtype: Any = None) -> LinearOperator:
        """A scipy ``LinearOperator`` whose products run in torch on ``device``; its dtype is
        ``dtype``, by default numpy's default (float64) whatever the torch dtype (as curvlinops).
        Results come back in the dtype of the array multiplied."""
        adjoint = self.adjoint()
        matmat = _scipy_compatible(self, self.device, self.dtype)
        rmatmat = _scipy_compatible(adjoint, self.device, self.dtype)
        return LinearOperator(
            self.shape,
            matvec=matmat,
            rmatvec=rmatmat,
            matmat=matmat,
            rmatmat=rmatmat,
            dtype=np.dtype(dtype),
        )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.shape[0]}x{self.shape[1]}, dtype={self.dtype}, "
            f"device={self.device}>"
        )


def _is_scalar(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.ndim == 0
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _scipy_compatible(operator: Any, device: torch.device, dtype: torch.dtype) -> Any:
    def f_scipy(X: np.ndarray) -> np.ndarray:
        result = operator @ torch.as_tensor(np.asarray(X), dtype=dtype, device=device)
        if result.dtype == torch.bfloat16:  # numpy has no bfloat16
            result = result.float()
        return result.detach().cpu().numpy().astype(np.asarray(X).dtype)

    return f_scipy


def _check_same(first: Any, second: Any) -> None:
    if torch.device(first.device) != torch.device(second.device):
        raise ValueError(
            f"Devices of linear operators must match. Got {[first.device, second.device]}."
        )
    if operator_dtype(first) != operator_dtype(second):
        raise ValueError(
            f"Dtypes of linear operators must match. Got "
            f"{[operator_dtype(first), operator_dtype(second)]}; convert one (e.g. build it "
            "from a model in the other's dtype)."
        )


class _CompositePyTorchLinearOperator(PyTorchLinearOperator):
    """A composite of curvlinops-protocol operands: device and dtype are its first operand's
    (``_A``; the operands were checked to agree where the composite was built)."""

    _A: Any

    @property
    def device(self) -> torch.device:
        return torch.device(self._A.device)

    @property
    def dtype(self) -> torch.dtype:
        return operator_dtype(self._A)


class _SumPyTorchLinearOperator(_CompositePyTorchLinearOperator):
    """``A + B`` for protocol operators of one shape, device and dtype."""

    def __init__(self, A: Any, B: Any) -> None:
        if tuple(A.shape) != tuple(B.shape):
            raise ValueError(f"Shapes of linear operators must match. Got {A.shape} vs. {B.shape}.")
        _check_same(A, B)
        super().__init__(_shapes_of("in", A, B), _shapes_of("out", A, B))
        self._A, self._B = A, B
        self.SELF_ADJOINT = bool(getattr(A, "SELF_ADJOINT", False)) and bool(
            getattr(B, "SELF_ADJOINT", False)
        )

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        shapes = (self._in_shape, self._out_shape)
        return [
            a + b
            for a, b in zip(matmat_list(self._A, X, *shapes), matmat_list(self._B, X, *shapes))
        ]

    def _adjoint(self) -> _SumPyTorchLinearOperator:
        return _SumPyTorchLinearOperator(self._A.adjoint(), self._B.adjoint())


class _ScalePyTorchLinearOperator(_CompositePyTorchLinearOperator):
    """``scalar * A``."""

    def __init__(self, A: Any, scalar: Any) -> None:
        super().__init__(_shapes_of("in", A), _shapes_of("out", A))
        self._A, self._scalar = A, scalar
        self.SELF_ADJOINT = bool(getattr(A, "SELF_ADJOINT", False))

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        return [
            self._scalar * AX for AX in matmat_list(self._A, X, self._in_shape, self._out_shape)
        ]

    def _adjoint(self) -> _ScalePyTorchLinearOperator:
        return _ScalePyTorchLinearOperator(self._A.adjoint(), self._scalar)


class _ChainPyTorchLinearOperator(_CompositePyTorchLinearOperator):
    """``A @ B`` (``B`` applied first)."""

    def __init__(self, A: Any, B: Any) -> None:
        if A.shape[1] != B.shape[0]:
            raise ValueError(f"Shapes do not chain: A is {A.shape}, B is {B.shape}.")
        _check_same(A, B)
        super().__init__(_shapes_of("in", B), _shapes_of("out", A))
        self._A, self._B = A, B
        middle_out, middle_in = _shapes_of("out", B), _shapes_of("in", A)
        # the space between the two: B's output format if A's input format differs
        self._middle = middle_out if middle_out == middle_in else [Size((int(B.shape[0]),))]

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        BX = matmat_list(self._B, X, self._in_shape, self._middle)
        return matmat_list(self._A, BX, self._middle, self._out_shape)

    def _adjoint(self) -> _ChainPyTorchLinearOperator:
        return _ChainPyTorchLinearOperator(self._B.adjoint(), self._A.adjoint())
