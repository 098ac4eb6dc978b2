"""Random probes from an explicit generator, generated on the target device by a counter-based
hash, so a seed means the same numbers on every device and ``seed=None`` means fresh entropy.

Each probe takes a 62-bit key from a CPU ``torch.Generator`` (so checkpoints that save the
generator's state resume the same probe sequence); entry ``i`` of the probe is a pure function
of ``(key, i)``: a 32-bit integer hash evaluated with int64 tensor arithmetic on the device.
Integer arithmetic is exact everywhere, so Rademacher probes are bit-identical on CPU and GPU,
whatever the chunking; Gaussian probes (Box-Muller in float64, then rounded) agree to the last
bit of float32 and to ~1e-16 relative in float64. Drawing on the device matters at scale: a
CPU-drawn probe of a 1B-parameter model took 3-6 s to make and copy; this takes a few
milliseconds on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Distribution = Literal["rademacher", "gaussian"]
DISTRIBUTIONS = ("rademacher", "gaussian")

# Entries hashed per step: bounds the int64 temporaries (4 x 8 bytes per entry); values never
# depend on it.
_CHUNK_ELEMENTS = 1 << 24
_MASK32 = (1 << 32) - 1
# Multipliers below 2**31, so a 32-bit value times one fits in a signed int64 without overflow.
_MUL1 = 0x7FEB352D
_MUL2 = 0x5F356495
_KEY_BOUND = 1 << 31


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator: seeded from ``seed``, fresh OS entropy for None, or ``seed`` itself."""
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError(
                f"the generator must live on the CPU (got {seed.device}); the solvers draw "
                "probe keys on the CPU, so a seed gives the same probes everywhere"
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


def draw_key(generator: torch.Generator) -> tuple[int, int]:
    """One probe's key: two 31-bit words from the CPU generator."""
    words = torch.randint(0, _KEY_BOUND, (2,), generator=generator, dtype=torch.int64)
    return int(words[0]), int(words[1])


def _mix(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash (xorshift-multiply), in place on non-negative int64."""
    x.bitwise_xor_(x >> 16).mul_(_MUL1).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15).mul_(_MUL2).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 16)
    return x


def _hash_bits(key: tuple[int, int], start: int, stop: int, device: torch.device) -> Tensor:
    """32 random bits (as int64 in [0, 2**32)) for entries ``start..stop-1`` of a probe."""
    index = torch.arange(start, stop, dtype=torch.int64, device=device)
    if stop <= 1 << 32:
        return _mix(_mix(index.bitwise_xor_(key[0])).bitwise_xor_(key[1]))
    high = index >> 32  # keeps entries beyond 4 billion distinct
    bits = _mix(index.bitwise_and_(_MASK32).bitwise_xor_(key[0]))
    return _mix(bits.bitwise_xor_(high.add_(key[1]).bitwise_and_(_MASK32)))


def probe_entries(
    key: tuple[int, int],
    start: int,
    stop: int,
    *,
    distribution: Distribution,
    dtype: torch.dtype,
    device: torch.device | str,
) -> Tensor:
    """Entries ``start..stop-1`` of the probe with ``key``: the same numbers however sliced."""
    device = torch.device(device)
    if distribution == "rademacher":
        bits = _hash_bits(key, start, stop, device)
        return bits.bitwise_and_(1).mul_(2).sub_(1).to(dtype)
    # Box-Muller from two independent 32-bit streams (the second keyed differently)
    other = (key[0] ^ 0x2545F491, (key[1] + 0x3C6EF372) & _MASK32)
    uniform1 = _hash_bits(key, start, stop, device).to(torch.float64).add_(0.5).div_(2.0**32)
    uniform2 = _hash_bits(other, start, stop, device).to(torch.float64).add_(0.5).div_(2.0**32)
    radius = uniform1.log_().mul_(-2.0).sqrt_()
    return radius.mul_(uniform2.mul_(2.0 * math.pi).cos_()).to(dtype)


def draw_probes(
    num_probes: int,
    size: int,
    generator: torch.Generator,
    *,
    distribution: Distribution,
    dtype: torch.dtype,
    device: torch.device,
    entries: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """``(length, num_probes)`` probe columns: Rademacher signs or standard Gaussians.

    Probe ``i`` uses the ``i``-th key drawn from ``generator``, so it is the same however the
    probes are batched, and the entries are made on ``device`` in fixed-size steps. ``entries``
    (default: all ``size`` of them) are the ranges ``[start, stop)`` of the full probes to make,
    stacked in order: a process holding some rows of every vector (a sharded operator) makes its
    rows of exactly the probes a single process makes, and no other entries.
    """
    ranges = [(0, size)] if entries is None else list(entries)
    length = sum(stop - start for start, stop in ranges)
    probes = torch.empty(num_probes, length, dtype=dtype, device=device)
    for probe in probes:
        key = draw_key(generator)
        position = 0
        for first, last in ranges:
            for start in range(first, last, _CHUNK_ELEMENTS):
                stop = min(last, start + _CHUNK_ELEMENTS)
                probe[position : position + stop - start].copy_(
                    probe_entries(
                        key, start, stop, distribution=distribution, dtype=dtype, device=device
                    )
                )
                position += stop - start
    return probes.T
