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

from torch_linop import data_parallel
from torch_linop._autodiff import _is_oom
from torch_linop._context import differentiable_attention, reparametrized, warn_if_tf32
from torch_linop._nondeterminism import warn_if_nondeterministic
from torch_linop._unreliable_derivatives import (
    warn_if_second_derivatives_unreliable,
    warn_if_tied_padding_rows,
)
from torch_linop.data import BatchSource, floating_dtypes, move_to_device
from torch_linop.linear_operator import TorchLinearOperator
from torch_linop.linear_operator import numpy_dtype_of as numpy_dtype_of  # re-exported
from torch_linop.losses.base import LossFunction, as_loss_function
from torch_linop.options import ProductOptions, accepts_old_option_keywords, resolve_options
from torch_linop.params import ParamFilter, frozen_entries, select_parameters, split_vector


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


class CurvatureOperator(TorchLinearOperator):
    """A symmetric ``(n, n)`` curvature matrix of ``model`` on ``data``, n = selected parameters.

    ``matvec``/``matmat`` on ndarrays return ndarrays (so ``eigsh``, ``lobpcg``, ``cg`` work);
    on torch tensors they return tensors on the model's device. The dataset matrix is the
    sample-weighted mean of per-batch matrices (``reduction="mean"`` losses) or their sum.
    How the data loop runs beyond that (``num_batches``, ``num_data``, a process group, ...) is
    set by ``options=`` (:class:`~torch_linop.options.ProductOptions`).
    """

    _frozen: torch.Tensor | None = None  # flat indices every product zeroes (frozen_entries)
    _last_batch: Any = None  # the batch a product is on (for _dtype_mismatch_message)

    @accepts_old_option_keywords
    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        loss_fn: LossFunction | Callable[..., torch.Tensor],
        *,
        param_filter: ParamFilter | None = None,
        options: ProductOptions | None = None,
    ) -> None:
        options = resolve_options(options)
        self.options = options
        num_batches, num_data = options.num_batches, options.num_data
        check_deterministic, process_group = options.check_deterministic, options.process_group
        model = data_parallel.unwrap_model(model)  # DDP: differentiate the wrapped module
        self.model = model
        self.process_group = data_parallel.check_process_group(process_group)
        self.loss_fn = as_loss_function(loss_fn)
        self.params: dict[str, torch.Tensor] = self._select_params(model, param_filter)
        method = getattr(self, "method", None)
        warn_if_second_derivatives_unreliable(model, self.params, type(self).__name__, method)
        jvp_method = getattr(self, "jvp_method", None) or getattr(
            getattr(self, "_sandwich", None), "jvp_method", None
        )
        warn_if_tied_padding_rows(model, self.params, type(self).__name__, method, jvp_method)
        self._shapes = [param.shape for param in self.params.values()]
        frozen = frozen_entries(model, self.params)
        self._frozen = (
            None if frozen is None else frozen.to(next(iter(self.params.values())).device)
        )
        self._sizes = [int(param.numel()) for param in self.params.values()]
        self.batches = BatchSource(data, num_batches)
        if not check_deterministic:  # that check raises on what this would warn about
            warn_if_nondeterministic(model, data, num_batches, type(self).__name__)
        self.batch_size_fn = options.batch_size_fn
        if num_data is not None and (
            not isinstance(num_data, int) or isinstance(num_data, bool) or num_data < 1
        ):
            raise ValueError(f"num_data must be a positive int or None, got {num_data!r}")
        self._num_data = num_data
        self._mass: float | None = None
        self.progress = options.progress
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
            batch = move_to_device(batch, self.device)
            self._last_batch = batch  # for the error message of a failing product
            yield batch

    def _dtype_mismatch_message(self, error: BaseException) -> str | None:
        """For a product that raised on a batch holding floating-point tensors of another dtype
        than the parameters (float32 data into a float64 model): what to do; else None."""
        batch, self._last_batch = self._last_batch, None
        if not isinstance(error, RuntimeError) or batch is None:
            return None
        others = sorted(str(d) for d in floating_dtypes(batch) - {self.torch_dtype})
        if not others:
            return None
        return (
            f"a {type(self).__name__} product failed on a batch holding {', '.join(others)} "
            f"tensors while the model's parameters are {self.torch_dtype}: cast the data to the "
            f"model's dtype (x.to({self.torch_dtype}), e.g. in the DataLoader's collate_fn) or "
            f"the model to the data's (model.to({others[0]})). PyTorch's error: {error}"
        )

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
            mass = self._batch_mass(batch)
            if mass is not None:  # a loss whose mean divides by a weight, not a count
                total = self._total_mass()  # raises if every target weighs 0
                if mass > 0:
                    yield mass / total, batch
                continue
            count = self._samples_in(batch)
            if count > 0:
                yield count / self.num_data, batch

    def _batch_mass(self, batch: Any) -> float | None:
        """The loss's own batch weight (class-weighted cross-entropy: the targets' total class
        weight), or None to weigh by sample counts (always when ``batch_size_fn`` is given)."""
        if self.batch_size_fn is not None:
            return None
        return self.loss_fn.batch_weight(batch)

    def _total_mass(self) -> float:
        """Sum of :meth:`_batch_mass` over the data; counted once, lazily."""
        if self._mass is None:
            if data_parallel.resolve(self.process_group) is not None:
                raise NotImplementedError(
                    "a class-weighted loss (cross-entropy with weight=...) over a process group "
                    "is not supported: its dataset mean divides by the class weights of all "
                    "ranks' targets. Run on one process, or use reduction='sum' and scale"
                )
            masses = [self._batch_mass(batch) for batch in self._device_batches()]
            total = sum(mass for mass in masses if mass is not None)
            if total <= 0:
                raise ValueError(
                    "the targets' class weights sum to 0 over the data (every label ignored or "
                    "weighted 0); check the labels and the criterion's weight"
                )
            self._mass = total
        return self._mass

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

    def check_symmetric(self, rtol: float | None = None, seed: int = 0) -> float:
        """Compare ``v^T (H w)`` with ``w^T (H v)`` for two seeded Gaussian probes (one product of
        two columns) and return their relative difference; raise if it exceeds ``rtol`` (default
        1e-6 for float64, 1e-2 for lower precision).

        Every curvature matrix is symmetric, so an asymmetric product means wrong numbers: a
        layer whose double backward PyTorch gets wrong (a weight norm), or products that are not
        reproducible (dropout or train-mode BatchNorm with a shuffled DataLoader)."""
        if rtol is None:
            rtol = 1e-6 if self.torch_dtype == torch.float64 else 1e-2
        generator = torch.Generator().manual_seed(seed)
        probes = torch.randn(self.shape[0], 2, generator=generator, dtype=torch.float64)
        probes = probes.to(device=self.device, dtype=self.torch_dtype)
        products = self.apply(probes).to(torch.float64)
        probes = probes.to(torch.float64)
        v_h_w = float(probes[:, 0] @ products[:, 1])
        w_h_v = float(probes[:, 1] @ products[:, 0])
        scale = max(
            float(probes[:, 0].norm() * products[:, 1].norm()),
            float(probes[:, 1].norm() * products[:, 0].norm()),
        )
        asymmetry = abs(v_h_w - w_h_v) / scale if scale > 0 else 0.0
        if asymmetry > rtol:
            raise RuntimeError(
                f"{type(self).__name__} is not symmetric: v^T H w = {v_h_w:.6g} but "
                f"w^T H v = {w_h_v:.6g} (relative difference {asymmetry:.2e} > rtol={rtol:g}), "
                "so its products are wrong. Likely causes: a layer whose double backward "
                "PyTorch gets wrong (weight norm: use HessianOperator(method='finite_difference') "
                "or the GGN), or products that are not reproducible (dropout or BatchNorm in "
                "train mode: model.eval(); a shuffled DataLoader: shuffle=False)"
            )
        return asymmetry

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
        if self._frozen is not None:  # padding rows of embeddings: see params.frozen_entries
            columns = columns.index_fill(0, self._frozen, 0.0)
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
            mismatch = self._dtype_mismatch_message(error)
            if mismatch is not None:
                raise TypeError(mismatch) from error
            raise
        finally:
            self._last_batch = None
        if totals is None:  # no batch held a sample with a weight
            return self._all_reduce_product(torch.zeros_like(columns))
        joined = torch.cat([total.reshape(num_columns, -1) for total in totals], dim=1).T
        if self._frozen is not None:
            joined = joined.index_fill(0, self._frozen, 0.0)
        return self._all_reduce_product(joined)

    def _out_of_memory_message(self, columns: torch.Tensor, error: BaseException) -> str:
        """The knobs that reduce a product's memory, for an out-of-memory error."""
        return (
            f"out of memory in a {type(self).__name__} product of {columns.shape[1]} column(s) "
            f"over {self.shape[0]:,} parameters on {self.device}. What helps: smaller batches "
            "(a smaller DataLoader batch_size) or fewer per product "
            "(options=ProductOptions(num_batches=...)); fewer "
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
