"""Host overhead of one curvature product: the operator's matvec minus the autograd calls alone.

    python -m benchmarks.product_overhead [--rounds 400] [--threads 1] [--models mlp,tiny]
                                             [--clock cpu|wall] [--json FILE]

For each operator (Hessian by double backward, GGN with the forward-mode JVP, empirical Fisher),
one round times ``operator @ v`` (a torch vector, the torch path: checks, data loop, parameter
swap, per-batch product, weighting, finiteness checks), ``operator.matvec(ndarray)`` (the scipy
path on top: conversions and scipy's dispatch) and, back to back, a hand-written product that
makes the same autograd calls and nothing else (the MLP's layers called with the parameter
tensors directly, the closed-form cross-entropy Hessian, one ``torch.autograd.grad``). The
difference of the two times is what the library adds per product on the host. Each time is the
fastest of the interleaved rounds, in this thread's CPU time by default: with one torch thread
that is all the work, and other jobs on a shared machine inflate it less than wall time.

Models: ``mlp`` is the MLP of ``benchmarks/operators.py`` (128-256-256-10, batch 256; the
"benchmark MLP"), ``tiny`` an MLP 8-16-4 with batch 4, where autograd's own work is small and
the overhead is most of a product. Timings only; the numbers are in
docs/benchmarks/operators.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from benchmarks.operators import build_problem
from torch_linop import EmpiricalFisherOperator, GGNOperator, HessianOperator, supervised_loss


def tiny_problem() -> tuple[nn.Module, list[Any], str]:
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    data = [
        (torch.randn(4, 8, generator=generator), torch.randint(0, 4, (4,), generator=generator))
    ]
    return model.eval(), data, "MLP 8-16-4, tanh, batch 4"


def mlp_forward(model: nn.Sequential, weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The Linear/Tanh stack called on ``weights`` (weight, bias per layer) directly."""
    remaining = iter(weights)
    for layer in model:
        if isinstance(layer, nn.Linear):
            x = F.linear(x, next(remaining), next(remaining))
        else:
            x = layer(x)
    return x


def ce_output_hessian(logits: torch.Tensor, vectors: torch.Tensor, count: int) -> torch.Tensor:
    """Mean cross-entropy's Hessian w.r.t. the logits times ``vectors`` (closed form)."""
    probabilities = logits.softmax(-1)
    weighted = probabilities * vectors
    return (weighted - probabilities * weighted.sum(-1, keepdim=True)) / count


def autograd_only(
    kind: str, model: nn.Sequential, data: list[Any]
) -> Callable[[torch.Tensor], Any]:
    """The product's autograd calls alone, for one batch: what an operator cannot avoid."""
    ((inputs, targets),) = data
    params = [p.detach() for p in model.parameters()]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def tangents_of(vector: torch.Tensor) -> list[torch.Tensor]:
        return [t.view(s) for t, s in zip(torch.split(vector, sizes), shapes)]

    def hessian(vector: torch.Tensor) -> torch.Tensor:
        leaves = [p.requires_grad_(True) for p in (q.detach() for q in params)]
        loss = F.cross_entropy(mlp_forward(model, leaves, inputs), targets)
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        return torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(grads, leaves, tangents_of(vector))]
        )

    def sandwich(vector: torch.Tensor, per_sample: bool) -> torch.Tensor:
        leaves = [p.requires_grad_(True) for p in (q.detach() for q in params)]
        with fwAD.dual_level():
            duals = [fwAD.make_dual(leaf, t) for leaf, t in zip(leaves, tangents_of(vector))]
            output = mlp_forward(model, duals, inputs)
            if per_sample:
                output = F.cross_entropy(output, targets, reduction="none")
            primal, jvp = fwAD.unpack_dual(output)
            primal = primal.view_as(primal)
        if per_sample:
            cotangent = jvp / primal.numel()
        else:
            cotangent = ce_output_hessian(primal.detach(), jvp, primal.shape[0])
        grads = torch.autograd.grad(primal, leaves, cotangent)
        return torch.cat([g.reshape(-1) for g in grads])

    if kind == "hessian":
        return hessian
    return lambda vector: sandwich(vector, per_sample=kind == "empirical_fisher")


OPERATORS: dict[str, tuple[str, Callable[..., Any]]] = {
    "Hessian (double backward)": ("hessian", HessianOperator),
    "GGN (forward-mode JVP)": ("ggn", GGNOperator),
    "Empirical Fisher": ("empirical_fisher", EmpiricalFisherOperator),
}


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def measure(name: str, rounds: int, clock: Callable[[], float]) -> list[dict[str, Any]]:
    model, data, description = tiny_problem() if name == "tiny" else build_problem("mlp", False)
    loss = supervised_loss(F.cross_entropy)
    num_params = sum(p.numel() for p in model.parameters())
    vector = torch.randn(num_params, generator=torch.Generator().manual_seed(1))
    rows = []
    for label, (kind, operator_class) in OPERATORS.items():
        operator = operator_class(model, data, loss)
        baseline = autograd_only(kind, model, data)
        difference = (operator @ vector - baseline(vector)).norm() / baseline(vector).norm()
        assert difference < 1e-4, f"{label}: the baseline computes another product ({difference})"
        array = vector.numpy()
        functions = {
            "operator": lambda op=operator: op @ vector,
            "numpy": lambda op=operator, x=array: op.matvec(x),
            "autograd": lambda product=baseline: product(vector),
        }
        for function in functions.values():  # warm-up
            for _ in range(5):
                function()
        times: dict[str, list[float]] = {key: [] for key in functions}
        for _ in range(rounds):
            for key, function in functions.items():
                start = clock()
                function()
                times[key].append(clock() - start)
        # the fastest round: on a shared machine, load only ever adds time (descheduling, caches
        # evicted by other jobs), so the minimum over many interleaved rounds is the estimate of
        # the unloaded cost least disturbed by it (as timeit advises)
        low = {key: min(values) for key, values in times.items()}
        rows.append(
            {
                "model": f"{name}: {description} ({num_params:,} params)",
                "operator": label,
                "autograd_ms": 1e3 * low["autograd"],
                "operator_ms": 1e3 * low["operator"],
                "numpy_ms": 1e3 * low["numpy"],
                "overhead_ms": 1e3 * (low["operator"] - low["autograd"]),
                "numpy_overhead_ms": 1e3 * (low["numpy"] - low["autograd"]),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", type=lambda text: text.split(","), default=["mlp", "tiny"])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="cpu",
        help="cpu (default): this thread's CPU time, which other jobs on a shared machine do "
        "not inflate (with one torch thread it is all the work); wall: elapsed time",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = [row for name in args.models for row in measure(name, args.rounds, CLOCKS[args.clock])]
    print(
        f"date {started}; command: python -m benchmarks.product_overhead {shlex.join(sys.argv[1:])}"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        "| model | operator | autograd calls alone (ms) | `op @ tensor` (ms) | overhead (ms) "
        "| `op.matvec(ndarray)` (ms) | overhead (ms) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['model']} | {row['operator']} | {row['autograd_ms']:.3f} "
            f"| {row['operator_ms']:.3f} | {row['overhead_ms']:.3f} "
            f"| {row['numpy_ms']:.3f} | {row['numpy_overhead_ms']:.3f} |"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": started, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
