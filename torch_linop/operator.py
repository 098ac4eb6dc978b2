"""``CurvatureOperator``: the scipy ``LinearOperator`` that every curvature matrix is.

The class owns three things and nothing else: the scipy protocol (ndarray in, ndarray out, on the
model's device in between), the torch path (``H @ tensor`` stays on the device), and the data loop
(sample-weighted mean of per-batch products). Subclasses provide one pure per-batch product.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn

from torch_linop import data_parallel
from torch_linop._autodiff import _is_oom
from torch_linop._context import differentiable_attention, reparametrized, warn_if_tf32
from torch_linop.data import BatchSizeFn, BatchSource, move_to_device
from torch_linop.losses.base import LossFunction, as_loss_function
from torch_linop.params import ParamFilter, select_parameters, split_vector

_NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {
    torch.float64: np.dtype(np.float64),
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(np.float32),  # numpy has no bfloat16: ndarrays travel as float32
}


def numpy_dtype_of(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype an operator over ``dtype`` parameters advertises to scipy."""
    if dtype not in _NUMPY_DTYPES:
        raise TypeError(f"curvature operators need floating-point parameters, got {dtype}")
    return _NUMPY_DTYPES[dtype]


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN/Inf in ``tensor``, in one reduction: a NaN or Inf anywhere makes the sum
    non-finite (accumulated in float32 or better, so half-precision sums do not overflow)."""
    accumulate = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(tensor.sum(dtype=accumulate)))


def parameter_fingerprint(params: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per tensor ``"the shape of parameter 'name'"`` and ``"the values of parameter 'name'"``:
    ``[norm, sum + 2 norm sqrt(numel)]`` in float64 (the sum, which sees sign changes, shifted to
    stay positive, so both compare to a relative tolerance; one host transfer)."""
    if not params:
        return {}
    with torch.no_grad():
        rows = torch.stack(
            [
                torch.stack(
                    [
                        torch.linalg.vector_norm(tensor.detach(), dtype=torch.float64),
                        torch.sum(tensor.detach(), dtype=torch.float64),
                    ]
                ).cpu()
                for tensor in params.values()
            ]
        ).tolist()
    record: dict[str, Any] = {}
    for (name, tensor), (norm, total) in zip(params.items(), rows):
        record[f"the shape of parameter {name!r}"] = list(tensor.shape)
        shift = 2.0 * norm * float(tensor.numel()) ** 0.5
        record[f"the values of parameter {name!r}"] = [norm, total + shift]
    return record


class CurvatureOperator(LinearOperator):
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
        super().__init__(dtype=numpy_dtype_of(self.torch_dtype), shape=(size, size))
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

    @property
    def vector_space(self) -> Any:
        """Where the solvers' vectors live: None (whole local vectors), or with a process group
        of several ranks a replicated space whose seeds agree over the ranks (the solvers turn
        ``seed=None`` into one seed drawn on rank 0 and broadcast)."""
        return data_parallel.vector_space(self.process_group)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this matrix when a solver resumes from a checkpoint (JSON-able):
        its type, the settings that change its products, and each selected parameter's shape
        and float64 checksums of its values (see :func:`parameter_fingerprint`)."""
        record: dict[str, Any] = {"type": type(self).__name__}
        for setting in ("method", "jvp_method", "mc_samples", "seed"):
            value = getattr(self, setting, None)
            if isinstance(value, str | int | float) and not isinstance(value, bool):
                record[setting] = value
        record.update(parameter_fingerprint(self.params))
        return record

    def _check_tensor(self, tensor: torch.Tensor) -> None:
        size = self.shape[1]
        if tensor.dim() not in (1, 2) or tensor.shape[0] != size:
            raise ValueError(
                f"expected a vector of shape ({size},) or a matrix ({size}, k) — {size} is the "
                f"number of selected parameters — got shape {tuple(tensor.shape)}"
            )
        if tensor.dtype != self.torch_dtype:
            raise TypeError(
                f"tensor dtype {tensor.dtype} does not match the parameters' {self.torch_dtype}; "
                f"convert it with t.to(H.torch_dtype)"
            )
        if tensor.device != self.device:
            raise ValueError(
                f"tensor is on {tensor.device}, the model on {self.device}; move it with "
                "t.to(H.device) (ndarrays are moved automatically)"
            )
        if not _all_finite(tensor):
            raise ValueError("the vector contains NaN or Inf; curvature products need finite input")

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """Torch path: ``(n,)`` or ``(n, k)`` tensor in, the same shape out, on the model's device."""
        self._check_tensor(tensor)
        if tensor.dim() == 2 and tensor.shape[1] == 0:
            return torch.zeros_like(tensor)
        # products differentiate the model: they work inside torch.no_grad() and
        # torch.inference_mode() too (the caller's vector is copied out of inference mode)
        with torch.inference_mode(False), torch.enable_grad():
            if tensor.is_inference():
                tensor = tensor.clone()
            result = self._apply(tensor.unsqueeze(1) if tensor.dim() == 1 else tensor)
        if not _all_finite(result):
            raise ValueError(
                f"{type(self).__name__} product is not finite (NaN or Inf) for a finite input: "
                "the model's output or loss is non-finite on some batch (check the data for "
                "NaN/Inf and the model for overflow; for half precision, try float32)"
            )
        return result.squeeze(1) if tensor.dim() == 1 else result

    # ----------------------------------------------------------------- scipy protocol
    def _apply_numpy(self, array: np.ndarray) -> np.ndarray:
        array = np.asarray(array)
        out_dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else self.dtype
        if np.iscomplexobj(array):
            raise TypeError("complex vectors are not supported; pass the real and imaginary parts")
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
        tensor = tensor.to(device=self.device, dtype=self.torch_dtype)
        result = self.apply(tensor)
        return result.detach().to("cpu", torch.float64).numpy().astype(out_dtype, copy=False)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._apply_numpy(np.asarray(x).reshape(-1))

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        return self._apply_numpy(X)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _rmatmat(self, X: np.ndarray) -> np.ndarray:
        return self._matmat(X)

    def _adjoint(self) -> CurvatureOperator:
        return self

    def _transpose(self) -> CurvatureOperator:
        return self

    def matvec(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if x.dim() == 2 and x.shape[1] == 1:
                return self.apply(x)
            if x.dim() != 1:
                raise ValueError(f"matvec expects a vector, got shape {tuple(x.shape)}")
            return self.apply(x)
        return super().matvec(x)

    def rmatvec(self, x: Any) -> Any:
        return self.matvec(x)

    def matmat(self, X: Any) -> Any:
        if isinstance(X, torch.Tensor):
            if X.dim() != 2:
                raise ValueError(f"matmat expects a 2-d (n, k) matrix, got shape {tuple(X.shape)}")
            return self.apply(X)
        return super().matmat(X)

    def rmatmat(self, X: Any) -> Any:
        return self.matmat(X)

    def dot(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return self.apply(x)
        return super().dot(x)

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, torch.Tensor):
            return self.apply(other)
        return super().__matmul__(other)

    def to_scipy(self, dtype: Any = None) -> LinearOperator:
        """The operator as a scipy ``LinearOperator``: itself, or a view in another ``dtype``."""
        if dtype is None or np.dtype(dtype) == self.dtype:
            return self
        target = np.dtype(dtype)
        return LinearOperator(
            self.shape,
            matvec=lambda x: self._matvec(x).astype(target, copy=False),
            matmat=lambda X: self._matmat(X).astype(target, copy=False),
            rmatvec=lambda x: self._matvec(x).astype(target, copy=False),
            rmatmat=lambda X: self._matmat(X).astype(target, copy=False),
            dtype=target,
        )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.shape[0]}x{self.shape[1]} over {len(self.params)} "
            f"parameter tensors, dtype={self.torch_dtype}, device={self.device}>"
        )
