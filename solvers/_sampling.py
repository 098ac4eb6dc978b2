"""Shared plumbing of the randomized estimators: their explicit (checkpointable) state, products
in column blocks, and a streaming mean / standard error over samples (Chan et al.'s pairwise
update).

Resumability: an estimator keeps its intermediate results (sketch probes, bases, ...) in
``state.stage`` and skips a step whose result is there; :func:`apply` keeps the column blocks
already multiplied in ``state.partial``. Save points are after each block of products, so the
state saved there is all the rest of the run depends on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._memory import default_block_size
from ._operator import Operator, check_finite
from .checkpoint import Checkpoint


@dataclass
class EstimatorState:
    """Everything an estimator needs to continue: the probe generator, products spent, the
    running mean and sum of squared deviations (``m2``) of the samples taken so far, finished
    intermediate results (``stage``) and the products of an unfinished :func:`apply`
    (``partial``). ``checkpoint`` (not part of the state) saves it at the save points."""

    generator: torch.Generator
    num_matvecs: int = 0
    num_samples: int = 0
    mean: Tensor | None = None
    m2: Tensor | None = None
    stage: dict[str, Any] = field(default_factory=dict)
    partial: list[Tensor] = field(default_factory=list)
    checkpoint: Checkpoint | None = None

    _SAVED = ("num_matvecs", "num_samples", "mean", "m2", "stage", "partial")

    def state_dict(self) -> dict[str, Any]:
        saved = {name: getattr(self, name) for name in self._SAVED}
        saved["generator"] = self.generator.get_state()
        return saved

    def load_state_dict(self, saved: dict[str, Any], device: torch.device) -> None:
        """Restore :meth:`state_dict` output, tensors moved to ``device`` (values unchanged)."""

        def to_device(value: Any) -> Any:
            if isinstance(value, Tensor):
                return value.to(device)
            if isinstance(value, dict):
                return {key: to_device(item) for key, item in value.items()}
            if isinstance(value, list):
                return [to_device(item) for item in value]
            return value

        for name in self._SAVED:
            setattr(self, name, to_device(saved[name]))
        self.generator.set_state(saved["generator"])

    def save_point(self) -> None:
        """Save the state if the checkpoint interval has passed."""
        if self.checkpoint is not None:
            self.checkpoint.maybe_save(self.num_matvecs, self.state_dict)


def apply(
    operator: Operator,
    columns: Tensor,
    state: EstimatorState,
    block_size: int | None,
    bar: Any,
    *,
    resumable: bool = True,
) -> Tensor:
    """``H @ columns`` taken ``block_size`` columns at a time (None: as many as fit in about
    1 GiB of vectors, at least one).

    ``resumable``: blocks go to ``state.partial`` with a save point after each, and blocks found
    there (a resumed run) are not multiplied again; the caller must then store what it derives
    from the result in ``state.stage`` before the next save point. Streaming callers that
    consume each block at once pass False.
    """
    if block_size is None:  # all at once, unless the columns are too big for that
        block_size = default_block_size(operator.size, operator.dtype)
    chunks = columns.split(block_size, dim=1)
    outputs = state.partial if resumable else []
    for chunk in chunks[len(outputs) :]:
        product = operator.matmat(chunk)
        check_finite(product, state.num_matvecs, operator.space)
        state.num_matvecs += chunk.shape[1]
        bar.update(chunk.shape[1])
        outputs.append(product)
        if resumable:
            state.save_point()
    result = torch.cat(outputs, dim=1)
    if resumable:
        state.partial = []
    return result


def accumulate(state: EstimatorState, samples: Tensor) -> None:
    """Fold ``samples`` (one per entry along dim 0) into the running mean and ``m2``, kept in
    the dtype of ``samples`` (callers pass float64 for scalars; n-vectors stay in the operator's
    dtype to bound memory)."""
    count = samples.shape[0]
    block_mean = samples.mean(dim=0)
    block_m2 = ((samples - block_mean) ** 2).sum(dim=0)
    if state.mean is None or state.m2 is None:
        state.mean, state.m2 = block_mean, block_m2
    else:
        total = state.num_samples + count
        delta = block_mean - state.mean
        state.mean = state.mean + delta * (count / total)
        state.m2 = state.m2 + block_m2 + delta**2 * (state.num_samples * count / total)
    state.num_samples += count


def mean_and_stderr(state: EstimatorState) -> tuple[Tensor, Tensor]:
    """The sample mean and its standard error ``std / sqrt(num_samples)`` (ddof = 1)."""
    if state.mean is None or state.m2 is None or state.num_samples < 2:
        raise RuntimeError("a standard error needs at least two samples")
    variance = state.m2 / (state.num_samples - 1)
    return state.mean, (variance / state.num_samples).sqrt()
