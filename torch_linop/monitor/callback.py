"""A HuggingFace ``TrainerCallback`` that runs a :class:`CurvatureMonitor` during
``Trainer.train()`` and logs its records through the trainer's own ``log`` (so the console,
``trainer.state.log_history``, TensorBoard and W&B all see the ``curvature/...`` keys)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from transformers import TrainerCallback

from torch_linop.monitor.monitor import CurvatureMonitor


class CurvatureCallback(TrainerCallback):
    """Checks the curvature every ``every`` optimiser steps of a ``Trainer``.

    ``data``: ready batches (dicts of tensors as the model takes them), or ``examples``: single
    examples (e.g. ``eval_dataset.select(range(32))``), collated ``batch_size`` at a time by the
    trainer's data collator. ``loss`` defaults to :func:`torch_linop.hf_lm_loss` (causal LMs).
    Other keyword arguments go to :class:`CurvatureMonitor` (``quantities``, ``k``,
    ``preconditioned``, ``max_matvecs``, ...); the trainer's optimiser is passed for you.

    Attach with ``CurvatureCallback(...).attach(trainer)``: the callback needs the trainer to log
    through it. The monitor is built at the first step (when the optimiser exists) and is
    :attr:`monitor` afterwards (``callback.monitor.history``, ``.plot()``, ``.save()``).
    """

    def __init__(
        self,
        data: Iterable[Any] | None = None,
        *,
        examples: Sequence[Any] | None = None,
        batch_size: int = 8,
        loss: Any = None,
        every: int | str = "auto",
        prefix: str = "curvature/",
        **monitor_kwargs: Any,
    ) -> None:
        if (data is None) == (examples is None):
            raise ValueError("pass exactly one of data (batches) or examples (to be collated)")
        if "optimizer" in monitor_kwargs:
            raise ValueError("the trainer's optimiser is used; do not pass optimizer=")
        self.data, self.examples, self.batch_size = data, examples, batch_size
        self.loss, self.every, self.prefix = loss, every, prefix
        self.monitor_kwargs = monitor_kwargs
        self.monitor: CurvatureMonitor | None = None
        self.trainer: Any = None

    def attach(self, trainer: Any) -> CurvatureCallback:
        """Register with ``trainer`` and remember it (for its ``log``); returns self."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def _batches(self) -> list[Any]:
        if self.data is not None:
            return list(self.data)
        assert self.examples is not None
        collate = self.trainer.data_collator
        rows = [self.examples[index] for index in range(len(self.examples))]
        return [
            collate(rows[i : i + self.batch_size]) for i in range(0, len(rows), self.batch_size)
        ]

    def _build(self) -> CurvatureMonitor:
        from torch_linop.losses.language_models import hf_lm_loss

        trainer = self.trainer
        model = trainer.model
        device = next(model.parameters()).device
        batches = [
            {key: value.to(device) for key, value in batch.items()}
            if isinstance(batch, dict)
            else batch
            for batch in self._batches()
        ]
        return CurvatureMonitor(
            model,
            batches,
            self.loss if self.loss is not None else hf_lm_loss(),
            every=self.every,
            optimizer=trainer.optimizer,
            **self.monitor_kwargs,
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.trainer is None:
            raise RuntimeError(
                "CurvatureCallback needs its trainer to log: use CurvatureCallback(...)"
                ".attach(trainer) instead of Trainer(callbacks=[...])"
            )
        if self.monitor is None:
            self.monitor = self._build()
        record = self.monitor.step(state.global_step)
        if record is not None:
            self.trainer.log(record.scalars(self.prefix))
        return control
