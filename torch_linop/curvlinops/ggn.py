"""``GGNLinearOperator``: our GGN (``mc_samples=0``) or Monte-Carlo Fisher (``mc_samples > 0``)
with curvlinops' arguments."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from torch_linop.curvlinops._base import CurvlinopsInterface
from torch_linop.curvlinops._curvature import CurvatureLinearOperator
from torch_linop.curvlinops._loss import BatchSizeFn, require_supported
from torch_linop.ggn import GGNOperator
from torch_linop.mc_fisher import MCFisherOperator
from torch_linop.options import ProductOptions

DEFAULT_SEED = 2147483647


def reject_blocks(block_sizes: Sequence[int] | None, name: str) -> None:
    """curvlinops' rule for operators without block support."""
    if block_sizes is not None and len(list(block_sizes)) > 1:
        raise ValueError(
            f"Block sizes were specified but operator does not support blocking ({name}); "
            "omit block_sizes, or use HessianLinearOperator for a block-diagonal Hessian."
        )


class CurvlinopsGGN(CurvlinopsInterface, MCFisherOperator):
    """Our GGN / MC Fisher built from curvlinops' arguments (the matrix behind
    :class:`GGNLinearOperator` and :class:`FisherMCLinearOperator`)."""

    def __init__(
        self,
        model_func: torch.nn.Module,
        loss_func: torch.nn.Module,
        params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        data: Iterable[Any],
        *,
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        mc_samples: int = 0,
        seed: int = DEFAULT_SEED,
    ) -> None:
        if not isinstance(mc_samples, int) or mc_samples < 0:
            raise ValueError(f"mc_samples must be a non-negative int, got {mc_samples!r}")
        if mc_samples > 0:
            require_supported(loss_func, "the Monte-Carlo GGN (mc_samples > 0)")
            self.FIXED_DATA_ORDER = True
        model, loss = self._prepare(model_func, loss_func, params, data, batch_size_fn)
        MCFisherOperator.__init__(
            self,
            model,
            data,
            loss,
            mc_samples=max(mc_samples, 1),
            seed=seed,
            options=ProductOptions(num_data=num_data, progress=progressbar),
        )
        self.mc_samples = mc_samples
        if check_deterministic:
            self.check_deterministic()

    def middle(self, batch: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if self.mc_samples == 0:
            return GGNOperator.middle(self, batch)
        return super().middle(batch)


class GGNLinearOperator(CurvatureLinearOperator):
    """Generalized Gauss-Newton ``c sum_n J_n^T H_n J_n`` (c = 1/N or 1).

    ``mc_samples > 0`` (keyword only, from newer curvlinops) replaces the loss Hessian ``H_n``
    by the average of ``mc_samples`` outer products of gradients at targets drawn from the
    model's predictive distribution (MSE, cross-entropy, BCE with logits), re-seeded from
    ``seed`` at every product: a fixed matrix per instance that converges to the GGN as
    ``mc_samples`` grows.
    """

    def __init__(
        self,
        model_func: torch.nn.Module,
        loss_func: torch.nn.Module,
        params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        data: Iterable[Any],
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        block_sizes: Sequence[int] | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        *,
        mc_samples: int = 0,
        seed: int = DEFAULT_SEED,
    ) -> None:
        reject_blocks(block_sizes, type(self).__name__)
        operator = CurvlinopsGGN(
            model_func,
            loss_func,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            mc_samples=mc_samples,
            seed=seed,
        )
        super().__init__(operator, params, data)
        self.FIXED_DATA_ORDER = operator.FIXED_DATA_ORDER
        self.mc_samples = mc_samples
