"""``JacobianLinearOperator`` (``(N * out) x n``) and its adjoint
``TransposedJacobianLinearOperator``: the model output's Jacobian on the whole data, stacked over
batches. Products reuse the forward-mode JVP and the VJP of our GGN (``torch_linop._autodiff``);
the data loop, device handling and scipy protocol are those of :class:`CurvatureOperator`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from torch_linop._autodiff import (
    _lacks_forward_ad,
    double_backward_jvp,
    forward_with_tangent,
    make_leaves,
    vjp_columns,
)
from torch_linop._context import reparametrized
from torch_linop.curvlinops._base import CurvlinopsInterface
from torch_linop.curvlinops._curvature import CurvatureLinearOperator
from torch_linop.curvlinops._loss import BatchSizeFn
from torch_linop.operator import CurvatureOperator
from torch_linop.options import ProductOptions
from torch_linop.params import join_tensors, split_vector


class _JacobianBase(CurvlinopsInterface, CurvatureOperator):
    """Shared set-up: parameter space ``n``, output space ``(N, *out)``, fixed data order."""

    SELF_ADJOINT = False
    FIXED_DATA_ORDER = True
    is_symmetric = False  # CurvatureOperator's default is True

    def __init__(
        self,
        model_func: torch.nn.Module,
        params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        data: Iterable[Any],
        *,
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        batch_size_fn: BatchSizeFn | None = None,
    ) -> None:
        self._constructor_args = (model_func, params, data, progressbar, batch_size_fn)
        model, loss = self._prepare(model_func, None, params, data, batch_size_fn)
        CurvatureOperator.__init__(
            self,
            model,
            data,
            loss,
            options=ProductOptions(num_data=num_data, progress=progressbar),
        )
        param_shapes = self._in_shapes
        output_space = [torch.Size((self.num_data, *self._output_shape()[1:]))]
        self._in_shapes, self._out_shapes = self._spaces(param_shapes, output_space)
        sizes = [
            sum(int(s.numel()) for s in space) for space in (self._out_shapes, self._in_shapes)
        ]
        self.shape = (sizes[0], sizes[1])
        self._adjoint_operator: _JacobianBase | None = None
        if check_deterministic:
            self.check_deterministic()

    def _spaces(
        self, param_shapes: list[torch.Size], output_space: list[torch.Size]
    ) -> tuple[list[torch.Size], list[torch.Size]]:
        raise NotImplementedError

    def _output_shape(self) -> torch.Size:
        batch = next(iter(self._device_batches()))
        values = {name: tensor.detach() for name, tensor in self.params.items()}
        with torch.no_grad(), self._product_context(), reparametrized(self.model, values):
            return self._criterion_loss.forward(self.model, batch).shape

    def _output_and_leaves(self, batch: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = make_leaves(self.params)
        with reparametrized(self.model, leaves):
            output = self._criterion_loss.forward(self.model, batch)
        return output, list(leaves.values())

    # ------------------------------------------------------------------ adjoint and scipy
    def _other_class(self) -> type[_JacobianBase]:
        raise NotImplementedError

    def _adjoint(self) -> _JacobianBase:
        if self._adjoint_operator is None:
            model_func, params, data, progressbar, batch_size_fn = self._constructor_args
            self._adjoint_operator = self._other_class()(
                model_func,
                params,
                data,
                progressbar=progressbar,
                check_deterministic=False,
                num_data=self.num_data,
                batch_size_fn=batch_size_fn,
            )
        return self._adjoint_operator

    def _transpose(self) -> _JacobianBase:
        return self._adjoint()

    def adjoint(self) -> _JacobianBase:
        return self._adjoint()

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._adjoint()._matvec(x)

    def _rmatmat(self, X: np.ndarray) -> np.ndarray:
        return self._adjoint()._matmat(X)

    def rmatvec(self, x: Any) -> Any:
        return self._adjoint().matvec(x)

    def rmatmat(self, X: Any) -> Any:
        return self._adjoint().matmat(X)


class _Jacobian(_JacobianBase):
    """``J[(n, c), d] = d f(x_n)_c / d theta_d``: parameter space to stacked outputs."""

    def _spaces(self, param_shapes, output_space):
        return param_shapes, output_space

    def _other_class(self) -> type[_JacobianBase]:
        return _TransposedJacobian

    def _apply(self, columns: torch.Tensor) -> torch.Tensor:
        tangents = split_vector(columns, self._shapes)
        num_columns = columns.shape[1]
        values = {name: tensor.detach() for name, tensor in self.params.items()}
        blocks = []
        with self._product_context():
            for batch in self._device_batches():
                blocks.append(self._batch_jvps(batch, values, tangents))
        stacked = torch.cat(blocks, dim=1)  # (k, N, *out)
        return stacked.reshape(num_columns, -1).T

    def _batch_jvps(
        self, batch: Any, values: dict[str, torch.Tensor], tangents: list[torch.Tensor]
    ) -> torch.Tensor:
        def forward() -> torch.Tensor:
            return self._criterion_loss.forward(self.model, batch)

        columns = []
        for j in range(tangents[0].shape[0]):
            tangent = {name: t[j] for name, t in zip(values, tangents)}
            try:
                columns.append(forward_with_tangent(forward, self.model, values, tangent)[1])
            except (NotImplementedError, RuntimeError) as error:
                if not _lacks_forward_ad(error):
                    raise
                output, leaves = self._output_and_leaves(batch)
                columns.append(double_backward_jvp(output, leaves, list(tangent.values())))
        return torch.stack(columns)


class _TransposedJacobian(_JacobianBase):
    """``J^T``: stacked output space ``(N, *out)`` to parameter space."""

    def _spaces(self, param_shapes, output_space):
        return output_space, param_shapes

    def _other_class(self) -> type[_JacobianBase]:
        return _Jacobian

    def _apply(self, columns: torch.Tensor) -> torch.Tensor:
        num_columns = columns.shape[1]
        cotangents = columns.T.reshape(num_columns, *self._in_shapes[0])  # (k, N, *out)
        totals = [
            torch.zeros((num_columns, *shape), dtype=columns.dtype, device=columns.device)
            for shape in self._shapes
        ]
        start = 0
        with self._product_context():
            for batch in self._device_batches():
                size = self._samples_in(batch)
                output, leaves = self._output_and_leaves(batch)
                chunk = cotangents[:, start : start + size]
                for total, part in zip(totals, vjp_columns(output, leaves, chunk, batched=False)):
                    total += part
                start += size
        return join_tensors(totals, batched=True)


class _JacobianFace(CurvatureLinearOperator):
    """The curvlinops face of a Jacobian engine; ``adjoint()`` is the other class."""

    SELF_ADJOINT = False
    FIXED_DATA_ORDER = True
    _ENGINE: type[_JacobianBase]
    _ADJOINT_FACE: type[_JacobianFace]

    def __init__(
        self,
        model_func: torch.nn.Module,
        params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        data: Iterable[Any],
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        batch_size_fn: BatchSizeFn | None = None,
    ) -> None:
        operator = self._ENGINE(
            model_func,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
        )
        CurvatureLinearOperator.__init__(self, operator, params, data)

    def _adjoint(self) -> _JacobianFace:
        face = self._ADJOINT_FACE.__new__(self._ADJOINT_FACE)
        CurvatureLinearOperator.__init__(
            face, self._operator._adjoint(), self._given_params, self._given_data
        )
        return face


class JacobianLinearOperator(_JacobianFace):
    """``J[(n, c), d] = d f(x_n)_c / d theta_d`` on the whole data: maps parameter-space
    vectors to the stacked model outputs ``(N, *out)``; ``adjoint()`` is
    :class:`TransposedJacobianLinearOperator`."""

    _ENGINE = _Jacobian


class TransposedJacobianLinearOperator(_JacobianFace):
    """``J^T``: stacked output space ``(N, *out)`` to parameter space; ``adjoint()`` is
    :class:`JacobianLinearOperator`."""

    _ENGINE = _TransposedJacobian


JacobianLinearOperator._ADJOINT_FACE = TransposedJacobianLinearOperator
TransposedJacobianLinearOperator._ADJOINT_FACE = JacobianLinearOperator
