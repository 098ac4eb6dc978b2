"""``ProductOptions``: the rarely needed options of the curvature operators, grouped in one
keyword (``options=``) so that each constructor shows the few a user needs.

The grouped options used to be keywords of every constructor; :func:`accepts_old_option_keywords`
keeps those spellings working for one release, with a ``DeprecationWarning`` that names the new one.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch_linop.data import BatchSizeFn

__all__ = [
    "ProductOptions",
    "accepts_old_option_keywords",
    "resolve_options",
    "warn_deprecated",
]


@dataclass(frozen=True)
class ProductOptions:
    """How an operator's products run over the data, beyond the defaults. Every field is optional.

    ``num_batches``: use only the first ``num_batches`` batches of ``data`` (default: all).
    ``batch_size_fn``: ``batch -> number of samples`` for batches the loss cannot count.
    ``num_data``: the total number of samples N, if known (saves one pass over the data).
    ``check_deterministic``: run the data twice at construction and raise if the losses differ
    (dropout in train mode, a shuffled DataLoader).
    ``progress``: a tqdm bar over the batches of each product.
    ``process_group``: the data-parallel group whose ranks' products are summed (None: the
    default group if one is initialised; False: none; see the distributed how-to).
    ``cuda_graph``: with ``cache_graph=True`` on a CUDA device, replay the one-column product
    from a captured CUDA graph (not for the MC Fisher, which draws targets on the host).
    """

    num_batches: int | None = None
    batch_size_fn: BatchSizeFn | None = None
    num_data: int | None = None
    check_deterministic: bool = False
    progress: bool = False
    process_group: Any = None
    cuda_graph: bool = False


OPTION_NAMES = tuple(field.name for field in dataclasses.fields(ProductOptions))


def resolve_options(options: ProductOptions | None) -> ProductOptions:
    """``options`` itself, or the defaults for None; a clear error for anything else."""
    if options is None:
        return ProductOptions()
    if not isinstance(options, ProductOptions):
        raise TypeError(
            f"options must be a torch_linop.ProductOptions (or None), got "
            f"{type(options).__name__}: write options=ProductOptions(num_batches=..., ...)"
        )
    return options


Init = TypeVar("Init", bound=Callable[..., None])

# modules whose constructor wrappers (functions named "constructor") stand between a user's call
# and a deprecation warning: the warning points past them, at the user's line
_WRAPPER_MODULES = frozenset({__name__, "torch_linop.mc_fisher"})


def warn_deprecated(message: str) -> None:
    """A DeprecationWarning attributed to the first caller outside the constructor wrappers."""
    frame = sys._getframe(1)  # the wrapper that warns; level 3 is its caller
    stacklevel = 3
    while (
        frame.f_back is not None
        and frame.f_code.co_name == "constructor"
        and frame.f_globals.get("__name__") in _WRAPPER_MODULES
        and frame.f_back.f_code.co_name == "constructor"
        and frame.f_back.f_globals.get("__name__") in _WRAPPER_MODULES
    ):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel)


def accepts_old_option_keywords(init: Init) -> Init:
    """Wrap a constructor so that the keywords :class:`ProductOptions` replaced still work for one
    release: they are gathered into ``options=``, with one ``DeprecationWarning`` per call that
    names the new spelling. Passing them together with ``options=`` is an error (which should
    win is not clear). The wrapper keeps the constructor's signature (``functools.wraps``)."""

    @functools.wraps(init)
    def constructor(self: Any, *args: Any, **kwargs: Any) -> None:
        old = {name: kwargs.pop(name) for name in OPTION_NAMES if name in kwargs}
        if old:
            owner = type(self).__name__
            new_spelling = ", ".join(f"{name}={_shown(value)}" for name, value in old.items())
            if kwargs.get("options") is not None:
                raise TypeError(
                    f"{owner} got options= and the old keyword(s) {', '.join(old)}: pass them "
                    f"inside options only, options=ProductOptions({new_spelling}, ...)"
                )
            warn_deprecated(
                f"{owner}({', '.join(f'{name}=...' for name in old)}) is deprecated and will "
                f"be removed in the next release: write {owner}(..., "
                f"options=ProductOptions({new_spelling})) "
                "(from torch_linop import ProductOptions)"
            )
            kwargs["options"] = ProductOptions(**old)
        init(self, *args, **kwargs)

    return constructor  # type: ignore[return-value]


def _shown(value: Any) -> str:
    """A short literal for the warning's new spelling: the value itself if simple, else ``...``."""
    return repr(value) if value is None or isinstance(value, bool | int | float | str) else "..."
