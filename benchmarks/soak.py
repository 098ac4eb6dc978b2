"""Soak test: is memory bounded over long runs?

Runs 1,000 products of each operator (Hessian, GGN, empirical Fisher, MC Fisher) of a small MLP,
then 200-product Lanczos (plain, checkpointed), Hutch++ and SLQ runs on them, each solver run
three times in a row, sampling the process's resident memory (``/proc/self/statm``, else psutil)
after every product and, on CUDA, ``torch.cuda.max_memory_allocated`` / ``memory_allocated``.
The warm-up is the first 10% of the products (at least 20) for the operators and the first of the
three runs for the solvers (a run allocates its basis or sketch, and ends with a k-column residual
product, once per run). Memory above the warm-up's maximum by more than 5% afterwards is a
FAILURE in the table (exit code 1). The trend column is the least-squares slope of the memory
after the warm-up (per product) or of the per-run peaks (per run): a leak of a few KB per product
shows there long before it reaches 5%.

    python benchmarks/soak.py [--device cpu|cuda] [--matvecs 1000] [--steps 200]
                              [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from torch_linop import (  # noqa: E402
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    MCFisherOperator,
    supervised_loss,
)
from torch_linop.solvers import lanczos, spectral_density  # noqa: E402
from torch_linop.solvers import trace as estimate_trace  # noqa: E402

GROWTH_LIMIT = 0.05  # growth after warm-up above this fraction of the warm-up level: FAILURE
WARMUP_FRACTION = 0.1
MIN_WARMUP = 20
MIB = 1024**2


def resident_bytes() -> int:
    """Resident set size of this process."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


@dataclass
class Trace:
    """Memory after each product of one workload."""

    name: str
    device: str
    rss: list[int] = field(default_factory=list)
    cuda_peak: list[int] = field(default_factory=list)
    cuda_allocated: list[int] = field(default_factory=list)
    seconds: float = 0.0
    warmup: int | None = None  # samples in the warm-up; None: 10% (at least 20)
    run_ends: list[int] = field(default_factory=list)  # sample counts at the end of each run

    def sample(self) -> None:
        self.rss.append(resident_bytes())
        if self.device == "cuda":
            self.cuda_peak.append(torch.cuda.max_memory_allocated())
            self.cuda_allocated.append(torch.cuda.memory_allocated())

    def summary(self) -> dict[str, Any]:
        count = len(self.rss)
        warmup = self.warmup or max(MIN_WARMUP, int(WARMUP_FRACTION * count))
        warmup = min(count - 1, warmup)
        result: dict[str, Any] = {
            "workload": self.name,
            "products": count,
            "warmup": warmup,
            "seconds": self.seconds,
        }
        failures = []
        for label, series in (
            ("rss", self.rss),
            ("cuda_peak", self.cuda_peak),
            ("cuda_allocated", self.cuda_allocated),
        ):
            if not series:
                continue
            values = np.asarray(series, dtype=np.float64)
            level = values[:warmup].max()
            after = values[warmup:]
            growth = (after.max() - level) / max(level, 1.0)
            if self.run_ends:  # repeated runs: the trend of the per-run peaks
                starts = [0, *self.run_ends[:-1]]
                points = np.array([values[a:b].max() for a, b in zip(starts, self.run_ends)])
                unit = "run"
            else:  # one long loop: the trend over the products after the warm-up
                points, unit = after, "product"
            steps = np.arange(len(points), dtype=np.float64)
            slope = float(np.polyfit(steps, points, 1)[0]) if len(points) > 1 else 0.0
            result[label] = {
                "warmup_level_mib": level / MIB,
                "final_mib": values[-1] / MIB,
                "peak_mib": values.max() / MIB,
                "growth": growth,
                "trend_kib": slope / 1024,
                "trend_unit": unit,
            }
            if growth > GROWTH_LIMIT:
                failures.append(label)
        result["verdict"] = "FAILURE (" + ", ".join(failures) + ")" if failures else "ok"
        return result


def build_problem(device: torch.device) -> tuple[nn.Module, list[Any], Any]:
    """A 64-128-128-10 tanh MLP (26k float32 parameters) and 4 batches of 256 samples."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
        ).to(device)
    generator = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(256, 64, generator=generator).to(device),
            torch.randint(0, 10, (256,), generator=generator).to(device),
        )
        for _ in range(4)
    ]
    return model, data, supervised_loss(F.cross_entropy)


class Sampled:
    """Torch-path operator that samples memory after every product of ``inner``."""

    def __init__(self, inner: Any, trace: Trace) -> None:
        self.inner, self.trace = inner, trace
        self.device, self.torch_dtype, self.shape = inner.device, inner.torch_dtype, inner.shape
        self.params = inner.params  # the checkpoint fingerprint uses the parameters

    def matmat(self, block: torch.Tensor) -> torch.Tensor:
        product = self.inner @ block
        for _ in range(block.shape[1]):
            self.trace.sample()
        return product


def run_workload(name: str, device: torch.device, body: Callable[[Trace], None]) -> Trace:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trace = Trace(name, device.type)
    start = time.perf_counter()
    body(trace)
    if device.type == "cuda":
        torch.cuda.synchronize()
    trace.seconds = time.perf_counter() - start
    print(f"  {name}: {len(trace.rss)} products in {trace.seconds:.1f} s", file=sys.stderr)
    return trace


def repeated(run: Callable[[Trace], None], repeats: int) -> Callable[[Trace], None]:
    """``run`` ``repeats`` times; the first run is the warm-up."""

    def body(trace: Trace) -> None:
        for _ in range(repeats):
            run(trace)
            trace.run_ends.append(len(trace.rss))
        trace.warmup = trace.run_ends[0]

    return body


def soak(device: torch.device, num_matvecs: int, num_steps: int, repeats: int) -> list[Trace]:
    model, data, loss = build_problem(device)
    operators = {
        "Hessian": HessianOperator(model, data, loss),
        "GGN": GGNOperator(model, data, loss),
        "EF": EmpiricalFisherOperator(model, data, loss),
        "MC Fisher": MCFisherOperator(model, data, loss, mc_samples=1),
    }
    size = operators["Hessian"].shape[0]
    vector = torch.randn(size, generator=torch.Generator().manual_seed(2)).to(device)
    traces = []
    for label, operator in operators.items():

        def products(trace: Trace, operator: Any = operator) -> None:
            for _ in range(num_matvecs):
                operator @ vector
                trace.sample()

        traces.append(run_workload(f"{label} matvec x{num_matvecs}", device, products))

    hessian, ggn = operators["Hessian"], operators["GGN"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runs stop at the budget, unconverged

        def lanczos_run(trace: Trace) -> None:
            # tol far below reach: the run takes all num_steps products, restarting at 100
            lanczos(Sampled(hessian, trace), 10, tol=1e-300, max_matvecs=num_steps, seed=0)

        traces.append(
            run_workload(
                f"Lanczos {num_steps} steps (Hessian) x{repeats}",
                device,
                repeated(lanczos_run, repeats),
            )
        )

        with tempfile.TemporaryDirectory() as folder:

            def checkpointed(trace: Trace) -> None:
                (Path(folder) / "lanczos.pt").unlink(missing_ok=True)  # a fresh run each time
                lanczos(
                    Sampled(hessian, trace),
                    10,
                    tol=1e-300,
                    max_matvecs=num_steps,
                    seed=0,
                    checkpoint=Path(folder) / "lanczos.pt",
                    checkpoint_every=10,
                )

            traces.append(
                run_workload(
                    f"Lanczos {num_steps} steps, checkpoint every 10 x{repeats}",
                    device,
                    repeated(checkpointed, repeats),
                )
            )

        def hutchpp(trace: Trace) -> None:
            estimate_trace(Sampled(ggn, trace), num_steps, seed=0, block_size=10)

        traces.append(
            run_workload(
                f"Hutch++ {num_steps} products (GGN) x{repeats}", device, repeated(hutchpp, repeats)
            )
        )

        def slq(trace: Trace) -> None:
            spectral_density(
                Sampled(hessian, trace), num_runs=4, lanczos_steps=num_steps // 4, seed=0
            )

        traces.append(
            run_workload(
                f"SLQ 4 x {num_steps // 4} steps (Hessian) x{repeats}",
                device,
                repeated(slq, repeats),
            )
        )
    return traces


def format_table(summaries: list[dict[str, Any]], device: str) -> str:
    header = (
        "| workload | products | warm-up | s | RSS warm-up max (MiB) | RSS final (MiB) | growth | "
        "trend |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if device == "cuda":
        header += " CUDA peak in warm-up (MiB) | CUDA peak final (MiB) | CUDA growth |"
        rule += "---:|---:|---:|"
    header += " verdict |"
    rule += "---|"
    lines = [header, rule]
    for summary in summaries:
        rss = summary["rss"]
        row = (
            f"| {summary['workload']} | {summary['products']} | {summary['warmup']} | "
            f"{summary['seconds']:.1f} | "
            f"{rss['warmup_level_mib']:.1f} | {rss['final_mib']:.1f} | "
            f"{100 * rss['growth']:+.2f}% | {rss['trend_kib']:+.1f} KiB/{rss['trend_unit']} |"
        )
        if device == "cuda":
            peak = summary["cuda_peak"]
            row += (
                f" {peak['warmup_level_mib']:.1f} | {peak['final_mib']:.1f} | "
                f"{100 * peak['growth']:+.2f}% |"
            )
        row += f" {summary['verdict']} |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--matvecs", type=int, default=1000, help="products per operator")
    parser.add_argument("--steps", type=int, default=200, help="products per solver run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each solver")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write summaries and series")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return run(args, argv)
    finally:
        torch.set_num_threads(threads)  # in-process callers get their setting back


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    device = torch.device(args.device)
    started = datetime.now(timezone.utc)
    traces = soak(device, args.matvecs, args.steps, args.repeats)
    summaries = [trace.summary() for trace in traces]
    command = "python benchmarks/soak.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(f"Soak run {started:%Y-%m-%d %H:%M} UTC: `{command}`")
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    print()
    print(format_table(summaries, device.type))
    failed = [s["workload"] for s in summaries if s["verdict"] != "ok"]
    print()
    print(
        f"FAILURE: memory grew in {failed}" if failed else "All workloads bounded (growth <= 5%)."
    )
    if args.json is not None:
        payload = {
            "started": started.isoformat(),
            "command": command,
            "torch": torch.__version__,
            "device": str(device),
            "summaries": summaries,
            "series": [asdict(trace) for trace in traces],
        }
        args.json.write_text(json.dumps(payload, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
