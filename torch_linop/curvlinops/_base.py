"""``CurvlinopsInterface``: curvlinops' arguments and extras on one of our operators.

Mixed in front of one of our operators (``class CurvlinopsHessian(CurvlinopsInterface,
HessianOperator)``), it supplies curvlinops' arguments (``params`` as a list or dict, ``(X, y)``
data with dict-like ``X``), ``gradient_and_loss()`` and its determinism check; products, the data
loop and the scipy protocol stay those of our operator. The public drop-in classes hold such an
operator behind curvlinops 3's face, :class:`~torch_linop.curvlinops._torch_base.
PyTorchLinearOperator` (re-exported here: the base every drop-in operator, KFAC included,
subclasses), through :class:`~torch_linop.curvlinops._curvature.CurvatureLinearOperator`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
from torch import nn

from torch_linop._autodiff import grads_or_zeros, make_leaves
from torch_linop._context import reparametrized
from torch_linop.curvlinops._loss import BatchSizeFn, CriterionLoss
from torch_linop.curvlinops._params import check_model, named_params
from torch_linop.curvlinops._tensor_list import flat_to_list, list_to_flat
from torch_linop.curvlinops._torch_base import PyTorchLinearOperator

__all__ = ["CurvlinopsInterface", "PyTorchLinearOperator", "check_data"]

RTOL, ATOL = 5e-5, 1e-6  # curvlinops' tolerances for the determinism check
CHECK_SEED = 0  # seed of the random vector the determinism check multiplies twice

BatchRecord = tuple[tuple[Any, torch.Tensor], torch.Tensor, Any, Any]


def check_data(data: Iterable[Any], batch_size_fn: BatchSizeFn | None) -> None:
    """curvlinops' rule: dict-like inputs need ``batch_size_fn`` (checked on the first batch)."""
    if isinstance(data, Iterator):
        raise TypeError(
            "data is a one-shot iterator or generator, but every product iterates over the data "
            "again; pass a list of (X, y) batches or a DataLoader"
        )
    first = next(iter(data), None)
    if first is None:
        raise ValueError("data yielded no batches; pass a non-empty list of (X, y) batches")
    if not isinstance(first, (tuple, list)) or len(first) != 2:
        raise ValueError(
            f"data must yield (X, y) pairs, got a {type(first).__name__}"
            + (f" of length {len(first)}" if isinstance(first, (tuple, list)) else "")
        )
    if isinstance(first[0], MutableMapping) and batch_size_fn is None:
        raise ValueError("When using dict-like custom data, `batch_size_fn` is required.")


def _close(first: Any, second: Any) -> bool:
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        return first.shape == second.shape and torch.allclose(first, second, RTOL, ATOL)
    if isinstance(first, Mapping) and isinstance(second, Mapping):
        return first.keys() == second.keys() and all(
            _close(first[key], second[key]) for key in first
        )
    if isinstance(first, (list, tuple)) and isinstance(second, (list, tuple)):
        return len(first) == len(second) and all(_close(a, b) for a, b in zip(first, second))
    return first is second or first == second


class CurvlinopsInterface:
    """curvlinops' constructor arguments and extra methods for one of our operators.

    Attributes:
        SELF_ADJOINT: the operator equals its adjoint (curvature matrices).
        FIXED_DATA_ORDER: the determinism check also compares every batch (MC Fisher, Jacobians).
    """

    SELF_ADJOINT: bool = True
    FIXED_DATA_ORDER: bool = False
    SUPPORTS_BLOCKS: bool = False

    # set by our operator's constructor (loss_fn is the CriterionLoss made by _prepare)
    model: nn.Module
    params: dict[str, torch.Tensor]
    _criterion_loss: CriterionLoss
    device: torch.device
    torch_dtype: torch.dtype
    shape: tuple[int, int]

    def _prepare(
        self,
        model_func: Any,
        loss_func: Any,
        params: Any,
        data: Iterable[Any],
        batch_size_fn: BatchSizeFn | None,
    ) -> tuple[nn.Module, CriterionLoss]:
        """Check curvlinops' arguments; returns the model and loss for our operator."""
        model = check_model(model_func)
        check_data(data, batch_size_fn)
        self._given_params = named_params(model, params)
        self._params_as_dict = isinstance(params, Mapping)
        shapes = [tensor.shape for tensor in self._given_params.values()]
        self._in_shapes: list[torch.Size] = shapes
        self._out_shapes: list[torch.Size] = shapes
        self._criterion_loss = CriterionLoss(loss_func, batch_size_fn)
        return model, self._criterion_loss

    def _select_params(self, model: nn.Module, param_filter: Any) -> dict[str, torch.Tensor]:
        return self._given_params

    def _device_batches(self) -> Iterator[Any]:
        """curvlinops' loading: ``X`` moved only when it is a tensor (dict-like ``X`` is the
        model's business), ``y`` always."""
        for inputs, targets in self.batches:  # type: ignore[attr-defined]
            if isinstance(inputs, torch.Tensor):
                inputs = inputs.to(self.device)
            if isinstance(targets, torch.Tensor):
                targets = targets.to(self.device)
            yield inputs, targets

    # ------------------------------------------------------------------ tensor lists
    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, list):
            flat, is_vector = list_to_flat(other, self._in_shapes)
            return flat_to_list(self.apply(flat), self._out_shapes, is_vector)  # type: ignore[attr-defined]
        return super().__matmul__(other)  # type: ignore[misc]

    # ------------------------------------------------------------------ gradient and loss
    def data_prediction_loss_gradient(self) -> Iterator[BatchRecord]:
        """Per batch: ``((X, y), prediction, loss, gradient)``, loss and gradient scaled by the
        batch's normalisation factor (``None`` without a loss function)."""
        leaves = make_leaves(self.params)
        leaf_list = list(leaves.values())
        for batch in self._device_batches():
            # never yield inside the context: two interleaved passes would nest it wrongly
            with self._product_context(), reparametrized(self.model, leaves):  # type: ignore[attr-defined]
                prediction = self._criterion_loss.forward(self.model, batch)
                loss = None
                if self._criterion_loss.criterion is not None:
                    factor = self._criterion_loss.batch_factor(batch, self.num_data)  # type: ignore[attr-defined]
                    loss = self._criterion_loss.loss(prediction, batch) * factor
            if loss is None:
                yield batch, prediction.detach(), None, None
                continue
            grads = torch.autograd.grad(loss, leaf_list, allow_unused=True)
            yield batch, prediction.detach(), loss.detach(), grads_or_zeros(grads, leaf_list)

    def gradient_and_loss(self) -> tuple[Any, torch.Tensor]:
        """Gradient and loss on the whole data (a list of tensors, or a dict for dict params)."""
        if self._criterion_loss.criterion is None:
            raise ValueError("No loss function specified.")
        total_loss = torch.zeros((), device=self.device, dtype=self.torch_dtype)
        total_grad = [torch.zeros_like(tensor) for tensor in self.params.values()]
        for _, _, loss, grads in self.data_prediction_loss_gradient():
            total_loss += loss
            for total, grad in zip(total_grad, grads):
                total += grad
        if self._params_as_dict:
            return dict(zip(self.params, total_grad)), total_loss
        return total_grad, total_loss

    # ------------------------------------------------------------------ determinism
    def check_deterministic(self, rtol: float = RTOL) -> None:  # noqa: ARG002
        """curvlinops' check: two passes give the same batch losses, total loss and gradient
        (and, for operators that need a fixed data order, the same batches, predictions and
        gradients), and two products with one random vector agree."""
        passes = itertools.zip_longest(
            self.data_prediction_loss_gradient(), self.data_prediction_loss_gradient()
        )
        totals: list[tuple[torch.Tensor, list[torch.Tensor]] | None] = [None, None]
        for first, second in passes:
            if first is None or second is None:
                self._nondeterministic("number of batches")
            if self.FIXED_DATA_ORDER:
                self._compare_batches(first, second)
            elif not _close(first[2], second[2]):
                # curvlinops compares the last batch's loss (in effect: rejects shuffling)
                self._nondeterministic("batch loss")
            for index, (_, _, loss, grads) in enumerate((first, second)):
                if loss is None:
                    continue
                if totals[index] is None:
                    totals[index] = (loss.clone(), [grad.clone() for grad in grads])
                    continue
                total_loss, total_grad = totals[index]  # type: ignore[misc]
                total_loss += loss
                for total, grad in zip(total_grad, grads):
                    total += grad
        if totals[0] is not None and totals[1] is not None:
            if not _close(totals[0][0], totals[1][0]):
                self._nondeterministic("total loss")
            if not _close(totals[0][1], totals[1][1]):
                self._nondeterministic("total gradient")
        generator = torch.Generator().manual_seed(CHECK_SEED)
        vector = torch.rand(self.shape[1], generator=generator, dtype=torch.float64)
        vector = vector.to(self.device, self.torch_dtype)
        if not _close(self.apply(vector), self.apply(vector)):  # type: ignore[attr-defined]
            self._nondeterministic("matvec")

    def _compare_batches(self, first: BatchRecord, second: BatchRecord) -> None:
        (x_1, y_1), (x_2, y_2) = first[0], second[0]
        pairs = {
            "X": (x_1, x_2),
            "y": (y_1, y_2),
            "batch prediction": (first[1], second[1]),
            "batch loss": (first[2], second[2]),
            "batch gradient": (first[3], second[3]),
        }
        for what, (a, b) in pairs.items():
            if not _close(a, b):
                self._nondeterministic(what)

    def _nondeterministic(self, what: str) -> None:
        order = (
            f"; {type(self).__name__} also needs the same batches in the same order"
            if self.FIXED_DATA_ORDER
            else ""
        )
        raise RuntimeError(
            f"Check for deterministic {what} failed: two passes over the data disagree. Likely "
            "causes: dropout or BatchNorm in train mode (call model.eval()), a DataLoader with "
            "shuffle=True or drop_last=True, or random data augmentation" + order + ". Pass "
            "check_deterministic=False only if you know the setup is deterministic."
        )
