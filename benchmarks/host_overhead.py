"""Host overhead of one curvature product: what an operator adds on top of the autograd calls.

    python benchmarks/host_overhead.py                 # CPU, prints a markdown table
    python benchmarks/host_overhead.py --rounds 400

For a tiny MLP (where the product itself takes well under a millisecond, so overhead shows) and
the MLP of ``docs/benchmarks/operators.md`` (128-256-256-10, batch 256), one Hessian-vector
product is timed four ways, interleaved round by round (load changes hit all alike):

- ``bare``: the autograd calls themselves (loss, gradient with ``create_graph``, gradient of
  ``<g, v>``), with the split of the flat vector and the concatenation of the result;
- ``H @ tensor``: the torch path of ``HessianOperator``;
- ``H.matvec(ndarray)``: the numpy path scipy uses;
- ``H.shift(1e-3) @ tensor``: a composite (where the operator algebra exists).

Overhead is the median over rounds of (time of the call - time of the bare product in the same
round): pairing in time keeps the load of a shared machine out of the difference. It also counts the Python frames between the call
and the per-batch product (``batch_product``), the path a product walks through the library.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import HessianOperator, supervised_loss

MODELS = {  # name -> (layer widths, batch size)
    "tiny MLP 8-16-16-4, batch 32": ((8, 16, 16, 4), 32),
    "MLP 128-256-256-10, batch 256": ((128, 256, 256, 10), 256),
}


def make_problem(widths: tuple[int, ...], batch: int) -> tuple[nn.Module, Any]:
    """A seeded float32 tanh MLP in eval mode and one batch of classification data."""
    generator = torch.Generator().manual_seed(0)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths, widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(*layers[:-1]).eval()
    inputs = torch.randn(batch, widths[0], generator=generator)
    labels = torch.randint(0, widths[-1], (batch,), generator=generator)
    return model, (inputs, labels)


def bare_product(model: nn.Module, batch: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The double-backward Hessian-vector product written directly against autograd."""
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    inputs, labels = batch

    def product(vector: torch.Tensor) -> torch.Tensor:
        pieces = [piece.view_as(p) for piece, p in zip(torch.split(vector, sizes), params)]
        loss = F.cross_entropy(model(inputs), labels)
        gradients = torch.autograd.grad(loss, params, create_graph=True)
        inner = sum((g * v).sum() for g, v in zip(gradients, pieces))
        columns = torch.autograd.grad(inner, params)
        return torch.cat([column.reshape(-1) for column in columns])

    return product


def frames_to_product(operator: Any, call: Callable[[], Any]) -> int:
    """Python frames between ``call()`` and the operator's per-batch product."""
    depths: list[int] = []
    original = operator.batch_product
    marker = sys._getframe()

    def counting(batch: Any, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        frame = sys._getframe(1)
        count = 0
        while frame is not None and frame is not marker:
            count += 1
            frame = frame.f_back
        depths.append(count - 1)  # not the ``call`` lambda itself
        return original(batch, tangents)

    operator.batch_product = counting
    try:
        call()
    finally:
        del operator.batch_product
    return depths[0]


def measure(widths: tuple[int, ...], batch_size: int, rounds: int) -> dict[str, Any]:
    model, batch = make_problem(widths, batch_size)
    operator = HessianOperator(model, [batch], supervised_loss(F.cross_entropy))
    generator = torch.Generator().manual_seed(1)
    vector = torch.randn(operator.shape[0], generator=generator)
    array = vector.numpy().astype(np.float64)
    bare = bare_product(model, batch)
    cases: dict[str, Callable[[], Any]] = {
        "bare autograd": lambda: bare(vector),
        "H @ tensor": lambda: operator @ vector,
        "H.matvec(ndarray)": lambda: operator.matvec(array),
    }
    if hasattr(operator, "shift"):
        shifted = operator.shift(1e-3)
        cases["H.shift(1e-3) @ tensor"] = lambda: shifted @ vector
    expected = bare(vector)
    torch.testing.assert_close(operator @ vector, expected, rtol=1e-4, atol=1e-5)
    frames = {
        "H @ tensor": frames_to_product(operator, lambda: operator @ vector),
        "H.matvec(ndarray)": frames_to_product(operator, lambda: operator.matvec(array)),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    overheads = {
        name: statistics.median(t - b for t, b in zip(values, times["bare autograd"]))
        for name, values in times.items()
        if name != "bare autograd"
    }
    return {
        "params": operator.shape[0],
        "medians": medians,
        "overheads": overheads,
        "frames": frames,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=300, help="timed rounds per model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"<!-- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, float32, "
        f"{args.threads} thread(s), {args.rounds} rounds -->"
    )
    print("| model | call | median (ms) | overhead vs bare (ms) | frames to batch_product |")
    print("|---|---|---:|---:|---:|")
    for name, (widths, batch_size) in MODELS.items():
        result = measure(widths, batch_size, args.rounds)
        label = f"{name} ({result['params']:,} params)"
        for call, median in result["medians"].items():
            overhead = "" if call == "bare autograd" else f"{1e3 * result['overheads'][call]:+.3f}"
            frames = result["frames"].get(call, "")
            print(f"| {label} | `{call}` | {1e3 * median:.3f} | {overhead} | {frames} |")


if __name__ == "__main__":
    main()
