"""Peak memory of a computation run on the meta device: a dispatch mode that counts the bytes of
every storage created while it is active, and frees them when the storage dies.

Meta tensors have shapes and storages but no data, so a whole forward, backward, double backward
or forward-mode pass of a 70B model runs in seconds and allocates nothing; counting live storages
gives the peak that a caching-free allocator would see (what PyTorch's CPU allocator does; the
CUDA allocator adds its fragmentation on top). Scalar reads (``bool(torch.isfinite(loss))``,
``int(mask.sum())``) have no value on meta: they read as 1, which every check in the products
and in HuggingFace's masking takes as "fine, carry on".
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_SCALAR_READ = torch.ops.aten._local_scalar_dense.default


class LiveBytes(TorchDispatchMode):
    """Counts live bytes of storages created under it; ``peak`` is the largest total seen.

    ``watch(name, predicate)`` also records, at the peak, the bytes of live storages whose
    creating op's output satisfied ``predicate`` (for example: the last dimension is the
    vocabulary, to see how much of the peak is the cross-entropy middle's logits).
    """

    def __init__(self, devices: tuple[str, ...] = ("meta",)) -> None:
        super().__init__()
        self.devices = devices  # device types counted: ("meta", "cpu") checks a real CPU run
        self.current = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._tagged: dict[int, str] = {}
        self._watchers: dict[str, Any] = {}
        self._tag_current: dict[str, int] = {}
        self.tags_at_peak: dict[str, int] = {}
        self._tag_bytes: dict[int, int] = {}
        self._outside: set[int] = set()

    def watch(self, name: str, predicate: Any) -> None:
        """Attribute storages of tensors with ``predicate(tensor)`` true to ``name``."""
        self._watchers[name] = predicate
        self._tag_current[name] = 0

    def _free(self, key: int) -> None:
        self.current -= self._sizes.pop(key, 0)
        tag = self._tagged.pop(key, None)
        if tag is not None:
            self._tag_current[tag] -= self._tag_bytes.pop(key, 0)

    def _note_outside(self, tensor: torch.Tensor) -> None:
        """A storage met as an input but never created here existed before (parameters, data):
        views of it made here are not new memory."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self._sizes and key not in self._outside:
            self._outside.add(key)
            weakref.finalize(storage, self._outside.discard, key)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._outside:
            return
        num_bytes = storage.nbytes()
        if key in self._sizes:  # a storage grown in place (resize_, out= arguments)
            growth = num_bytes - self._sizes[key]
            if growth > 0:
                self._sizes[key] = num_bytes
                self._add(growth)
            return
        self._sizes[key] = num_bytes
        self.current += num_bytes
        for name, predicate in self._watchers.items():
            if predicate(tensor):
                self._tagged[key] = name
                self._tag_bytes[key] = num_bytes
                self._tag_current[name] += num_bytes
                break
        weakref.finalize(storage, self._free, key)
        self._add(0)

    def _add(self, num_bytes: int) -> None:
        self.current += num_bytes
        if self.current > self.peak:
            self.peak = self.current
            self.tags_at_peak = dict(self._tag_current)

    def _counted(self, value: Any) -> bool:
        return (
            isinstance(value, torch.Tensor)
            and value.device.type in self.devices
            and not value.is_sparse
        )

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is _SCALAR_READ and args[0].device.type == "meta":
            return True if args[0].dtype == torch.bool else 1
        for leaf in tree_flatten((args, kwargs))[0]:
            if self._counted(leaf):
                self._note_outside(leaf)
        result = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(result)[0]:
            if self._counted(leaf):
                self._track(leaf)
        return result
