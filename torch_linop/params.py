"""Which parameters a curvature matrix is taken over, and flat vector <-> per-parameter views."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

ParamFilter = Callable[[str, nn.Parameter], bool]


def match_names(*patterns: str) -> ParamFilter:
    """Select parameters whose name matches any glob pattern, e.g. ``"blocks.*.attn.*"``."""
    if not patterns:
        raise ValueError("match_names() needs at least one glob pattern, e.g. match_names('fc1.*')")

    def _filter(name: str, _param: nn.Parameter) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

    return _filter


def match_regex(*patterns: str) -> ParamFilter:
    """Select parameters whose name contains a match of any regular expression."""
    if not patterns:
        raise ValueError("match_regex() needs at least one pattern, e.g. match_regex(r'^h\\.0\\.')")
    compiled = [re.compile(pattern) for pattern in patterns]

    def _filter(name: str, _param: nn.Parameter) -> bool:
        return any(regex.search(name) is not None for regex in compiled)

    return _filter


def select_parameters(
    model: nn.Module, param_filter: ParamFilter | None = None
) -> dict[str, nn.Parameter]:
    """Trainable parameters passing ``param_filter``, in ``named_parameters()`` order.

    Frozen parameters (``requires_grad=False``) are never selected. Raises if nothing is left,
    if the parameters live on several devices, or if they have several dtypes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if param_filter is not None and not callable(param_filter):
        raise TypeError(
            f"param_filter must be a callable (name, parameter) -> bool, got {param_filter!r}; "
            "for glob patterns pass match_names('fc1.*', ...), for regular expressions "
            "match_regex(...)"
        )
    selected: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param_filter is not None and not param_filter(name, param):
            continue
        selected[name] = param
    if not selected:
        all_names = [name for name, _ in model.named_parameters()]
        if not all_names:
            raise ValueError("the model has no parameters, so there is no curvature to compute")
        raise ValueError(
            "no parameter selected: every parameter is frozen or rejected by param_filter. "
            f"The model's parameters are {all_names[:8]}{' ...' if len(all_names) > 8 else ''}; "
            "check the patterns given to match_names/match_regex, or set requires_grad=True."
        )
    devices = {param.device for param in selected.values()}
    if len(devices) > 1:
        raise ValueError(
            f"selected parameters live on several devices {sorted(map(str, devices))}; move the "
            "model to one device (model.to(device)) or select one device's parameters with "
            "param_filter. Sharded models: see the distributed how-to."
        )
    dtypes = {param.dtype for param in selected.values()}
    if len(dtypes) > 1:
        raise ValueError(
            f"selected parameters have several dtypes {sorted(map(str, dtypes))}; cast the model "
            "to one dtype (model.to(torch.float32)) or select parameters of one dtype."
        )
    return selected


def split_vector(vector: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Views of a flat ``(n,)`` or column-stacked ``(n, k)`` vector, one per parameter shape.

    A ``(n, k)`` input gives tensors of shape ``(k, *shape)`` (columns first), the layout that
    batched products use.
    """
    sizes = [int(torch.Size(shape).numel()) for shape in shapes]
    if vector.shape[0] != sum(sizes):
        raise ValueError(f"vector has {vector.shape[0]} entries, the parameters have {sum(sizes)}")
    chunks = torch.split(vector, sizes, dim=0)
    if vector.dim() == 1:
        return [chunk.view(shape) for chunk, shape in zip(chunks, shapes)]
    num_columns = vector.shape[1]
    return [chunk.T.reshape(num_columns, *shape) for chunk, shape in zip(chunks, shapes)]


def join_tensors(tensors: Sequence[torch.Tensor], batched: bool = False) -> torch.Tensor:
    """Inverse of :func:`split_vector`: ``(n,)`` from per-parameter tensors, or ``(n, k)`` when
    ``batched`` and each tensor has a leading column axis ``k``."""
    if not tensors:
        raise ValueError("join_tensors needs at least one tensor")
    if not batched:
        return torch.cat([tensor.reshape(-1) for tensor in tensors])
    num_columns = tensors[0].shape[0]
    return torch.cat([tensor.reshape(num_columns, -1) for tensor in tensors], dim=1).T


def parameters_to_vector(params: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate parameters (or any per-parameter tensors) into one flat vector."""
    values = list(params.values()) if isinstance(params, dict) else list(params)
    return join_tensors([value.detach() for value in values])


def vector_to_parameters(
    vector: torch.Tensor, params: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Split a flat vector into a dict shaped like ``params`` (views, no copy)."""
    pieces = split_vector(vector, [param.shape for param in params.values()])
    return dict(zip(params.keys(), pieces))


def _padding_embeddings(
    model: nn.Module, params: dict[str, torch.Tensor]
) -> list[tuple[str, nn.Embedding | nn.EmbeddingBag, bool]]:
    """``(weight name, module, tied)`` of each selected embedding with a ``padding_idx``;
    ``tied``: its weight is also another module's parameter (an LM head)."""
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for owned in module._parameters.values():
            if owned is not None:
                owners.setdefault(id(owned), set()).add(id(module))
    found = []
    for module_name, module in model.named_modules():
        if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or module.padding_idx is None:
            continue
        name = f"{module_name}.weight" if module_name else "weight"
        if name in params:
            found.append((name, module, owners.get(id(module.weight), set()) != {id(module)}))
    return found


def tied_padding_rows(model: nn.Module, params: dict[str, torch.Tensor]) -> list[str]:
    """Selected embedding weights whose padding row is shared with another module: reverse mode
    drops only the embedding's use of that row, forward mode and finite differences do not, and
    no projection reconciles them (see :func:`frozen_entries`)."""
    return [name for name, _, tied in _padding_embeddings(model, params) if tied]


def frozen_entries(model: nn.Module, params: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Flat indices (into the vector of ``params``) that every product treats as frozen: the
    padding row of each ``nn.Embedding``/``nn.EmbeddingBag`` with a ``padding_idx``; None if
    there are none.

    Reverse mode zeroes the padding row's gradient but forward mode and finite differences move
    it, so without this the methods computed different (and non-symmetric) matrices. Zeroing
    these entries of every input and output vector gives all of them autograd's matrix, with
    the row frozen. A padding row whose weight is tied to another module (an LM head) is left
    alone: that module's gradient reaches it."""
    offsets: dict[str, int] = {}
    offset = 0
    for name, tensor in params.items():
        offsets[name] = offset
        offset += int(tensor.numel())
    indices: list[torch.Tensor] = []
    for name, module, tied in _padding_embeddings(model, params):
        if tied:
            continue
        rows, width = module.weight.shape
        padding_idx = module.padding_idx
        assert padding_idx is not None  # _padding_embeddings keeps only these
        row = padding_idx % rows  # a negative padding_idx counts from the end
        start = offsets[name] + row * width
        indices.append(torch.arange(start, start + width))
    if not indices:
        return None
    return torch.cat(indices)
