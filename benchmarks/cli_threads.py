"""How many CPU threads the ``torch-linop`` built-in job's products want, idle and under load.

``python -m benchmarks.cli_threads [--load N] [--repeats R]`` times one Hessian-vector product of
the built-in job (MLP 64-32-10 on 1,437 digits, 2,410 parameters, float64) for 1, 2, 4, ...
threads up to the machine's cores, with ``N`` busy-looping processes beside it (a shared
machine), and prints the median seconds per product. The CLI's default thread count
(``torch_linop.cli.threads``) follows from these numbers (docs/getting-started/command_line.md).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

import torch


def _spin(stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    while not stop.is_set():
        sum(range(10_000))


def time_products(threads: int, repeats: int) -> float:
    """Median seconds of one Hessian product of the built-in job with ``threads`` threads."""
    from torch_linop import HessianOperator
    from torch_linop.cli.builtin import builtin_workload

    torch.set_num_threads(threads)
    workload = builtin_workload(0, torch.float64)
    operator = HessianOperator(workload.model, workload.data, workload.loss)
    vector = torch.randn(
        operator.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    operator @ vector  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        operator @ vector
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--load", type=int, default=0, help="busy processes running beside it")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    counts = sorted({1, 2, 4, 8, 16, 32, 64, cores} & set(range(1, cores + 1)))
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,)) for _ in range(args.load)]
    for process in spinners:
        process.start()
    try:
        print(
            f"{cores} cores, {args.load} busy processes beside the job, torch {torch.__version__}"
        )
        print(f"{'threads':>7}  {'ms / product':>12}")
        for threads in counts:
            print(f"{threads:>7}  {1e3 * time_products(threads, args.repeats):>12.2f}", flush=True)
    finally:
        stop.set()
        for process in spinners:
            process.join()


if __name__ == "__main__":
    main()
