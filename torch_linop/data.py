"""Data handling shared by all operators: device moves, batch sizes, re-iterability."""

from __future__ import annotations

import itertools
from collections import UserDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any, cast

import torch

BatchSizeFn = Callable[[Any], int]


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Recursively move tensors in tuples, lists, dicts and HF ``BatchEncoding`` to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True) if batch.device != device else batch
    if isinstance(batch, (Mapping, UserDict)):
        moved = {key: move_to_device(value, device) for key, value in batch.items()}
        if type(batch) is not dict:  # OrderedDict, HF BatchEncoding (a UserDict): keep the type
            try:
                return cast(Any, type(batch))(moved)
            except Exception:
                return moved
        return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(value, device) for value in batch)
    return batch


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor found in a batch (depth-first), used to infer its number of samples."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (Mapping, UserDict)):
        if "input_ids" in batch and isinstance(batch["input_ids"], torch.Tensor):
            return batch["input_ids"]
        values: Iterable[Any] = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        return None
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


def leading_dim_batch_size(batch: Any) -> int:
    """Number of samples = leading dimension of the batch's first tensor."""
    tensor = first_tensor(batch)
    if tensor is None or tensor.dim() == 0:
        raise ValueError(
            f"cannot infer the number of samples of a batch of type {type(batch).__name__}; "
            "pass options=ProductOptions(batch_size_fn=lambda batch: ...) to the operator"
        )
    return int(tensor.shape[0])


class BatchSource:
    """A re-iterable view of the user's data, limited to ``num_batches`` batches if given."""

    def __init__(self, data: Iterable[Any], num_batches: int | None = None) -> None:
        if isinstance(data, torch.Tensor):
            raise TypeError(
                "data must be an iterable of batches, got a single tensor; wrap one batch as "
                "[x] or [(x, y)], or pass a DataLoader"
            )
        if not isinstance(data, Iterable):
            raise TypeError(
                f"data must be a re-iterable of batches (list, DataLoader), got {type(data).__name__}"
            )
        if isinstance(data, Iterator):
            raise TypeError(
                "data is a one-shot iterator or generator, but every product iterates over the data "
                "again; pass a list of batches (list(data)) or a DataLoader instead"
            )
        if num_batches is not None and (
            not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1
        ):
            raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
        if isinstance(data, Sized) and _length_or_none(data) == 0:
            raise ValueError(f"data is empty ({type(data).__name__} of length 0): {_EMPTY_FIX}")
        self.data = data
        self.num_batches = num_batches

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.data)
        if self.num_batches is not None:
            iterator = itertools.islice(iterator, self.num_batches)
        empty = True
        for batch in iterator:
            empty = False
            yield batch
        if empty:
            raise ValueError(f"data yielded no batches: {_EMPTY_FIX}")


_EMPTY_FIX = (
    "pass a non-empty list of batches or DataLoader (a DataLoader with drop_last=True and "
    "fewer samples than batch_size is empty)"
)


def _length_or_none(data: Sized) -> int | None:
    """``len(data)``, or None where it cannot be computed (DataLoader over an IterableDataset)."""
    try:
        return len(data)
    except TypeError:
        return None


def floating_dtypes(batch: Any) -> set[torch.dtype]:
    """The dtypes of the floating-point tensors in a batch (tuples, lists, dicts, nested)."""
    if isinstance(batch, torch.Tensor):
        return {batch.dtype} if batch.is_floating_point() else set()
    if isinstance(batch, (Mapping, UserDict)):
        values: Iterable[Any] = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    else:
        return set()
    found: set[torch.dtype] = set()
    for value in values:
        found |= floating_dtypes(value)
    return found
