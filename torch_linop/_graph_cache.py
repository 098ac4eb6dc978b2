"""Per-batch autograd graphs kept between products (``cache_graph=True``).

A Lanczos run multiplies the same matrix tens to hundreds of times; the forward pass (and, for
the Hessian, the first backward) is the same in every product. The operator keeps one graph per
batch and rebuilds all of them when anything they depend on changes: a parameter or buffer
(in place, by optimiser steps or ``copy_``, or by replacement), a module's train/eval mode, a
tensor in a list/tuple ``data``, the operator's data, loss or parameters. Writes that bypass
PyTorch's version counters (``param.data``, numpy views, a ``DataLoader``'s dataset) cannot be
seen: :meth:`GraphCachingOperator.clear_cache` is for those. A product that raises drops the
cache, so the next one starts from fresh graphs.
"""

from __future__ import annotations

import contextlib
from collections import UserDict
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from torch_linop import data_parallel
from torch_linop._autodiff import make_leaves
from torch_linop._context import reparametrized, warn_if_tf32
from torch_linop._cuda_graph import CapturedProduct
from torch_linop.operator import CurvatureOperator


@dataclass
class KeptForward:
    """One batch's kept forward pass (the GGN's and the Fishers' cache): the output (logits, or
    per-sample losses) with its graph, the leaves it was computed from, and the batch."""

    weight: float
    batch: Any
    leaves: dict[str, torch.Tensor]
    output: torch.Tensor


class KeptGraphs:
    """One operator's kept per-batch graphs (``cache_graph=True``) and when to rebuild them.

    A wrapper around the operator's per-batch products, chosen at construction: the operator
    passes itself to each call (no reference back to it is kept, so deleting the operator frees
    the graphs at once). ``build(weight, batch)`` makes one batch's graph (an object with a
    ``weight`` attribute), ``multiply(graph, tangents)`` the batch's product on it.
    """

    def __init__(self) -> None:
        self.graphs: list[Any] | None = None
        self.key: tuple[Any, ...] | None = None
        self._refs: list[Any] = []  # keeps the objects in the key alive: ids stay unique

    def clear(self) -> None:
        """Drop the graphs (the next product rebuilds them)."""
        self.graphs, self.key, self._refs = None, None, []

    def current(self, operator: GraphCachingOperator) -> list[Any]:
        """The kept graphs, rebuilt first when what they depend on has changed."""
        key, refs = _state_key(operator)
        if self.graphs is not None and key == self.key:
            return self.graphs
        self.clear()  # free the stale graphs before building the new ones
        with operator._graph_building_context():
            graphs = [
                operator._build_graph(weight, batch)
                for weight, batch in operator.weighted_batches()
            ]
        # stored only once every batch has its graph: an error above leaves no partial cache
        self.graphs, self.key, self._refs = graphs, key, refs
        return graphs

    def weighted_products(
        self, operator: GraphCachingOperator, tangents: list[torch.Tensor]
    ) -> Generator[tuple[float, list[torch.Tensor]], None, None]:
        """``(weight, product)`` per batch on the kept graphs; any error drops them."""
        try:
            graphs = self.current(operator)
            with operator._cached_product_context():
                for graph in graphs:
                    yield graph.weight, operator._cached_product(graph, tangents)
        except BaseException:
            self.clear()  # whatever failed, the next product starts from fresh graphs
            raise


class GraphCachingOperator(CurvatureOperator):
    """A curvature operator whose products can run on kept per-batch graphs, and be replayed
    from a CUDA graph: both are wrappers chosen at construction (:class:`KeptGraphs`,
    :class:`~torch_linop._cuda_graph.CapturedProduct`), ``None`` when not asked for.

    Subclasses build one batch's graph in :meth:`_build_graph` (once per batch) and multiply
    with it in :meth:`_cached_product`; each graph object has a ``weight`` attribute (the
    batch's ``n_b / N``). ``_JVP_ON_KEPT_GRAPH``: the cached products run JVP forward passes and
    differentiate the kept graph once (GGN, Fishers: fused attention may build the graph, the
    JVPs need the product context); otherwise they only differentiate it twice (the Hessian:
    the graph is built in the product context, the products need none).
    """

    _JVP_ON_KEPT_GRAPH = False

    def _init_graph_cache(self, cache_graph: bool, cuda_graph: bool = False) -> None:
        """Called by subclasses before ``CurvatureOperator.__init__``."""
        for name, value in (("cache_graph", cache_graph), ("cuda_graph", cuda_graph)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        if cuda_graph and not cache_graph:
            raise ValueError(
                "cuda_graph=True replays products on kept graphs: pass cache_graph=True with it"
            )
        self.cache_graph = cache_graph
        self.cuda_graph = cuda_graph
        self._kept: KeptGraphs | None = KeptGraphs() if cache_graph else None
        self._captured: CapturedProduct | None = CapturedProduct() if cuda_graph else None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self, "cuda_graph", False):
            if self.device.type != "cuda":
                raise ValueError(
                    f"cuda_graph=True needs the model on a CUDA device, it is on {self.device}; "
                    "use cuda_graph=False (cache_graph=True alone works on every device)"
                )
            if data_parallel.resolve(self.process_group) is not None:
                raise ValueError(
                    "cuda_graph=True cannot capture a product that all-reduces over a process "
                    "group; use cuda_graph=False for data-parallel operators"
                )

    @property
    def _graphs(self) -> list[Any] | None:
        """The kept graphs, ``None`` before the first product or after :meth:`clear_cache`."""
        kept = getattr(self, "_kept", None)
        return None if kept is None else kept.graphs

    @property
    def _graphs_key(self) -> tuple[Any, ...] | None:
        kept = getattr(self, "_kept", None)
        return None if kept is None else kept.key

    def clear_cache(self) -> None:
        """Drop the kept per-batch graphs (``cache_graph=True``) and the captured product
        (``cuda_graph=True``), freeing their memory; the next product rebuilds them. Needed only
        after changes the cache cannot see (writes through ``param.data``, numpy views or a
        ``DataLoader``'s dataset); harmless otherwise."""
        kept = getattr(self, "_kept", None)
        if kept is not None:
            kept.clear()
        captured = getattr(self, "_captured", None)
        if captured is not None:
            captured.clear()

    def _apply(self, columns: torch.Tensor) -> torch.Tensor:
        captured = getattr(self, "_captured", None)
        if captured is None or captured.failed:
            return super()._apply(columns)
        # kept graphs, captures, replays and several-column products all on the side stream
        with captured.on_side_stream(self.device):
            assert self._kept is not None  # cuda_graph=True needs cache_graph=True
            self._kept.current(self)  # rebuilt first if stale: the capture must see them
            if columns.shape[1] == 1:
                result = captured(super()._apply, columns, self._kept.key)
            else:
                result = super()._apply(columns)
        if result is None:  # the capture failed: no side stream from now on
            self.clear_cache()
            return super()._apply(columns)
        if result.is_cuda:
            result.record_stream(torch.cuda.current_stream(self.device))
        return result

    # ----------------------------------------------------------------- hooks
    def _build_graph(self, weight: float, batch: Any) -> Any:
        """One batch's kept graph (with a ``weight`` attribute)."""
        raise NotImplementedError

    def _cached_product(self, graph: Any, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        """The batch's product with ``tangents`` ``(k, *param.shape)``, keeping ``graph``."""
        raise NotImplementedError

    def _kept_forward(
        self, weight: float, batch: Any, forward: Callable[[], torch.Tensor]
    ) -> KeptForward:
        """``forward()`` run on autograd leaves of the parameters, its graph kept."""
        leaves = make_leaves(self.params)
        with reparametrized(self.model, leaves):
            output = forward()
        return KeptForward(weight, batch, leaves, output)

    def _graph_building_context(self) -> contextlib.AbstractContextManager[None]:
        """Around the forward passes that build the kept graphs."""
        if self._JVP_ON_KEPT_GRAPH:
            return first_order_context(self.device)
        return self._product_context()

    def _cached_product_context(self) -> contextlib.AbstractContextManager[None]:
        """Around the cached products (a backward alone needs no attention backend switch)."""
        if self._JVP_ON_KEPT_GRAPH:
            return self._product_context()
        return contextlib.nullcontext()

    def _weighted_products(
        self, tangents: list[torch.Tensor]
    ) -> Generator[tuple[float, list[torch.Tensor]], None, None]:
        kept = getattr(self, "_kept", None)
        if kept is None:
            yield from super()._weighted_products(tangents)
        else:
            yield from kept.weighted_products(self, tangents)


def _state_key(operator: CurvatureOperator) -> tuple[tuple[Any, ...], list[Any]]:
    """What the kept graphs depend on, as ids, version counters and storage addresses (the
    objects themselves are returned too, to be kept alive while the key is in use)."""
    refs: list[Any] = [operator.model, operator.loss_fn, operator.batches, operator.batches.data]
    keys: list[Any] = [id(obj) for obj in refs]
    keys.append(operator.batches.num_batches)
    tensors: list[torch.Tensor | None] = list(operator.params.values())
    for module in operator.model.modules():
        keys.append(module.training)
        tensors.extend(module._parameters.values())
        tensors.extend(module._buffers.values())
    data = operator.batches.data
    if isinstance(data, (list, tuple)):  # a DataLoader's dataset cannot be inspected cheaply
        limit = operator.batches.num_batches
        for batch in data if limit is None else data[:limit]:
            _add_batch(batch, refs, keys, tensors)
    for tensor in tensors:
        if tensor is None:
            keys.append(None)
            continue
        try:
            keys.extend((id(tensor), tensor._version, tensor.data_ptr()))
        except (RuntimeError, NotImplementedError):  # inference tensors, no storage
            keys.extend((id(tensor), *_version_and_address(tensor)))
    refs.extend(tensors)
    return tuple(keys), refs


@contextlib.contextmanager
def first_order_context(device: torch.device) -> Iterator[None]:
    """Around forward passes whose graph is differentiated only once (a GGN's or empirical
    Fisher's VJP): the user's attention settings stay, fused SDPA kernels included (they have a
    backward, but no double backward or forward-mode AD)."""
    warn_if_tf32(device)
    yield


def _version_and_address(tensor: torch.Tensor) -> tuple[int, int]:
    """Version counter and storage address, -1 where a tensor has none (inference tensors have
    no version counter; sparse, nested and wrapper tensors no single storage)."""
    try:
        version = tensor._version
    except RuntimeError:
        version = -1
    try:
        address = tensor.data_ptr()
    except (RuntimeError, NotImplementedError):
        address = -1
    return version, address


def _add_batch(
    batch: Any, refs: list[Any], keys: list[Any], tensors: list[torch.Tensor | None]
) -> None:
    """Add ``batch`` (its identity) and the tensors inside it to a state key."""
    if isinstance(batch, torch.Tensor):
        tensors.append(batch)
        return
    refs.append(batch)
    keys.append(id(batch))
    if isinstance(batch, (Mapping, UserDict)):
        for value in batch.values():
            _add_batch(value, refs, keys, tensors)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            _add_batch(value, refs, keys, tensors)
