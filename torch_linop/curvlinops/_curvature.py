"""``CurvatureLinearOperator``: the curvlinops 3 face of one of our operators.

A drop-in class (``HessianLinearOperator``, ...) is a :class:`PyTorchLinearOperator` (torch
``dtype``, ``device``, tensor and tensor-list products, algebra, ``to_scipy()``) that holds one
of our operators, ``.operator``, built with curvlinops' arguments (``_base.CurvlinopsInterface``
mixed into e.g. :class:`~torch_linop.HessianOperator`). Every product is that operator's
``apply``: the product code is ours, only the face differs. ``.operator`` is the torch-linop face
of the same matrix (a scipy ``LinearOperator`` with a numpy ``dtype``), for our solvers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from torch_linop.curvlinops._torch_base import PyTorchLinearOperator


class CurvatureLinearOperator(PyTorchLinearOperator):
    """curvlinops 3's ``CurvatureLinearOperator`` face over our operator ``operator``.

    Attributes:
        SUPPORTS_BLOCKS: whether ``block_sizes`` is accepted (the Hessian).
        FIXED_DATA_ORDER: whether products need the batches in one fixed order.
    """

    SELF_ADJOINT = True
    SUPPORTS_BLOCKS: bool = False
    FIXED_DATA_ORDER: bool = False

    def __init__(self, operator: Any, params: Any, data: Any) -> None:
        self._operator = operator
        self._given_params, self._given_data = params, data
        super().__init__(operator._in_shapes, operator._out_shapes)

    @property
    def operator(self) -> Any:
        """The same matrix as one of our operators (scipy face, numpy ``dtype``), e.g. for
        :func:`torch_linop.lanczos` or :func:`torch_linop.trace`."""
        return self._operator

    @property
    def device(self) -> torch.device:
        return torch.device(self._operator.device)

    @property
    def dtype(self) -> torch.dtype:
        return self._operator.torch_dtype

    def _matmat(self, X: list[Tensor]) -> list[Tensor]:
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in X])
        product = self._operator.apply(flat)
        sizes = self._out_shape_flat
        return [
            chunk.reshape(*shape, flat.shape[1])
            for chunk, shape in zip(product.split(sizes), self._out_shape)
        ]

    def _matmat_tensor(self, X: Tensor) -> Tensor:
        """Flat tensors go straight to our operator (no split into the parameter shapes)."""
        if X.ndim not in (1, 2) or X.shape[0] != self.shape[1]:
            raise ValueError(
                f"Input tensor must have shape ({self.shape[1]},) or ({self.shape[1]}, K), with K "
                f"arbitrary. Got {tuple(X.shape)}."
            )
        return self._operator.apply(X)

    # ------------------------------------------------------------------ curvlinops' extras
    def gradient_and_loss(self) -> tuple[Any, Tensor]:
        """Gradient (a list, or a dict when ``params`` was a dict) and loss on the data."""
        return self._operator.gradient_and_loss()

    def data_prediction_loss_gradient(self, desc: str = "") -> Iterator[Any]:  # noqa: ARG002
        """Per batch ``((X, y), prediction, loss, gradient)``, as curvlinops."""
        return self._operator.data_prediction_loss_gradient()

    def _check_deterministic(self) -> None:
        self._operator.check_deterministic()

    def check_deterministic(self) -> None:
        """Raise RuntimeError if two passes over the data or two products disagree."""
        self._operator.check_deterministic()

    @property
    def _params(self) -> Any:
        """The ``params`` given (list or dict), as curvlinops keeps them."""
        return self._given_params

    @property
    def params(self) -> dict[str, Tensor]:
        """``{name: tensor}`` the matrix is taken over."""
        return self._operator.params

    @property
    def _model_func(self) -> Any:
        return self._operator.model

    @property
    def _loss_func(self) -> Any:
        return self._operator._criterion_loss.criterion

    @property
    def _data(self) -> Any:
        return self._given_data

    @property
    def _N_data(self) -> int:
        return self._operator.num_data

    @property
    def num_data(self) -> int:
        return self._operator.num_data
