"""``TorchLinearOperator``: a scipy ``LinearOperator`` that multiplies torch tensors on its device.

Every torch-linop operator (curvature matrices, their sums, scalings, chains and shifts, diagonal
and identity operators) derives from this class and implements one hook, ``_matmat_torch`` on
``(n, k)`` tensors. Everything else is derived once here: the torch path (``apply``, ``matvec``,
``matmat``, ``dot``, ``@`` on tensors, with input checks), a short numpy path for scipy
(one conversion in, one out), transposes, and an algebra (``A + B``, ``c * A``, ``A @ B``,
``A.shift(sigma)``...) whose results are again torch operators (see :mod:`torch_linop.algebra`).
Composites with foreign scipy operators or sparse matrices keep scipy's numpy semantics.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import scipy.sparse
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

_NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {
    torch.float64: np.dtype(np.float64),
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(np.float32),  # numpy has no bfloat16: ndarrays travel as float32
}
_NUMPY_INPUT_DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16))


def numpy_dtype_of(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype an operator over ``dtype`` tensors advertises to scipy."""
    if dtype not in _NUMPY_DTYPES:
        raise TypeError(f"torch-linop operators need a floating-point dtype, got {dtype}")
    return _NUMPY_DTYPES[dtype]


def all_finite(tensor: Tensor) -> bool:
    """No NaN/Inf in ``tensor``, in one reduction: a NaN or Inf anywhere makes the sum
    non-finite (accumulated in float32 or better, so half-precision sums do not overflow)."""
    accumulate = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(tensor.sum(dtype=accumulate)))


def real_scalar(value: Any) -> float | None:
    """``value`` as a float if it is a real scalar (Python or numpy number, 0-d tensor without
    gradient), else None: such scalars scale torch operators, anything else falls to scipy."""
    if isinstance(value, Tensor):
        if value.dim() == 0 and not value.is_complex() and not value.requires_grad:
            return float(value)
        return None
    if isinstance(value, numbers.Real | np.floating | np.integer):
        return float(value)
    return None


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:0`` (the current index): tensors report indexed devices, and an
    ``IdentityOperator(n, device="cuda")`` must combine with operators on ``cuda:0``."""
    if device.index is not None or device.type in ("cpu", "meta"):
        return device
    return torch.empty(0, device=device).device


def _defers_to(other: Any) -> bool:
    """Whether ``self @ other`` should be left to ``other.__rmatmul__``: objects that are neither
    arrays, sequences, scipy operators/sparse matrices nor ours, but know how to multiply."""
    if isinstance(other, (np.ndarray, LinearOperator, list, tuple, TorchLinearOperator)):
        return False
    if scipy.sparse.issparse(other):
        return False
    return hasattr(type(other), "__rmatmul__")


class TorchLinearOperator(LinearOperator):
    """An ``(m, n)`` linear operator that multiplies torch tensors on ``device`` in ``torch_dtype``.

    Subclasses implement ``_matmat_torch(X)`` for checked ``(n, k)`` tensors (``k >= 1``) on
    ``device`` in ``torch_dtype``, returning ``(m, k)``; symmetric ones set ``is_symmetric = True``
    (their transpose and adjoint are themselves), others may return their adjoint from
    ``_adjoint_torch_operator()``. Derived here:

    - torch path: ``apply``/``matvec``/``matmat``/``dot``/``@``/``__call__`` on ``(n,)`` or
      ``(n, k)`` tensors return tensors on ``device`` (shape, dtype, device and finiteness of
      the input are checked, and the output's finiteness);
    - numpy path: the same on ndarrays, converted once each way, so scipy's solvers work;
    - ``.T``, ``.H``, ``transpose()``, ``adjoint()``;
    - algebra: ``A + B``, ``A - B``, ``-A``, ``c * A``, ``A * c``, ``A / c``, ``A @ B``,
      ``A ** p``, ``A.shift(sigma)`` give torch operators when both sides are torch operators.
      With a foreign scipy ``LinearOperator`` the result is scipy's (numpy-only) composite.

    ``vector_space`` (default None) is an optional solver hook (an inner product for sharded
    vectors and a seed hook); composites carry their operands' space.
    """

    is_symmetric: bool = False
    vector_space: Any = None
    device: torch.device
    torch_dtype: torch.dtype
    # nouns for error messages: curvature operators say "the parameters'" and "the model"
    _dtype_owner: str = "the operator's"
    _device_owner: str = "the operator"

    def __init__(
        self,
        shape: tuple[int, int],
        torch_dtype: torch.dtype,
        device: torch.device | str,
        *,
        vector_space: Any = None,
    ) -> None:
        self.torch_dtype = torch_dtype
        self.device = _indexed(torch.device(device))
        if vector_space is not None:
            self.vector_space = vector_space
        super().__init__(dtype=numpy_dtype_of(torch_dtype), shape=shape)

    # ----------------------------------------------------------------- hooks
    def _matmat_torch(self, X: Tensor) -> Tensor:
        """The operator times ``X`` of shape ``(n, k)``, ``k >= 1``, on ``device`` in
        ``torch_dtype`` (already checked); returns ``(m, k)``. Must not modify ``X``.
        Composites call their operands' ``_matmat_torch`` directly, so whatever a product
        needs (grad mode, contexts) belongs here, not in ``apply``."""
        raise NotImplementedError(f"{type(self).__name__} must implement _matmat_torch")

    def _adjoint_torch_operator(self) -> TorchLinearOperator | None:
        """The adjoint as a torch operator, or None if unknown (symmetric ones need not say)."""
        return None

    def _non_finite_hint(self) -> str:
        """What to check when a product of finite input is not finite (for the error)."""
        return "check the operands for overflow (for half precision, try float32)"

    # ----------------------------------------------------------------- torch path
    def _check_tensor(self, tensor: Tensor) -> None:
        """Raise where a tensor enters if its shape, dtype, device or values are wrong."""
        size = self.shape[1]
        if tensor.dim() not in (1, 2) or tensor.shape[0] != size:
            raise ValueError(
                f"expected a vector of shape ({size},) or a matrix ({size}, k){self._size_note()}"
                f", got shape {tuple(tensor.shape)}"
            )
        if tensor.dtype != self.torch_dtype:
            raise TypeError(
                f"tensor dtype {tensor.dtype} does not match {self._dtype_owner} "
                f"{self.torch_dtype}; convert it with t.to(H.torch_dtype)"
            )
        if tensor.device != self.device:
            raise ValueError(
                f"tensor is on {tensor.device}, {self._device_owner} on {self.device}; move it "
                "with t.to(H.device) (ndarrays are moved automatically)"
            )
        if not all_finite(tensor):
            raise ValueError("the vector contains NaN or Inf; products need finite input")

    def _size_note(self) -> str:
        """Words after the expected shape in a shape error (curvature operators say what n is)."""
        return ""

    def _non_finite_product(self) -> ValueError:
        """The error for a non-finite product of a finite input."""
        return ValueError(
            f"{type(self).__name__} product is not finite (NaN or Inf) for a finite input: "
            + self._non_finite_hint()
        )

    def apply(self, tensor: Tensor) -> Tensor:
        """Torch path: ``(n,)`` or ``(n, k)`` tensor in, ``(m,)`` or ``(m, k)`` out, on ``device``."""
        self._check_tensor(tensor)
        # inlined below and in _numpy_product: every frame shows in small models' products
        columns = tensor.unsqueeze(1) if tensor.dim() == 1 else tensor
        if columns.shape[1] == 0:
            return columns.new_zeros((self.shape[0], 0))
        result = self._matmat_torch(columns)
        if not all_finite(result):
            raise self._non_finite_product()
        return result.squeeze(1) if tensor.dim() == 1 else result

    # ----------------------------------------------------------------- numpy path
    def _numpy_product(self, array: np.ndarray) -> np.ndarray:
        """An ndarray of shape ``(n,)`` or ``(n, k)`` times the operator, converted once each
        way; the result has the input's float dtype (the operator's for integer input)."""
        kind = array.dtype.kind
        if kind == "c":
            raise TypeError("complex vectors are not supported; pass the real and imaginary parts")
        out_dtype = array.dtype if kind == "f" else self.dtype
        if array.dtype not in _NUMPY_INPUT_DTYPES:  # integers, bools, non-native byte order
            array = array.astype(np.float64)
        elif not array.flags.writeable:  # torch.from_numpy warns about read-only memory
            array = array.copy()
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        tensor = tensor.to(device=self.device, dtype=self.torch_dtype)
        if not all_finite(tensor):
            raise ValueError("the vector contains NaN or Inf; products need finite input")
        columns = tensor.view(tensor.shape[0], -1)
        if columns.shape[1] == 0:
            return np.zeros((self.shape[0], 0), dtype=out_dtype)
        result = self._matmat_torch(columns)
        if not all_finite(result):
            raise self._non_finite_product()
        result = result.detach().to("cpu")
        if result.dtype == torch.bfloat16:
            result = result.float()
        output = result.numpy().astype(out_dtype, copy=False)
        return output.reshape(self.shape[0], *array.shape[1:])

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._numpy_product(np.asarray(x).reshape(-1))

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        return self._numpy_product(np.asarray(X))

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._adjoint()._matvec(x)

    def _rmatmat(self, X: np.ndarray) -> np.ndarray:
        return self._adjoint()._matmat(X)

    # ----------------------------------------------------------------- public products
    # ndarrays skip scipy's wrappers (same checks, one frame); other inputs (lists, np.matrix)
    # go through scipy's, which call the numpy hooks above
    def matvec(self, x: Any) -> Any:
        """``A @ x`` for one vector: a tensor ``(n,)``/``(n, 1)`` or an ndarray ``(n,)``/``(n, 1)``."""
        if isinstance(x, Tensor):
            if x.dim() == 2 and x.shape[1] == 1:
                return self.apply(x)
            if x.dim() != 1:
                raise ValueError(f"matvec expects a vector, got shape {tuple(x.shape)}")
            return self.apply(x)
        if type(x) is np.ndarray:
            size = self.shape[1]
            if x.shape != (size,) and x.shape != (size, 1):
                raise ValueError(
                    f"dimension mismatch: {type(self).__name__} of shape {self.shape} multiplies "
                    f"vectors of shape ({size},) or ({size}, 1), got shape {x.shape}"
                )
            return self._numpy_product(x)
        return super().matvec(x)

    def matmat(self, X: Any) -> Any:
        """``A @ X`` for a block of columns: a tensor or ndarray of shape ``(n, k)``."""
        if isinstance(X, Tensor):
            if X.dim() != 2:
                raise ValueError(f"matmat expects a 2-d (n, k) matrix, got shape {tuple(X.shape)}")
            return self.apply(X)
        if type(X) is np.ndarray:
            if X.ndim != 2:
                raise ValueError(f"expected 2-d ndarray or matrix, not {X.ndim}-d")
            if X.shape[0] != self.shape[1]:
                raise ValueError(
                    f"dimension mismatch: {type(self).__name__} of shape {self.shape} multiplies "
                    f"matrices of shape ({self.shape[1]}, k), got shape {X.shape}"
                )
            return self._numpy_product(X)
        return super().matmat(X)

    def rmatvec(self, x: Any) -> Any:
        """``A^H @ x``; the operator itself for symmetric operators."""
        if self.is_symmetric:
            return self.matvec(x)
        return self._adjoint().matvec(x)

    def rmatmat(self, X: Any) -> Any:
        """``A^H @ X``; the operator itself for symmetric operators."""
        if self.is_symmetric:
            return self.matmat(X)
        return self._adjoint().matmat(X)

    def dot(self, x: Any) -> Any:
        """Tensors and ndarrays: the product; torch operators: their chain; real scalars: the
        scaled operator; anything else: scipy's ``dot``."""
        if isinstance(x, Tensor):
            return self.apply(x)
        if type(x) is np.ndarray:
            if x.ndim == 1 or (x.ndim == 2 and x.shape[1] == 1):
                return self.matvec(x)
            if x.ndim == 2:
                return self.matmat(x)
            raise ValueError(f"expected 1-d or 2-d array or matrix, got shape {x.shape}")
        if isinstance(x, TorchLinearOperator):
            from torch_linop.algebra import chain

            return chain(self, x)
        scale = real_scalar(x)
        if scale is not None:
            from torch_linop.algebra import scaled

            return scaled(scale, self)
        return super().dot(x)

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, Tensor):  # the hot path first
            return self.apply(other)
        if np.isscalar(other):
            raise ValueError("Scalar operands are not allowed, use '*' instead")
        if _defers_to(other):
            return NotImplemented  # e.g. a curvlinops-protocol operator: its __rmatmul__ chains
        return self.dot(other)

    def __rmatmul__(self, other: Any) -> Any:
        if isinstance(other, Tensor) and other.dim() in (1, 2):  # x^T A = (A^T x)^T, real dtypes
            adjoint = self._adjoint()
            return adjoint.apply(other) if other.dim() == 1 else adjoint.apply(other.T).T
        return super().__rmatmul__(other)

    def __mul__(self, x: Any) -> Any:
        return self.dot(x)

    def __call__(self, x: Any) -> Any:
        return self.__matmul__(x)

    # ----------------------------------------------------------------- algebra
    def __rmul__(self, x: Any) -> Any:
        scale = real_scalar(x)
        if scale is not None:
            from torch_linop.algebra import scaled

            return scaled(scale, self)
        return super().__rmul__(x)

    def __truediv__(self, other: Any) -> Any:
        scale = real_scalar(other)
        if scale is not None:
            if scale == 0.0:
                raise ZeroDivisionError("cannot divide an operator by zero")
            from torch_linop.algebra import scaled

            return scaled(1.0 / scale, self)
        return super().__truediv__(other)

    def __neg__(self) -> Any:
        from torch_linop.algebra import scaled

        return scaled(-1.0, self)

    def __add__(self, x: Any) -> Any:
        if isinstance(x, TorchLinearOperator):
            from torch_linop.algebra import add

            return add(self, x)
        return super().__add__(x)

    def __sub__(self, x: Any) -> Any:
        if isinstance(x, TorchLinearOperator):
            from torch_linop.algebra import add

            return add(self, x, sign=-1.0)
        return super().__sub__(x)

    def __pow__(self, p: Any) -> Any:
        if isinstance(p, numbers.Integral | np.integer) and int(p) >= 0:
            from torch_linop.algebra import power

            return power(self, int(p))
        return super().__pow__(p)

    def shift(self, sigma: float) -> TorchLinearOperator:
        """``A + sigma * I`` as a torch operator (damping, spectral shifts); A must be square."""
        value = real_scalar(sigma)
        if value is None:
            raise TypeError(f"shift(sigma) needs a real scalar, got {sigma!r}")
        from torch_linop.algebra import shifted

        return shifted(self, value)

    # ----------------------------------------------------------------- transposes
    def _adjoint(self) -> TorchLinearOperator:
        if self.is_symmetric:
            return self
        adjoint = self._adjoint_torch_operator()
        if adjoint is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no adjoint: it is not symmetric (is_symmetric is "
                "False) and does not implement _adjoint_torch_operator()"
            )
        return adjoint

    def _transpose(self) -> TorchLinearOperator:
        return self._adjoint()  # real dtypes only: the transpose is the adjoint

    # ----------------------------------------------------------------- scipy views
    def to_scipy(self, dtype: Any = None) -> LinearOperator:
        """The operator as a scipy ``LinearOperator``: itself, or a view in another ``dtype``."""
        if dtype is None or np.dtype(dtype) == self.dtype:
            return self
        target = np.dtype(dtype)
        try:
            adjoint: TorchLinearOperator | None = self._adjoint()
        except NotImplementedError:
            adjoint = None
        rmatvec = rmatmat = None
        if adjoint is not None:
            rmatvec = lambda x: adjoint._matvec(x).astype(target, copy=False)  # noqa: E731
            rmatmat = lambda X: adjoint._matmat(X).astype(target, copy=False)  # noqa: E731
        return LinearOperator(
            self.shape,
            matvec=lambda x: self._matvec(x).astype(target, copy=False),
            matmat=lambda X: self._matmat(X).astype(target, copy=False),
            rmatvec=rmatvec,
            rmatmat=rmatmat,
            dtype=target,
        )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.shape[0]}x{self.shape[1]}, "
            f"dtype={self.torch_dtype}, device={self.device}>"
        )
