"""The counter-based probe generator: entries are a pure function of (key, index), so probes
do not depend on chunking, slicing or device; the streams look like fair coins / normals."""

from __future__ import annotations

import math

import pytest
import torch

from torch_linop.solvers import _random
from torch_linop.solvers._random import draw_key, draw_probes, make_generator, probe_entries


def test_entries_do_not_depend_on_chunking_or_slicing(monkeypatch):
    whole = draw_probes(
        2, 1000, make_generator(7), distribution="rademacher", dtype=torch.float64, device="cpu"
    )
    monkeypatch.setattr(_random, "_CHUNK_ELEMENTS", 37)
    chunked = draw_probes(
        2, 1000, make_generator(7), distribution="rademacher", dtype=torch.float64, device="cpu"
    )
    assert torch.equal(whole, chunked)
    key = draw_key(make_generator(3))
    for distribution in ("rademacher", "gaussian"):
        full = probe_entries(
            key, 0, 500, distribution=distribution, dtype=torch.float64, device="cpu"
        )
        part = probe_entries(
            key, 123, 321, distribution=distribution, dtype=torch.float64, device="cpu"
        )
        assert torch.equal(full[123:321], part)


def test_generator_state_decides_the_keys_so_resumes_repeat_the_probes():
    generator = make_generator(11)
    first = draw_probes(
        1, 64, generator, distribution="gaussian", dtype=torch.float32, device="cpu"
    )
    state = generator.get_state()
    second = draw_probes(
        1, 64, generator, distribution="gaussian", dtype=torch.float32, device="cpu"
    )
    generator.set_state(state)
    again = draw_probes(
        1, 64, generator, distribution="gaussian", dtype=torch.float32, device="cpu"
    )
    assert torch.equal(second, again) and not torch.equal(first, second)


def test_rademacher_stream_is_balanced_and_uncorrelated():
    size = 1 << 20
    probes = draw_probes(
        3, size, make_generator(0), distribution="rademacher", dtype=torch.float64, device="cpu"
    )
    bound = 5.0 / math.sqrt(size)  # five standard deviations of a fair-coin mean
    assert set(probes.unique().tolist()) == {-1.0, 1.0}
    assert probes.mean(0).abs().max() < bound
    assert (probes[1:, 0] * probes[:-1, 0]).mean().abs() < bound  # neighbours
    assert (probes[:, 0] * probes[:, 1]).mean().abs() < bound  # consecutive keys
    # every bit of the hash is fair, not only the one used for the sign
    bits = _random._hash_bits((12345, 678), 0, size, torch.device("cpu"))
    for shift in range(32):
        assert abs(((bits >> shift) & 1).double().mean() - 0.5) < 2.5 / math.sqrt(size)


def test_gaussian_stream_has_normal_moments():
    size = 1 << 20
    normals = draw_probes(
        1, size, make_generator(1), distribution="gaussian", dtype=torch.float64, device="cpu"
    )[:, 0]
    assert abs(float(normals.mean())) < 5 / math.sqrt(size)
    assert abs(float(normals.var()) - 1) < 5 * math.sqrt(2 / size)
    assert abs(float((normals**4).mean()) - 3) < 5 * math.sqrt(96 / size)
    # tail mass beyond 2 sigma: 4.55%
    assert abs(float((normals.abs() > 2).double().mean()) - 0.0455) < 0.002


def test_entries_past_four_billion_stay_distinct():
    key = (99, 100)
    low = _random._hash_bits(key, 0, 16, torch.device("cpu"))
    high = _random._hash_bits(key, 1 << 32, (1 << 32) + 16, torch.device("cpu"))
    assert not torch.equal(low, high)
    assert int(high.min()) >= 0 and int(high.max()) < 1 << 32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_seed_gives_the_same_probes_on_cpu_and_gpu():
    for distribution in ("rademacher", "gaussian"):
        cpu = draw_probes(
            2,
            100_003,
            make_generator(5),
            distribution=distribution,
            dtype=torch.float32,
            device=torch.device("cpu"),
        )
        gpu = draw_probes(
            2,
            100_003,
            make_generator(5),
            distribution=distribution,
            dtype=torch.float32,
            device=torch.device("cuda"),
        )
        if distribution == "rademacher":
            assert torch.equal(cpu, gpu.cpu())
        else:
            assert (cpu - gpu.cpu()).abs().max() <= 1e-6
