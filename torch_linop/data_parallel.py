"""Data-parallel curvature products: every rank iterates its own shard of the data, the product is
the sample-weighted mean over all ranks, summed by one (bucketed) all-reduce per matvec.

A product-level concern, below the operators: ``CurvatureOperator`` imports this module, not the
``torch_linop.distributed`` package (FSDP2 operators, built on top); the names stay importable
from ``torch_linop.distributed`` and ``torch_linop.distributed.data_parallel``.

``CurvatureOperator`` calls three functions of this module from its hooks: ``all_reduce_count``
(once, when ``num_data`` is first needed), ``all_reduce_product`` (once per matvec/matmat) and
``share_failure`` (when a rank raises during a product). A rank that raises does not leave the
others waiting: it joins the collective they are blocked in with an error flag packed into the
same buffer, so every rank raises within one product and no extra collective runs on the healthy
path.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_BUCKET_BYTES = 64 * 2**20


def comm_device(group: Any, device: torch.device) -> torch.device:
    """Where a buffer must live for ``group``'s backend: CUDA for NCCL, CPU for gloo."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        if device.type == "cuda":
            return device
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return device  # multi-device backends ("cpu:gloo,cuda:nccl") and custom ones


@dataclass(frozen=True)
class DataParallel:
    """How an operator reduces over ranks; pass it as ``process_group=DataParallel(...)``.

    ``group``: the process group (None: the default group). ``bucket_bytes``: the product is
    all-reduced in contiguous buckets of at most this many bytes, launched together (bounded
    staging memory for parameter vectors of billions of entries).
    """

    group: Any = None
    bucket_bytes: int = DEFAULT_BUCKET_BYTES

    def __post_init__(self) -> None:
        if not isinstance(self.bucket_bytes, int) or self.bucket_bytes < 1024:
            raise ValueError(
                f"bucket_bytes must be an int >= 1024, got {self.bucket_bytes!r}; the default is "
                f"{DEFAULT_BUCKET_BYTES} (64 MiB)"
            )
        if self.group is not None and not _is_process_group(self.group):
            raise TypeError(
                f"group must be a torch.distributed ProcessGroup or None, got "
                f"{type(self.group).__name__}"
            )


class RankFailedError(RuntimeError):
    """Raised on the healthy ranks when another rank raised during the same product."""


def _is_process_group(obj: Any) -> bool:
    return dist.is_available() and isinstance(obj, dist.ProcessGroup)


def check_process_group(process_group: Any) -> Any:
    """Validate an operator's ``process_group`` argument where it enters; returns it unchanged.

    ``None``: use the default group if one is initialised (the usual ``torchrun`` case);
    ``False``: never reduce over ranks (each rank gets the matrix of its own data);
    a ``ProcessGroup`` or a :class:`DataParallel`: reduce over that group.
    """
    if process_group is None or process_group is False or isinstance(process_group, DataParallel):
        return process_group
    if _is_process_group(process_group):
        return process_group
    raise TypeError(
        f"process_group must be None (use the default group when initialised), False (no "
        f"reduction over ranks), a torch.distributed ProcessGroup or "
        f"torch_linop.distributed.DataParallel, got {type(process_group).__name__}"
    )


def resolve(process_group: Any) -> DataParallel | None:
    """The reduction an operator performs, or None for a single-process product."""
    if process_group is False or not dist.is_available():
        return None
    if process_group is None:
        if not dist.is_initialized():
            return None
        spec = DataParallel()
    elif isinstance(process_group, DataParallel):
        spec = process_group
    else:
        spec = DataParallel(process_group)
    if not dist.is_initialized():
        raise RuntimeError(
            "a process group was given to the operator but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group() first (torchrun sets the environment)"
        )
    if dist.get_world_size(spec.group) == 1:
        return None
    return spec


def unwrap_model(model: Any) -> nn.Module:
    """The module whose parameters are differentiated: ``DistributedDataParallel`` and
    ``DataParallel`` wrappers are removed (their gradient hooks never fire for
    ``autograd.grad``, and their forward may run collectives the ranks cannot match)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    if isinstance(model, nn.Module) and _has_dtensor_parameters(model):
        raise TypeError(
            "the model's parameters are DTensors (sharded by FSDP2 fully_shard or tensor "
            "parallelism); the replicated-parameter operators cannot run on them. Use "
            "torch_linop.distributed.FSDPHessianOperator or FSDPGGNOperator for FSDP2 models."
        )
    return model


def _has_dtensor_parameters(model: nn.Module) -> bool:
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    if dtensor_module is None:  # never imported, so no DTensor exists (importing costs ~1 s)
        return False
    return any(isinstance(param, dtensor_module.DTensor) for param in model.parameters())


# --------------------------------------------------------------------------- counts
def all_reduce_count(op: Any, count: int) -> int:
    """Total sample count over all ranks; one all-reduce of ``[count, failed]``."""
    spec = resolve(op.process_group)
    if spec is None:
        return count
    return _reduce_count(spec, op.device, count, failure=None)


def _reduce_count(
    spec: DataParallel, device: torch.device, count: int, failure: BaseException | None
) -> int:
    buffer = torch.tensor(
        [count, int(failure is not None)],
        dtype=torch.int64,
        device=comm_device(spec.group, device),
    )
    dist.all_reduce(buffer, group=spec.group)
    total, failed = (int(value) for value in buffer.tolist())
    if failed:
        _raise_shared(spec, failure)
    return total


# --------------------------------------------------------------------------- products
def all_reduce_product(op: Any, product: torch.Tensor) -> torch.Tensor:
    """Sum of the ranks' weighted ``(n, k)`` products, returned on ``op.device``.

    A rank whose batches held no sample with a target never needed ``num_data``; it takes part
    in the count all-reduce here, so every rank runs the same collectives in the same order.
    """
    spec = resolve(op.process_group)
    if spec is None:
        return product
    if op.loss_fn.reduction == "mean" and op._num_data is None:
        op.num_data  # noqa: B018  (joins the count all-reduce the other ranks are in)
    return _reduce_product(spec, product)


def _bucket_bounds(numel: int, element_size: int, bucket_bytes: int) -> list[tuple[int, int]]:
    per_bucket = max(1, bucket_bytes // element_size)
    return [(start, min(numel, start + per_bucket)) for start in range(0, numel, per_bucket)]


def _reduce_product(spec: DataParallel, product: torch.Tensor) -> torch.Tensor:
    """All-reduce ``product`` in buckets; the last bucket carries one extra element, the error
    flag, so the healthy path runs exactly one collective per bucket."""
    home = product.device
    device = comm_device(spec.group, home)
    flat = product.reshape(-1).to(device).contiguous()  # in place when already on `device`
    bounds = _bucket_bounds(flat.numel(), flat.element_size(), spec.bucket_bytes)
    last_start, last_stop = bounds[-1]
    tail = torch.empty(last_stop - last_start + 1, dtype=flat.dtype, device=device)
    tail[:-1].copy_(flat[last_start:last_stop])
    tail[-1] = 0.0  # the error flag: a failing rank sends 1
    handles = [
        dist.all_reduce(flat[start:stop], group=spec.group, async_op=True)
        for start, stop in bounds[:-1]
    ]
    handles.append(dist.all_reduce(tail, group=spec.group, async_op=True))
    for handle in handles:
        handle.wait()
    if float(tail[-1]) > 0.0:
        _raise_shared(spec, None)
    flat[last_start:last_stop].copy_(tail[:-1])
    return flat.to(home).view(product.shape)


def _flag_failed_product(
    spec: DataParallel, numel: int, dtype: torch.dtype, home: torch.device, failure: BaseException
) -> None:
    """The failing rank's side of ``_reduce_product``: the same buckets, in the same order, with
    the flag set. Every rank discards the sums, so one scratch bucket serves all buckets (bounded
    memory even when the failure was an out-of-memory error)."""
    device = comm_device(spec.group, home)
    element_size = torch.empty(0, dtype=dtype).element_size()
    bounds = _bucket_bounds(numel, element_size, spec.bucket_bytes)
    scratch = torch.zeros(bounds[0][1] - bounds[0][0], dtype=dtype, device=device)
    for start, stop in bounds[:-1]:
        dist.all_reduce(scratch[: stop - start], group=spec.group)
    tail = torch.zeros(bounds[-1][1] - bounds[-1][0] + 1, dtype=dtype, device=device)
    tail[-1] = 1.0
    dist.all_reduce(tail, group=spec.group)
    _raise_shared(spec, failure)


# --------------------------------------------------------------------------- failures
_SHARED_MARK = "_torch_linop_shared_with_ranks"


def share_failure(op: Any, error: BaseException, num_columns: int) -> None:
    """Called on a rank whose product raised ``error``: join the collective the other ranks are
    blocked in (the count all-reduce if ``num_data`` is still unknown, else the product
    all-reduce) with the error flag set, then return so the caller re-raises ``error``.

    Healthy ranks raise :class:`RankFailedError` naming the failed rank and its error. Errors
    that every rank already raised together are not shared again.
    """
    if isinstance(error, RankFailedError) or getattr(error, _SHARED_MARK, False):
        return
    spec = resolve(op.process_group)
    if spec is None:
        return
    try:
        if op.loss_fn.reduction == "mean" and op._num_data is None:
            _reduce_count(spec, op.device, 0, failure=error)
        else:
            numel = op.shape[0] * num_columns
            _flag_failed_product(spec, numel, op.torch_dtype, op.device, error)
    except _OwnFailure:
        return
    except Exception as collective_error:  # the group itself broke (timeout, dead peer)
        if hasattr(error, "add_note"):
            error.add_note(f"telling the other ranks failed too: {collective_error!r}")


class _OwnFailure(Exception):
    """Internal: the flagged collective finished on the failing rank itself."""


def _raise_shared(spec: DataParallel, failure: BaseException | None) -> None:
    """Every rank saw the error flag: gather who failed and why (only on this rare path), then
    raise ``RankFailedError`` on healthy ranks and let failing ranks re-raise their own error."""
    rank = dist.get_rank(spec.group)
    own = None if failure is None else f"{type(failure).__name__}: {failure}"
    messages: list[Any] = [None] * dist.get_world_size(spec.group)
    dist.all_gather_object(messages, own, group=spec.group)
    reports = [f"rank {r} raised {m}" for r, m in enumerate(messages) if m is not None]
    if failure is not None:
        try:
            setattr(failure, _SHARED_MARK, True)
        except AttributeError:  # exceptions with __slots__: nothing to mark
            pass
        if hasattr(failure, "add_note") and len(reports) > 1:
            failure.add_note("other failures during the same product: " + "; ".join(reports))
        raise _OwnFailure
    raise RankFailedError(
        f"the curvature product was abandoned on rank {rank} because "
        + "; ".join(reports)
        + " (every rank of the process group raises; fix the failing rank's data or model)"
    )


# --------------------------------------------------------------------------- consistency
def shared_seed(group: Any = None) -> int:
    """A fresh random seed drawn on rank 0 and broadcast, for solvers in data-parallel runs:
    ``lanczos(H, seed=shared_seed())`` gives the same probes on every rank (``seed=None`` would
    draw different probes per rank and silently mix them in the all-reduced product)."""
    if not (dist.is_available() and dist.is_initialized()):
        return int(torch.randint(0, 2**62, (1,)).item())
    seed = [int(torch.randint(0, 2**62, (1,)).item())]
    dist.broadcast_object_list(
        seed, src=dist.get_global_rank(group, 0) if group else 0, group=group
    )
    return int(seed[0])


def same_on_all_ranks(tensor: torch.Tensor, group: Any = None) -> bool:
    """Whether ``tensor`` is bitwise identical on every rank (for tests and debugging)."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    world = dist.get_world_size(group)
    device = comm_device(group, tensor.device)
    local = tensor.detach().contiguous().to(device).reshape(-1).view(torch.uint8)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def consistent_seed(seed: int | torch.Generator | None, group: Any = None) -> Any:
    """``seed`` as every rank of ``group`` must use it (a collective): None becomes
    :func:`shared_seed`; a ``torch.Generator`` must be in the same state on every rank
    (ValueError otherwise); an int is kept (the caller passes the same on every rank)."""
    if seed is None:
        return shared_seed(group)
    if isinstance(seed, torch.Generator) and not same_on_all_ranks(seed.get_state(), group):
        raise ValueError(
            "the torch.Generator passed as seed is in a different state on some ranks, so "
            "the ranks would draw different probes; pass an int seed (the same on every "
            "rank) or seed=None (one seed drawn on rank 0 and broadcast)"
        )
    return seed


class ReplicatedSpace:
    """The vector space of a data-parallel operator: every rank holds whole vectors and the
    products are already reduced, so inner products are local; only seeds must agree (the
    solvers' ``vector_space`` protocol, ``solvers._space.VectorSpace``)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def __repr__(self) -> str:
        return f"<ReplicatedSpace over {dist.get_world_size(self.group)} ranks>"

    def __eq__(self, other: object) -> bool:
        """Spaces over the same group are the same (operators over them may be combined)."""
        return isinstance(other, ReplicatedSpace) and other.group is self.group

    def __hash__(self) -> int:
        return hash((ReplicatedSpace, id(self.group)))

    def inner(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.T @ y

    def shared_seed(self, seed: int | torch.Generator | None) -> Any:
        return consistent_seed(seed, self.group)


def vector_space(process_group: Any) -> ReplicatedSpace | None:
    """The ``vector_space`` of an operator with ``process_group``: None (local vectors) unless
    its products reduce over an initialised group of several ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    spec = resolve(process_group)
    return None if spec is None else ReplicatedSpace(spec.group)
