"""The CPU thread count of a run: one thread for small models unless ``--threads`` says otherwise.

A small model's product is a few milliseconds of small matrix products, too little to share
between threads: on a 2-core machine busy with other work, one Hessian product of the built-in
job (2,410 parameters, 1,437 samples) took 11.5 ms with one thread and 1,000 ms with torch's
default two, whose threads spin waiting for each other (``python -m benchmarks.cli_threads``,
numbers in docs/getting-started/command_line.md). Large models keep torch's default.
"""

from __future__ import annotations

import torch

SMALL_MODEL_PARAMETERS = 1_000_000  # below this, products run on one thread by default


def choose_threads(requested: int | None, num_parameters: int, device: torch.device) -> int:
    """``requested`` if given; else 1 for a CPU model under ``SMALL_MODEL_PARAMETERS`` parameters,
    else torch's current default."""
    if requested is not None:
        return requested
    if device.type == "cpu" and num_parameters < SMALL_MODEL_PARAMETERS:
        return 1
    return torch.get_num_threads()


def describe_threads(requested: int | None, threads: int, device: torch.device) -> str | None:
    """The report's line on threads, for CPU runs: what was used and why."""
    if device.type != "cpu":
        return None
    if requested is not None:
        return f"{threads} (--threads)"
    if threads == 1:
        return "1 (the default below 1M parameters: small products run fastest on one; --threads N)"
    return f"{threads} (torch's default; --threads N)"
