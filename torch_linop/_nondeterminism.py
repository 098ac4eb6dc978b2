"""Non-determinism that changes a curvature matrix between products, found where an operator is
built: dropout in train mode, and a DataLoader that shuffles when the batches' composition
matters (train-mode BatchNorm, ``num_batches``, ``drop_last``). Solvers then chase a moving
matrix: Lanczos on a shuffled train-mode BatchNorm model spent 2,006 products and converged 0
of 3 eigenpairs (issue 19)."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from torch_linop._warnings import user_stacklevel

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def _train_mode(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> list[str]:
    return [
        name or type(module).__name__
        for name, module in model.named_modules()
        if isinstance(module, kinds)
        and module.training
        and getattr(module, "p", 1.0) != 0  # Dropout(p=0) changes nothing
    ]


def _shuffles(data: Any) -> bool:
    """Whether ``data`` is a DataLoader that draws its batches in random order."""
    if not isinstance(data, DataLoader):
        return False
    batch_sampler: Any = data.batch_sampler
    # a custom batch_sampler need not have a .sampler: then nothing is known, nothing is said
    sampler = getattr(batch_sampler, "sampler", None) if batch_sampler is not None else data.sampler
    return isinstance(sampler, RandomSampler) or isinstance(
        getattr(sampler, "sampler", None), RandomSampler
    )


def nondeterminism_causes(model: nn.Module, data: Any, num_batches: int | None) -> list[str]:
    """What makes two products of the same vector differ, in words (empty: nothing found)."""
    causes = []
    dropout = _train_mode(model, _DROPOUT)
    if dropout:
        causes.append(f"dropout in train mode ({', '.join(dropout[:3])}): call model.eval()")
    if _shuffles(data):
        batchnorm = _train_mode(model, (nn.modules.batchnorm._BatchNorm,))
        if batchnorm:
            causes.append(
                f"BatchNorm in train mode ({', '.join(batchnorm[:3])}) with a shuffled DataLoader: "
                "each pass normalises other batches; call model.eval() or pass shuffle=False"
            )
        if num_batches is not None:
            causes.append(
                f"a shuffled DataLoader limited to num_batches={num_batches}: each pass sees "
                "other samples; pass shuffle=False"
            )
        if getattr(data, "drop_last", False):
            causes.append(
                "a shuffled DataLoader with drop_last=True: each pass drops other samples; "
                "pass shuffle=False"
            )
    return causes


def warn_if_nondeterministic(
    model: nn.Module, data: Any, num_batches: int | None, operator_name: str
) -> list[str]:
    """One warning listing every cause found; returns the causes."""
    causes = nondeterminism_causes(model, data, num_batches)
    if causes:
        warnings.warn(
            f"{operator_name}: products will not be reproducible, so the matrix changes between "
            f"products and solvers may not converge: {'; '.join(causes)}",
            stacklevel=user_stacklevel(),
        )
    return causes
