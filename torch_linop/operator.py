"""``CurvatureOperator``: the scipy ``LinearOperator`` that every curvature matrix is.

The class owns the data loop (sample-weighted mean of per-batch products) and plugs it into
:class:`~torch_linop.linear_operator.TorchLinearOperator`, which owns the scipy protocol, the
torch path (``H @ tensor`` stays on the device) and the algebra. Subclasses provide one pure
per-batch product.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from torch_linop._autodiff import _is_oom
from torch_linop._context import differentiable_attention, reparametrized, warn_if_tf32
from torch_linop.data import BatchSizeFn, BatchSource, move_to_device
from torch_linop.distributed import data_parallel
from torch_linop.linear_operator import TorchLinearOperator
from torch_linop.linear_operator import numpy_dtype_of as numpy_dtype_of  # re-exported
from torch_linop.losses.base import LossFunction, as_loss_function
from torch_linop.params import ParamFilter, select_parameters, split_vector


class CurvatureOperator(TorchLinearOperator):
    """A symmetric ``(n, n)`` curvature matrix of ``model`` on ``data``, n = selected parameters.

    ``matvec``/``matmat`` on ndarrays return ndarrays (so ``eigsh``, ``lobpcg``, ``cg`` work);
    on torch tensors they return tensors on the model's device. The dataset matrix is the
    sample-weighted mean of per-batch matrices (``reduction="mean"`` losses) or their sum.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        loss_fn: LossFunction | Callable[..., torch.Tensor],
        *,
        param_filter: ParamFilter | None = None,
        num_batches: int | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        num_data: int | None = None,
        check_deterministic: bool = False,
        progress: bool = False,
        process_group: Any = None,
    ) -> None:
        model = data_parallel.unwrap_model(model)  # DDP: differentiate the wrapped module
        self.model = model
        self.process_group = data_parallel.check_process_group(process_group)
        self.loss_fn = as_loss_function(loss_fn)
        self.params: dict[str, torch.Tensor] = self._select_params(model, param_filter)
        self._shapes = [param.shape for param in self.params.values()]
        self._sizes = [int(param.numel()) for param in self.params.values()]
        self.batches = BatchSource(data, num_batches)
        self.batch_size_fn = batch_size_fn
        if num_data is not None and (
            not isinstance(num_data, int) or isinstance(num_data, bool) or num_data < 1
        ):
            raise ValueError(f"num_data must be a positive int or None, got {num_data!r}")
        self._num_data = num_data
        self.progress = progress
        first = next(iter(self.params.values()))
        self.device: torch.device = first.device
        self.torch_dtype: torch.dtype = first.dtype
        size = sum(int(param.numel()) for param in self.params.values())
        super().__init__((size, size), self.torch_dtype, self.device)
        if check_deterministic:
            self.check_deterministic()

    def _select_params(
        self, model: nn.Module, param_filter: ParamFilter | None
    ) -> dict[str, torch.Tensor]:
        """The tensors the matrix is taken over, by parameter name. Hook: a subclass may return
        other values than the model's own (products evaluate the model at ``self.params``)."""
        return {name: p for name, p in select_parameters(model, param_filter).items()}

    # ----------------------------------------------------------------- data loop
    @property
    def num_data(self) -> int:
        """Total number of samples N over the (possibly limited) data; counted once, lazily."""
        if self._num_data is None:
            total = sum(self._samples_in(batch) for batch in self._device_batches())
            total = self._all_reduce_count(total)
            if total <= 0:
                raise ValueError(
                    "the data holds no samples with a target (every label ignored?); "
                    "check the labels or pass num_data"
                )
            self._num_data = total
        return self._num_data

    def _samples_in(self, batch: Any) -> int:
        if self.batch_size_fn is not None:
            returned = self.batch_size_fn(batch)
            try:  # whole numbers: ints, numpy scalars, 0-d tensors
                value = float(returned)
            except (TypeError, ValueError):
                value = -1.0
            whole = value.is_integer() and not isinstance(returned, bool)
            count = int(value) if whole else -1
            if count < 0:
                raise ValueError(
                    f"batch_size_fn returned {returned!r} for a batch; it must return the "
                    "batch's number of samples as an int >= 0"
                )
            return count
        return int(self.loss_fn.num_samples(batch))

    def _device_batches(self) -> Iterator[Any]:
        for batch in self.batches:
            yield move_to_device(batch, self.device)

    def weighted_batches(self) -> Iterator[tuple[float, Any]]:
        """Batches on the model's device with their weight ``n_b / N`` (or 1 for sums)."""
        iterator: Iterable[Any] = self._device_batches()
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc=type(self).__name__, leave=False)
        if self.loss_fn.reduction == "mean":
            _ = self.num_data  # raises if no batch holds a sample (else every weight would be 0)
        for batch in iterator:
            if self.loss_fn.reduction == "sum":
                yield 1.0, batch
                continue
            count = self._samples_in(batch)
            if count > 0:
                yield count / self.num_data, batch

    def check_deterministic(self, rtol: float = 1e-8) -> None:
        """Raise if two passes over the data give different losses or batch sizes (dropout in
        train mode, shuffling DataLoaders, ``drop_last`` with shuffling)."""
        first_pass = [(self._samples_in(b), self._batch_loss(b)) for b in self._device_batches()]
        second_pass = [(self._samples_in(b), self._batch_loss(b)) for b in self._device_batches()]
        same = len(first_pass) == len(second_pass) and all(
            n1 == n2 and torch.allclose(l1, l2, rtol=rtol, atol=0.0)
            for (n1, l1), (n2, l2) in zip(first_pass, second_pass)
        )
        if not same:
            raise RuntimeError(
                "the model or data is not deterministic: two passes over the data gave different "
                "losses or batch sizes. Likely causes: dropout or BatchNorm in train mode (call "
                "model.eval()), a DataLoader with shuffle=True, or random data augmentation."
            )

    def _batch_loss(self, batch: Any) -> torch.Tensor:
        # under reparametrized: train-mode BatchNorm updates clones, not the model's statistics
        with torch.no_grad(), self._product_context(), reparametrized(self.model, self.params):
            return self.loss_fn(self.model, batch).detach()

    # ----------------------------------------------------------------- products
    def batch_product(self, batch: Any, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-batch matrix times ``tangents`` (each ``(k, *param.shape)``). Subclasses override."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _product_context(self) -> Iterator[None]:
        warn_if_tf32(self.device)
        with differentiable_attention():
            yield

    def _weighted_products(
        self, tangents: list[torch.Tensor]
    ) -> Generator[tuple[float, list[torch.Tensor]], None, None]:
        """``(weight, per-batch product)`` over the data, inside the product context. Hook: the
        Hessian's cached-graph mode multiplies with kept per-batch graphs instead."""
        with self._product_context():
            for weight, batch in self.weighted_batches():
                yield weight, self.batch_product(batch, tangents)

    def _split_columns(self, columns: torch.Tensor) -> list[torch.Tensor]:
        """``(k, *param.shape)`` views of ``(n, k)`` columns; one column is split without the
        transposing copy that :func:`split_vector` makes for several."""
        if columns.shape[1] != 1:
            return split_vector(columns, self._shapes)
        pieces = torch.split(columns.view(-1), self._sizes)
        return [piece.view(1, *shape) for piece, shape in zip(pieces, self._shapes)]

    def _apply(self, columns: torch.Tensor) -> torch.Tensor:
        """Matrix times ``columns`` of shape ``(n, k)``, both torch on the model's device."""
        num_columns = columns.shape[1]
        tangents = self._split_columns(columns)
        totals: list[torch.Tensor] | None = None
        owned = False  # whether ``totals`` may be written in place (not a batch's own product)
        products = self._weighted_products(tangents)
        try:
            with contextlib.closing(products):
                for weight, batch_products in products:
                    with torch.no_grad():
                        if totals is None and weight == 1.0:  # one batch, or sums: no scaling
                            totals = list(batch_products)
                        elif totals is None:
                            totals, owned = list(torch._foreach_mul(batch_products, weight)), True
                        elif owned:
                            torch._foreach_add_(totals, batch_products, alpha=weight)
                        else:
                            totals = list(torch._foreach_add(totals, batch_products, alpha=weight))
                            owned = True
        except Exception as error:
            self._share_failure(error, num_columns)
            if _is_oom(error):
                raise torch.OutOfMemoryError(self._out_of_memory_message(columns, error)) from error
            raise
        if totals is None:  # no batch held a sample with a weight
            return self._all_reduce_product(torch.zeros_like(columns))
        joined = torch.cat([total.reshape(num_columns, -1) for total in totals], dim=1).T
        return self._all_reduce_product(joined)

    def _out_of_memory_message(self, columns: torch.Tensor, error: BaseException) -> str:
        """The knobs that reduce a product's memory, for an out-of-memory error."""
        return (
            f"out of memory in a {type(self).__name__} product of {columns.shape[1]} column(s) "
            f"over {self.shape[0]:,} parameters on {self.device}. What helps: smaller batches "
            "(a smaller DataLoader batch_size) or fewer per product (num_batches=...); fewer "
            "columns per product (the matmat block size: block_size=... in the solvers); a "
            "lighter product path (HessianOperator(method='finite_difference'), or the GGN "
            "instead of the Hessian, GGNOperator(jvp_method='finite_difference')); eigenvalue-"
            "only mode (lanczos(..., return_eigenvectors=False)); the Lanczos basis on the host "
            f"(basis_device='cpu'). Original error: {error}"
        )

    # ----------------------------------------------------------------- data-parallel hooks
    # ``process_group``: None = the default group if initialised, False = off (distributed how-to)
    def _all_reduce_count(self, count: int) -> int:
        """Total sample count over all ranks (identity without a process group)."""
        return data_parallel.all_reduce_count(self, count)

    def _all_reduce_product(self, product: torch.Tensor) -> torch.Tensor:
        """Sum of the ranks' weighted products (identity without a process group)."""
        return data_parallel.all_reduce_product(self, product)

    def _share_failure(self, error: BaseException, num_columns: int) -> None:
        """A product raised on this rank: make the other ranks raise too (no-op without a group)."""
        data_parallel.share_failure(self, error, num_columns)

    # ----------------------------------------------------------------- torch face
    # the scipy protocol, the torch path and the input checks live in TorchLinearOperator
    is_symmetric = True
    _dtype_owner = "the parameters'"
    _device_owner = "the model"

    def _size_note(self) -> str:
        return f" — {self.shape[1]} is the number of selected parameters —"

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        """The data loop's product (``_apply``) on checked ``(n, k)`` columns."""
        # products differentiate the model: they work inside torch.no_grad() and
        # torch.inference_mode() too (the caller's vector is copied out of inference mode)
        with torch.inference_mode(False), torch.enable_grad():
            if X.is_inference():
                X = X.clone()
            return self._apply(X)

    def _non_finite_hint(self) -> str:
        return (
            "the model's output or loss is non-finite on some batch (check the data for "
            "NaN/Inf and the model for overflow; for half precision, try float32)"
        )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.shape[0]}x{self.shape[1]} over {len(self.params)} "
            f"parameter tensors, dtype={self.torch_dtype}, device={self.device}>"
        )
