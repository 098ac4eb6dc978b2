"""``FisherMCLinearOperator``: curvlinops' Monte-Carlo Fisher, our MC Fisher underneath."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from torch_linop.curvlinops._curvature import CurvatureLinearOperator
from torch_linop.curvlinops._loss import BatchSizeFn
from torch_linop.curvlinops.ggn import DEFAULT_SEED, CurvlinopsGGN


class FisherMCLinearOperator(CurvatureLinearOperator):
    """Monte-Carlo Fisher with ``mc_samples`` sampled targets per datum (default 1), seeded by
    ``seed`` at every product. Needs the data in a fixed order (no shuffling)."""

    FIXED_DATA_ORDER = True

    def __init__(
        self,
        model_func: torch.nn.Module,
        loss_func: torch.nn.Module,
        params: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
        data: Iterable[Any],
        progressbar: bool = False,
        check_deterministic: bool = True,
        seed: int = DEFAULT_SEED,
        mc_samples: int = 1,
        num_data: int | None = None,
        batch_size_fn: BatchSizeFn | None = None,
    ) -> None:
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
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
        self.mc_samples = mc_samples
