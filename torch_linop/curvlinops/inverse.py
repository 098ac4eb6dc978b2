"""Inverse operators ``A^{-1}`` by conjugate gradients, LSMR or a truncated Neumann series, in
curvlinops 2.x style (``set_*_hyperparameters``) and 3.x style (keywords at construction).

Each is a curvlinops 3 operator (torch in, torch out; ``to_scipy()`` for numpy). CG and LSMR run
scipy's solvers on ``A.to_scipy()`` (float64), one column at a time; the Neumann series
multiplies with ``A`` in torch. ``A`` may be any operator with curvlinops 3's protocol, a dense
tensor or a scipy operator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse.linalg as sla
import torch
from scipy.sparse.linalg import LinearOperator

from torch_linop.curvlinops._dual import DualOperator, device_and_dtype, torch_matmat


def as_scipy(operator: Any) -> LinearOperator:
    """A scipy ``LinearOperator`` for ``operator`` (ours, curvlinops 3, torch or numpy)."""
    if isinstance(operator, torch.Tensor):
        return sla.aslinearoperator(operator.detach().cpu().numpy())
    if isinstance(operator, LinearOperator):
        return operator
    if hasattr(operator, "to_scipy"):
        return operator.to_scipy(np.float64)
    return sla.aslinearoperator(operator)


class _InverseOperator(DualOperator):
    """``A^{-1}`` for a square ``A``; subclasses solve ``A X = B`` for ``(n, k)`` columns."""

    def __init__(self, A: Any) -> None:
        if len(A.shape) != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(
                f"Input linear operator must be square to form an inverse, got {A.shape}"
            )
        device, dtype = device_and_dtype(A)
        in_shapes, out_shapes = getattr(A, "_in_shape", None), getattr(A, "_out_shape", None)
        shapes = in_shapes if in_shapes is not None and in_shapes == out_shapes else None
        super().__init__((A.shape[0], A.shape[1]), device, dtype, shapes, shapes)
        self._A = A

    def _adjoint(self) -> _InverseOperator:
        """``(A^{-1})^T = (A^T)^{-1}``: itself when ``A`` is its own adjoint."""
        adjoint = self._A.T if isinstance(self._A, torch.Tensor) else self._A.adjoint()
        return self if adjoint is self._A else self._with_operator(adjoint)

    def _with_operator(self, A: Any) -> _InverseOperator:
        raise NotImplementedError

    def adjoint(self) -> _InverseOperator:
        return self._adjoint()


_GPYTORCH_CG_KEYS = (
    "tolerance",
    "max_iter",
    "initial_guess",
    "preconditioner",
    "eps",
    "stop_updating_after",
    "max_tridiag_iter",
    "n_tridiag",
)


class CGInverseLinearOperator(_InverseOperator):
    """``A^{-1}`` by conjugate gradients (``A`` symmetric positive definite).

    2.x style: ``CGInverseLinearOperator(A).set_cg_hyperparameters(tol=..., maxiter=...)``
    (scipy ``cg`` keywords; ``tol`` is scipy's ``rtol``). 3.x style:
    ``CGInverseLinearOperator(A, tolerance=..., max_iter=...)`` (GPyTorch ``linear_cg`` keywords;
    ``tolerance`` is the relative residual, ``initial_guess`` the start, ``preconditioner`` a
    function of a torch tensor; ``eps``, ``stop_updating_after`` and ``max_tridiag_iter`` have no
    scipy counterpart and are accepted without effect). Default: relative residual 1e-5.
    """

    def __init__(self, A: Any, **cg_hyperparameters: Any) -> None:
        super().__init__(A)
        self._A_scipy = as_scipy(A)
        self.set_cg_hyperparameters(**cg_hyperparameters)

    def _with_operator(self, A: Any) -> CGInverseLinearOperator:
        inverse = CGInverseLinearOperator(A)
        inverse._cg_hyperparameters = dict(self._cg_hyperparameters)
        return inverse

    def set_cg_hyperparameters(
        self,
        x0: Any = None,
        tol: float | None = None,
        maxiter: int | None = None,
        M: Any = None,
        callback: Callable[[np.ndarray], None] | None = None,
        atol: float | None = None,
        *,
        rtol: float | None = None,
        **gpytorch_style: Any,
    ) -> None:
        """Store the CG hyper-parameters used by every product (see the class docstring)."""
        unknown = set(gpytorch_style) - set(_GPYTORCH_CG_KEYS)
        if unknown:
            raise TypeError(
                f"unknown CG hyper-parameters {sorted(unknown)}; use scipy's (x0, tol/rtol, "
                f"maxiter, M, callback, atol) or GPyTorch's {list(_GPYTORCH_CG_KEYS[:4])}"
            )
        if gpytorch_style.get("n_tridiag", 0):
            raise ValueError("n_tridiag > 0 (tridiagonalisations) is not supported")
        if tol is not None and rtol is not None:
            raise ValueError("pass tol (curvlinops 2.x) or rtol (scipy), not both")
        relative = rtol if rtol is not None else tol
        relative = gpytorch_style.get("tolerance", relative)
        preconditioner = gpytorch_style.get("preconditioner")
        if preconditioner is not None:
            M = self._torch_preconditioner(preconditioner)
        self._cg_hyperparameters = {
            "x0": gpytorch_style.get("initial_guess", x0),
            "rtol": 1e-5 if relative is None else float(relative),
            "atol": 0.0 if atol is None else float(atol),
            "maxiter": gpytorch_style.get("max_iter", maxiter),
            "M": M,
            "callback": callback,
        }
        self.info: list[int] = []

    def _torch_preconditioner(self, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        def apply(x: np.ndarray) -> np.ndarray:
            tensor = torch.as_tensor(np.asarray(x).reshape(-1, 1), device=self.device)
            result = function(tensor.to(self.dtype))
            return result.detach().to("cpu", torch.float64).numpy().reshape(-1)

        return LinearOperator(self.shape, matvec=apply, dtype=np.float64)

    def _start(self, column: int) -> np.ndarray | None:
        x0 = self._cg_hyperparameters["x0"]
        if x0 is None:
            return None
        start = x0.detach().cpu().numpy() if isinstance(x0, torch.Tensor) else np.asarray(x0)
        return start[:, column] if start.ndim == 2 else start

    def _apply_torch(self, columns: torch.Tensor) -> torch.Tensor:
        right_hand_sides = columns.detach().to("cpu", torch.float64).numpy()
        options = {key: value for key, value in self._cg_hyperparameters.items() if key != "x0"}
        solutions, self.info = [], []
        for index, rhs in enumerate(right_hand_sides.T):
            solution, info = sla.cg(self._A_scipy, rhs, x0=self._start(index), **options)
            solutions.append(solution)
            self.info.append(info)
        stacked = np.column_stack(solutions)
        return torch.as_tensor(stacked, device=columns.device, dtype=columns.dtype)


class LSMRInverseLinearOperator(_InverseOperator):
    """``A^{-1}`` (least-squares solution) by scipy's LSMR.

    2.x style: ``set_lsmr_hyperparameters(damp, atol, btol, conlim, maxiter, show, x0)``; 3.x
    style: the same keywords at construction. ``matvec_with_info(x)`` returns scipy's full tuple.
    """

    def __init__(self, A: Any, **lsmr_hyperparameters: Any) -> None:
        super().__init__(A)
        self._A_scipy = as_scipy(A)
        self.set_lsmr_hyperparameters(**lsmr_hyperparameters)

    def _with_operator(self, A: Any) -> LSMRInverseLinearOperator:
        return LSMRInverseLinearOperator(A, **self._lsmr_hyperparameters)

    def set_lsmr_hyperparameters(
        self,
        damp: float = 0.0,
        atol: float | None = 1e-6,
        btol: float | None = 1e-6,
        conlim: float | None = 1e8,
        maxiter: int | None = None,
        show: bool = False,
        x0: np.ndarray | None = None,
    ) -> None:
        """Store the LSMR hyper-parameters (scipy's defaults)."""
        self._lsmr_hyperparameters = {
            "damp": damp,
            "atol": atol,
            "btol": btol,
            "conlim": conlim,
            "maxiter": maxiter,
            "show": show,
            "x0": x0,
        }
        self._lsmr_info: list[tuple[Any, ...]] = []

    def matvec_with_info(self, x: np.ndarray) -> tuple[Any, ...]:
        """scipy's ``lsmr`` output for ``A^{-1} x``: ``(x, istop, itn, normr, ...)``."""
        return sla.lsmr(
            self._A_scipy, np.asarray(x, dtype=np.float64), **self._lsmr_hyperparameters
        )

    def _apply_torch(self, columns: torch.Tensor) -> torch.Tensor:
        right_hand_sides = columns.detach().to("cpu", torch.float64).numpy()
        results = [self.matvec_with_info(rhs) for rhs in right_hand_sides.T]
        self._lsmr_info = [result[1:] for result in results]
        solutions = np.column_stack([result[0] for result in results])
        return torch.as_tensor(solutions, device=columns.device, dtype=columns.dtype)


class NeumannInverseLinearOperator(_InverseOperator):
    """``A^{-1} ~ scale * sum_{k=0}^{K} (I - scale * A)^k`` (converges for eigenvalues of A in
    ``(0, 2 / scale)``); ``check_nan`` raises ValueError when the series diverges to NaN."""

    def __init__(
        self, A: Any, num_terms: int = 100, scale: float = 1.0, check_nan: bool = True
    ) -> None:
        super().__init__(A)
        self.set_neumann_hyperparameters(num_terms=num_terms, scale=scale, check_nan=check_nan)

    def _with_operator(self, A: Any) -> NeumannInverseLinearOperator:
        return NeumannInverseLinearOperator(A, self._num_terms, self._scale, self._check_nan)

    def set_neumann_hyperparameters(
        self, num_terms: int = 100, scale: float = 1.0, check_nan: bool = True
    ) -> None:
        """Store the number of terms, the scale and whether to check for NaN (2.x style)."""
        if not isinstance(num_terms, int) or num_terms < 0:
            raise ValueError(f"num_terms must be a non-negative int, got {num_terms!r}")
        self._num_terms, self._scale, self._check_nan = num_terms, float(scale), check_nan

    def _apply_torch(self, columns: torch.Tensor) -> torch.Tensor:
        result, term = columns.clone(), columns.clone()
        for index in range(self._num_terms):
            term = term - self._scale * torch_matmat(self._A, term)
            result = result + term
            if self._check_nan and bool(torch.isnan(result).any()):
                raise ValueError(
                    f"Detected NaNs after application of {index}-th term. This is probably "
                    "because the Neumann series is non-convergent. Try decreasing `scale`."
                )
        return self._scale * result
