"""Curvature products on FSDP2 (``fully_shard``) models, with vectors sharded like the parameters.

Under FSDP2 every parameter is a DTensor sharded on dim 0 over the ranks of a 1-D mesh, and each
rank iterates its own shard of the data. The only derivative FSDP2 computes is the gradient of
the (rank-averaged) loss through its own forward/backward, with layer-wise all-gathers and
reduce-scatters; double backward and forward-mode AD do not run through it. So:

* ``FSDPHessianOperator``: ``H v ~ (g(theta + h v) - g(theta - h v)) / 2h``, central differences
  of full-data gradients (two FSDP gradient passes per column). Approximate, with exactly the
  step rule of ``HessianOperator(method="finite_difference")``: relative error ~1e-10 in
  float64, ~1e-5 in float32.
* ``FSDPGGNOperator``: ``J^T H_loss J v`` with a central-difference JVP (two no-grad forwards per
  column and batch), the exact closed-form loss Hessian on the output, and an exact VJP through
  FSDP's backward. Approximate in the JVP only (same step rule as ``jvp_method=
  "finite_difference"``).

A vector is this rank's part: the concatenation of the local shards of the selected parameters,
shape ``(local_size,)`` or ``(local_size, k)``; no rank ever holds a full vector. The products are
the sample-weighted mean over all ranks' data, like the replicated operators.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from torch_linop._context import differentiable_attention
from torch_linop._finite_difference import entry_cap, rms, step_size
from torch_linop.data import BatchSizeFn, BatchSource, move_to_device
from torch_linop.distributed._collectives import check_finite_on_all_ranks, comm_device
from torch_linop.distributed.fsdp_forward_ad import reverse_over_forward_fixes, sharded_tangents
from torch_linop.distributed.sharded_space import ShardedSpace, local_rows, sharded_entries
from torch_linop.ggn import _require_split, output_hvp_of
from torch_linop.losses.base import LossFunction, as_loss_function
from torch_linop.operator import parameter_fingerprint
from torch_linop.params import ParamFilter

FSDP_HESSIAN_METHODS = ("finite_difference", "autograd")
FSDP_GGN_JVP_METHODS = ("forward", "finite_difference")


def _select_sharded(model: nn.Module, param_filter: ParamFilter | None) -> dict[str, DTensor]:
    selected = {
        name: param
        for name, param in model.named_parameters()
        if param.requires_grad and (param_filter is None or param_filter(name, param))
    }
    if not selected:
        raise ValueError(
            "no parameter selected: every parameter is frozen or rejected by param_filter"
        )
    sharded: dict[str, DTensor] = {
        name: param for name, param in selected.items() if isinstance(param, DTensor)
    }
    plain = [name for name in selected if name not in sharded]
    if plain:
        raise TypeError(
            f"parameters {plain[:4]} are not DTensors: call torch.distributed.fsdp.fully_shard "
            "on the model (and its blocks) before building a sharded operator; for replicated "
            "models use HessianOperator/GGNOperator, which are data-parallel on their own"
        )
    for name, param in sharded.items():
        if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
            raise ValueError(
                f"parameter {name} has placements {tuple(param.placements)} on a "
                f"{param.device_mesh.ndim}-d mesh; sharded operators support FSDP2's default "
                "dim-0 sharding on a 1-d mesh (no HSDP, no shard_placement_fn)"
            )
    mesh = next(iter(sharded.values())).device_mesh
    if any(param.device_mesh != mesh for param in sharded.values()):
        raise ValueError("the selected parameters live on different device meshes")
    dtypes = {param.dtype for param in sharded.values()}
    if len(dtypes) > 1:
        raise ValueError(f"selected parameters have several dtypes {sorted(map(str, dtypes))}")
    return sharded


class ShardedOperator:
    """A symmetric ``(n, n)`` curvature matrix of an FSDP2 model acting on sharded vectors.

    ``H @ local`` takes this rank's part of a vector, ``(local_size,)`` or ``(local_size, k)``,
    and returns this rank's part of the product. Every rank must call it with its part of the
    same vectors (SPMD). ``shard_vector`` / ``full_vector`` convert to and from full vectors
    (for tests and small models). Subclasses implement ``_column``.

    ``vector_space`` (a :class:`ShardedSpace`) tells the solvers of ``torch_linop.solvers``
    which entries this rank holds and all-reduces their inner products, so ``lanczos``,
    ``trace``, ``diagonal``, ``spectral_density`` and ``power_iteration`` run on it unchanged
    (every rank calls them with the same arguments) and return this rank's entries of vectors.
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
    ) -> None:
        if not isinstance(model, FSDPModule):
            raise TypeError(
                f"model must be an FSDP2 module (torch.distributed.fsdp.fully_shard(model)), got "
                f"{type(model).__name__}"
            )
        if num_data is not None and (not isinstance(num_data, int) or num_data < 1):
            raise ValueError(f"num_data must be a positive int or None, got {num_data!r}")
        self.model = model
        self.loss_fn = as_loss_function(loss_fn)
        _reshard(model)  # registered parameters are the sharded DTensors only when resharded
        self.params = _select_sharded(model, param_filter)
        first = next(iter(self.params.values()))
        self.mesh = first.device_mesh
        self.group = self.mesh.get_group()
        self.world = self.mesh.size()
        self.rank = self.mesh.get_local_rank()
        self.global_shapes = [tuple(param.shape) for param in self.params.values()]
        self.local_shapes = [tuple(_local(param).shape) for param in self.params.values()]
        for name, shape, local in zip(self.params, self.global_shapes, self.local_shapes):
            start, stop = local_rows(shape[0], self.world, self.rank)
            if local[0] != stop - start:
                raise ValueError(
                    f"parameter {name}: local shard has {local[0]} rows, the torch.chunk rule "
                    f"gives {stop - start}; custom shardings are not supported"
                )
        self.local_size = sum(_numel(shape) for shape in self.local_shapes)
        size = sum(_numel(shape) for shape in self.global_shapes)
        self.shape = (size, size)
        self.device = _local(first).device
        self.torch_dtype = first.dtype
        self.vector_space = ShardedSpace(
            self.group, sharded_entries(self.global_shapes, self.world, self.rank), self.device
        )
        self.batches = BatchSource(data, num_batches)
        self.batch_size_fn = batch_size_fn
        self._num_data = num_data
        self._num_steps: int | None = None
        self._theta_norm: float | None = None

    # ------------------------------------------------------------------ vectors
    def shard_vector(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full ``(n,)`` or ``(n, k)`` vector (same on every rank)."""
        columns = full.reshape(full.shape[0], -1)
        parts, offset = [], 0
        for shape in self.global_shapes:
            numel = _numel(shape)
            block = columns[offset : offset + numel].reshape(*shape, -1)
            start, stop = local_rows(shape[0], self.world, self.rank)
            rows = (stop - start) * (numel // max(1, shape[0]))
            parts.append(block[start:stop].reshape(rows, columns.shape[1]))
            offset += numel
        local = torch.cat(parts).to(self.device, self.torch_dtype)
        return local.reshape(-1) if full.dim() == 1 else local

    def full_vector(self, local: torch.Tensor) -> torch.Tensor:
        """The full vector from every rank's part (a collective; for tests and small models)."""
        columns = local if local.dim() == 2 else local[:, None]  # (no -1: parts may be empty)
        pieces = self._split(columns)
        full = []
        for piece, shape in zip(pieces, self.global_shapes):
            chunk = -(-shape[0] // self.world)
            padded = torch.zeros(
                chunk, *shape[1:], columns.shape[1], dtype=local.dtype, device=local.device
            )
            rows = piece.movedim(0, -1)  # (k, *local) -> (*local, k)
            padded[: rows.shape[0]] = rows
            gathered = [torch.empty_like(padded) for _ in range(self.world)]
            dist.all_gather(gathered, padded.contiguous(), group=self.group)
            full.append(torch.cat(gathered)[: shape[0]].reshape(-1, columns.shape[1]))
        result = torch.cat(full)
        return result.reshape(-1) if local.dim() == 1 else result

    def _split(self, columns: torch.Tensor) -> list[torch.Tensor]:
        """``(local_size, k)`` -> per parameter ``(k, *local_shape)``."""
        sizes = [_numel(shape) for shape in self.local_shapes]
        return [
            block.T.reshape(columns.shape[1], *shape)
            for block, shape in zip(torch.split(columns, sizes), self.local_shapes)
        ]

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Global inner products of sharded vectors: ``a.T @ b`` summed over ranks."""
        return self.vector_space.inner(a, b)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this operator when a solver resumes from a checkpoint (each rank
        its own): type, product method, world size and rank, and the shape and checksums of
        this rank's parameter shards."""
        record: dict[str, Any] = {"type": type(self).__name__}
        for setting in ("method", "jvp_method"):
            value = getattr(self, setting, None)
            if isinstance(value, str):
                record[setting] = value
        record.update(world=self.world, rank=self.rank)
        shards = {name: _local(param) for name, param in self.params.items()}
        record.update(parameter_fingerprint(shards))
        return record

    # ------------------------------------------------------------------ data
    @property
    def num_data(self) -> int:
        """Samples over all ranks (one all-gather of ``[samples, batches]``, done once)."""
        self._count()
        assert self._num_data is not None
        return self._num_data

    def _count(self) -> None:
        if self._num_steps is not None:
            return
        samples = batches = 0
        for batch in self.batches:
            samples += self._samples_in(batch)
            batches += 1
        local = torch.tensor([samples, batches], dtype=torch.int64, device=_comm_device(self))
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local, group=self.group)
        table = torch.stack(gathered).cpu()
        if self._num_data is None:
            self._num_data = int(table[:, 0].sum())
            if self._num_data <= 0:
                raise ValueError("the data holds no samples on any rank; pass num_data")
        self._num_steps = int(table[:, 1].max())

    def _samples_in(self, batch: Any) -> int:
        if self.batch_size_fn is not None:
            return int(self.batch_size_fn(batch))
        return int(self.loss_fn.num_samples(batch))

    def _scaled_batches(self) -> Iterator[tuple[float, Any]]:
        """``(scale, batch)`` for the same number of steps on every rank. FSDP2 averages
        gradients over ranks, so ``scale = world * n_b / N`` (``world`` for summed losses) makes
        the reduced gradient the sample-weighted sum; ranks with fewer batches repeat their last
        batch with scale 0 so that every rank runs the same collectives."""
        self._count()
        assert self._num_steps is not None
        last = None
        steps = 0
        for batch in self.batches:
            last = move_to_device(batch, self.device)
            if self.loss_fn.reduction == "sum":
                yield float(self.world), last
            else:
                yield self.world * self._samples_in(last) / self.num_data, last
            steps += 1
        for _ in range(self._num_steps - steps):
            yield 0.0, last

    # ------------------------------------------------------------------ parameters
    def _accumulation_dtype(self) -> torch.dtype:
        return torch.float64 if self.torch_dtype == torch.float64 else torch.float32

    def theta_norm(self) -> float:
        """Norm of the selected parameters over all ranks (for the finite-difference step)."""
        if self._theta_norm is None:
            acc = self._accumulation_dtype()
            local = sum((_local(p).to(acc) ** 2).sum() for p in self.params.values())
            total = torch.as_tensor(local, dtype=torch.float64, device=_comm_device(self))
            dist.all_reduce(total, group=self.group)
            self._theta_norm = float(total.sqrt())
        return self._theta_norm

    def _step(self, direction: list[torch.Tensor], direction_norm: float) -> float:
        """The single-process step rule (torch_linop/_finite_difference.py) over all ranks:
        the per-entry cap is a local minimum, then an all-reduce MIN."""
        eps = torch.finfo(self.torch_dtype).eps
        acc = self._accumulation_dtype()
        theta = [_local(p).to(acc) for p in self.params.values()]
        num_entries = sum(_numel(tuple(p.shape)) for p in self.params.values())
        scale = rms(self.theta_norm(), num_entries)
        local_cap = entry_cap(theta, [d.to(acc) for d in direction], scale)
        cap = torch.tensor([local_cap], dtype=torch.float64, device=_comm_device(self))
        dist.all_reduce(cap, op=dist.ReduceOp.MIN, group=self.group)
        return step_size(eps, 1.0 / 3.0, self.theta_norm(), direction_norm, float(cap))

    def _norms(self, columns: torch.Tensor) -> list[float]:
        squares = (columns.to(self._accumulation_dtype()) ** 2).sum(dim=0).double()
        squares = squares.to(_comm_device(self))
        dist.all_reduce(squares, group=self.group)
        return squares.sqrt().tolist()

    @contextlib.contextmanager
    def _shifted(self, direction: list[torch.Tensor] | None, step: float) -> Iterator[None]:
        """Parameters temporarily at ``theta + step * direction`` (local shards written in
        place, restored bitwise from a copy)."""
        if direction is None or step == 0.0:
            yield
            return
        acc = self._accumulation_dtype()
        locals_ = [_local(param) for param in self.params.values()]
        saved = [local.detach().clone() for local in locals_]
        try:
            with torch.no_grad():
                for local, original, d in zip(locals_, saved, direction):
                    local.copy_((original.to(acc) + step * d.to(acc)).to(local.dtype))
            _reshard(self.model)
            yield
        finally:
            with torch.no_grad():
                for local, original in zip(locals_, saved):
                    local.copy_(original)
            _reshard(self.model)

    @contextlib.contextmanager
    def _gradients_aside(self) -> Iterator[None]:
        """The user's ``.grad`` of every model parameter is put aside and restored."""
        params = list(self.model.parameters())
        saved = [param.grad for param in params]
        for param in params:
            param.grad = None
        try:
            yield
        finally:
            for param, grad in zip(params, saved):
                param.grad = grad

    def _take_gradients(self) -> list[torch.Tensor]:
        grads = []
        for param, shape in zip(self.params.values(), self.local_shapes):
            grad: torch.Tensor | None = param.grad
            local = (
                torch.zeros(shape, dtype=self.torch_dtype, device=self.device)
                if grad is None
                else (_local(grad) if isinstance(grad, DTensor) else grad).detach().clone()
            )
            grads.append(local)
        for model_param in self.model.parameters():
            model_param.grad = None
        return grads

    def _tangents(self, direction: list[torch.Tensor]) -> contextlib.AbstractContextManager[None]:
        """Forwards inside carry the exact tangent of ``direction`` (this rank's shards)."""
        return sharded_tangents(
            self.model,
            dict(zip(self.params, direction)),
            {name: shape[0] for name, shape in zip(self.params, self.global_shapes)},
            group=self.group,
            world=self.world,
        )

    # ------------------------------------------------------------------ products
    def _column(self, direction: list[torch.Tensor], norm: float) -> list[torch.Tensor]:
        raise NotImplementedError

    def apply(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``H V`` for this rank's part of ``V``."""
        if local.dim() not in (1, 2) or local.shape[0] != self.local_size:
            raise ValueError(
                f"expected this rank's part of a vector, shape ({self.local_size},) or "
                f"({self.local_size}, k), got {tuple(local.shape)}; use shard_vector(full)"
            )
        if local.dtype != self.torch_dtype or local.device != self.device:
            raise TypeError(
                f"vector is {local.dtype} on {local.device}, the operator computes in "
                f"{self.torch_dtype} on {self.device}"
            )
        columns = local if local.dim() == 2 else local[:, None]  # (no -1: parts may be empty)
        directions = self._split(columns)
        norms = self._norms(columns)
        results = torch.zeros_like(columns)
        with self._gradients_aside(), _buffers_restored(self.model):
            for j, norm in enumerate(norms):
                if norm == 0.0:
                    continue
                product = self._column([d[j] for d in directions], norm)
                results[:, j] = torch.cat([p.reshape(-1) for p in product])
        check_finite_on_all_ranks(
            results,
            self.group,
            f"{type(self).__name__} product is not finite (NaN or Inf) for a finite input "
            "on some rank: the model's output or loss is non-finite on some batch (check "
            "the data for NaN/Inf and the model for overflow; for half precision, try "
            "float32)",
            ValueError,
        )
        return results.reshape(local.shape)

    def __matmul__(self, local: torch.Tensor) -> torch.Tensor:
        return self.apply(local)

    def matmat(self, local: torch.Tensor) -> torch.Tensor:
        return self.apply(local)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.shape[0]}x{self.shape[1]} sharded over {self.world} "
            f"ranks, local_size={self.local_size}, dtype={self.torch_dtype}>"
        )


class FSDPHessianOperator(ShardedOperator):
    """Hessian of an FSDP2 model's dataset loss.

    ``method="finite_difference"`` (default): central differences of FSDP gradients,
    ``(g(theta + h v) - g(theta - h v)) / 2h``, two full-data gradient passes per column, memory
    of FSDP training. ``method="autograd"``: exact, reverse-over-forward (the loss's forward-mode
    tangent ``g^T v`` backpropagated through FSDP's backward), one forward+backward per column
    and batch, but each block's all-gathered direction is kept for the backward (one full-length
    vector per rank in total); see ``fsdp_forward_ad``.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        loss_fn: LossFunction | Callable[..., torch.Tensor],
        *,
        method: str = "finite_difference",
        **kwargs: Any,
    ) -> None:
        if method not in FSDP_HESSIAN_METHODS:
            raise ValueError(
                f"method must be one of {FSDP_HESSIAN_METHODS}, got {method!r}; "
                "'autograd' is exact, 'finite_difference' needs no full-length vector per rank"
            )
        self.method = method
        super().__init__(model, data, loss_fn, **kwargs)

    def _gradient(self, direction: list[torch.Tensor], step: float) -> list[torch.Tensor]:
        with self._shifted(direction, step):
            for scale, batch in self._scaled_batches():
                (self.loss_fn(self.model, batch) * scale).backward()
        return self._take_gradients()

    def _column(self, direction: list[torch.Tensor], norm: float) -> list[torch.Tensor]:
        if self.method == "autograd":
            return self._exact_column(direction)
        step = self._step(direction, norm)
        acc = self._accumulation_dtype()
        plus = self._gradient(direction, step)
        minus = self._gradient(direction, -step)
        return [
            ((p.to(acc) - m.to(acc)) / (2.0 * step)).to(self.torch_dtype)
            for p, m in zip(plus, minus)
        ]

    def _exact_column(self, direction: list[torch.Tensor]) -> list[torch.Tensor]:
        """``H v``: FSDP's gradient of the loss's directional derivative ``g(theta)^T v``."""
        for scale, batch in self._scaled_batches():
            with (
                self._tangents(direction),
                differentiable_attention(),
                reverse_over_forward_fixes(),
            ):
                loss = self.loss_fn(self.model, batch)
                tangent = fwAD.unpack_dual(loss).tangent
                if tangent is None:  # the loss does not depend on the selected parameters
                    tangent = fwAD.unpack_dual(loss).primal * 0.0
                (tangent * scale).backward()
        return self._take_gradients()


class FSDPGGNOperator(ShardedOperator):
    """GGN ``J^T H_loss J`` of an FSDP2 model: a JVP, the exact loss Hessian on the output, and
    an exact VJP through FSDP's backward.

    ``jvp_method="forward"`` (default): exact forward-mode JVP through FSDP's blocks (one no-grad
    forward per column and batch; each block's direction is all-gathered and freed with it).
    ``"finite_difference"``: central-difference JVP (two no-grad forwards), for models with
    operations that have no forward-mode rule.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        loss_fn: LossFunction | Callable[..., torch.Tensor],
        loss_of_output_fn: Callable[..., torch.Tensor] | None = None,
        *,
        jvp_method: str = "forward",
        **kwargs: Any,
    ) -> None:
        if jvp_method not in FSDP_GGN_JVP_METHODS:
            raise ValueError(
                f"jvp_method must be one of {FSDP_GGN_JVP_METHODS}, got {jvp_method!r}; use "
                "'finite_difference' for models whose operations have no forward-mode AD rule"
            )
        self.jvp_method = jvp_method
        loss = as_loss_function(loss_fn, loss_of_output_fn)
        _require_split(loss, type(self).__name__)
        super().__init__(model, data, loss, **kwargs)

    def _jvp(self, batch: Any, direction: list[torch.Tensor], norm: float) -> torch.Tensor:
        """``J v`` of the model's output on ``batch``."""
        acc = self._accumulation_dtype()
        if self.jvp_method == "forward":
            with torch.no_grad(), self._tangents(direction), differentiable_attention():
                dual = self.loss_fn.forward(self.model, batch)
                primal, tangent = fwAD.unpack_dual(dual)
            return torch.zeros_like(primal) if tangent is None else tangent
        step = self._step(direction, norm)
        with torch.no_grad():
            with self._shifted(direction, step):
                plus = self.loss_fn.forward(self.model, batch).to(acc)
            with self._shifted(direction, -step):
                minus = self.loss_fn.forward(self.model, batch).to(acc)
        return (plus - minus) / (2.0 * step)

    def _column(self, direction: list[torch.Tensor], norm: float) -> list[torch.Tensor]:
        for scale, batch in self._scaled_batches():
            jvp = self._jvp(batch, direction, norm)
            output = self.loss_fn.forward(self.model, batch)
            jvp = jvp.to(output.dtype)
            cotangent = output_hvp_of(self.loss_fn, batch)(output.detach(), jvp.unsqueeze(0))[0]
            ((output * cotangent).sum() * scale).backward()
        return self._take_gradients()


@contextlib.contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    """Products run the model's own forward: in training mode that moves batch-norm running
    statistics (and counters). Keep copies of the buffers while any module trains and write
    them back afterwards, also after an exception, so a product never changes the model."""
    if not any(module.training for module in model.modules()):
        yield
        return
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)


def _local(tensor: DTensor) -> torch.Tensor:
    """This rank's shard, sharing storage with the parameter, outside autograd."""
    with torch.no_grad():
        return tensor.to_local()


def _reshard(model: nn.Module) -> None:
    """Free unsharded parameters so the next forward all-gathers the (possibly shifted) shards;
    FSDP2 keeps the root's parameters unsharded after a forward."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _comm_device(op: ShardedOperator) -> torch.device:
    return comm_device(op.group, op.device)


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= int(dim)
    return total
