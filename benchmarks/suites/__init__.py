"""The benchmark suites, one module each, all driven by one ``RunConfig``.

Each suite module exposes ``run(config) -> SuiteResult``; ``benchmarks.run`` prints the tables
and writes them with a JSON file of the records under ``--out``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

SUITE_NAMES = ("matvec", "eigs", "trace", "slq", "kernel")


@dataclass
class RunConfig:
    """Everything a suite needs to know about this run (from the command line)."""

    suite: str
    device: torch.device
    dtype: torch.dtype | None = None  # None: the suite's default
    smoke: bool = False
    out: Path = Path(".bench_out")  # raw results stay out of git (.gitignore)
    models: list[str] | None = None  # None: the suite's default models
    peers: list[str] | None = None  # None: every library
    repeats: int | None = None  # None: the suite's default
    seed: int = 0
    batch_size: int | None = None
    seq_len: int | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def tier(self) -> str:
        """Model size tier: "smoke" (tiny), else by device ("cpu" or "cuda")."""
        if self.smoke:
            return "smoke"
        return "cuda" if self.device.type == "cuda" else "cpu"

    def dtype_or(self, default: torch.dtype) -> torch.dtype:
        return self.dtype if self.dtype is not None else default
