"""Random probes drawn on the CPU from an explicit generator, so a seed means the same numbers on
every device, and ``seed=None`` means fresh entropy.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Distribution = Literal["rademacher", "gaussian"]
DISTRIBUTIONS = ("rademacher", "gaussian")

# Fixed so a probe never depends on the device or on how many probes are drawn at once.
_CHUNK_ELEMENTS = 1 << 22


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator: seeded from ``seed``, fresh OS entropy for None, or ``seed`` itself."""
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError(
                f"the generator must live on the CPU (got {seed.device}); the solvers draw "
                "probes on the CPU and move them, so a seed gives the same probes everywhere"
            )
        return seed
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    elif isinstance(seed, int) and not isinstance(seed, bool):
        generator.manual_seed(seed)
    else:
        raise TypeError(f"seed must be an int, None or a CPU torch.Generator, got {seed!r}")
    return generator


def check_distribution(distribution: str) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def draw_probes(
    num_probes: int,
    size: int,
    generator: torch.Generator,
    *,
    distribution: Distribution,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """``(size, num_probes)`` probe columns: Rademacher signs or standard Gaussians.

    Each probe is drawn whole (in fixed CPU chunks of a cheap dtype: int8 signs or float32
    normals) before the next, so probe i is the same however the probes are batched.
    """
    probes = torch.empty(num_probes, size, dtype=dtype, device=device)
    for probe in probes:
        for start in range(0, size, _CHUNK_ELEMENTS):
            stop = min(size, start + _CHUNK_ELEMENTS)
            if distribution == "rademacher":
                bits = torch.randint(0, 2, (stop - start,), generator=generator, dtype=torch.int8)
                chunk = bits.mul_(2).sub_(1)
            else:
                chunk = torch.randn(stop - start, generator=generator, dtype=torch.float32)
            probe[start:stop].copy_(chunk.to(device, non_blocking=True))
    return probes.T
