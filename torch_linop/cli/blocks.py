"""The diagonal by parameter tensor, with a standard error on each tensor's diagonal sum.

Hutchinson's diagonal estimate ``mean_j z_j * (H z_j)`` (Rademacher ``z_j``) gives, summed over a
tensor's entries, an unbiased estimate of that diagonal block's trace. Its standard error needs
the per-probe sums (the entries' errors are correlated), which an entrywise standard error does
not give, so the probes are run here and each probe's per-tensor sums are kept. Summed over all
tensors it is Hutchinson's trace estimate, so the table's total and the trace can be compared
within their error bars.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from torch_linop.solvers import DiagonalResult

PROBE_BLOCK = 16  # probes multiplied at once


def _blocks(sizes: list[int]) -> list[slice]:
    offsets = np.cumsum([0, *sizes])
    return [slice(int(start), int(stop)) for start, stop in zip(offsets[:-1], offsets[1:])]


def hutchinson_by_tensor(
    operator: Any, num_matvecs: int, seed: int
) -> tuple[DiagonalResult, np.ndarray, np.ndarray, tuple[float, float]]:
    """The diagonal estimate (entrywise mean and standard error over ``num_matvecs`` probes);
    per parameter tensor the estimated diagonal sum and its standard error; and the sum over all
    tensors (Hutchinson's trace estimate) with its standard error."""
    size = operator.shape[0]
    blocks = _blocks([param.numel() for param in operator.params.values()])
    generator = torch.Generator().manual_seed(seed)
    entry_sum = np.zeros(size)
    entry_square_sum = np.zeros(size)
    probe_block_sums = []
    for start in range(0, num_matvecs, PROBE_BLOCK):
        count = min(PROBE_BLOCK, num_matvecs - start)
        signs = torch.randint(0, 2, (size, count), generator=generator, dtype=torch.int8)
        probes = (2 * signs - 1).to(torch.float64)
        products = operator @ probes.to(operator.device, operator.torch_dtype)
        samples = (probes * products.detach().to("cpu", torch.float64)).numpy()  # z * Hz
        entry_sum += samples.sum(axis=1)
        entry_square_sum += (samples**2).sum(axis=1)
        probe_block_sums.append(np.stack([samples[block].sum(axis=0) for block in blocks]))
    mean = entry_sum / num_matvecs
    per_probe = np.concatenate(probe_block_sums, axis=1)  # (tensors, probes)
    block_means = per_probe.mean(axis=1)
    totals = per_probe.sum(axis=0)  # z_j^T H z_j
    if num_matvecs > 1:
        variance = (entry_square_sum - num_matvecs * mean**2) / (num_matvecs - 1)
        entry_stderr = np.sqrt(np.maximum(variance, 0) / num_matvecs)
        block_stderr = per_probe.std(axis=1, ddof=1) / np.sqrt(num_matvecs)
        total_stderr = float(totals.std(ddof=1) / np.sqrt(num_matvecs))
    else:
        entry_stderr = np.full(size, np.inf)
        block_stderr = np.full(len(blocks), np.inf)
        total_stderr = float("inf")
    result = DiagonalResult(mean, entry_stderr, num_matvecs, "hutchinson")
    return result, block_means, block_stderr, (float(totals.mean()), total_stderr)
