"""Benchmark of ce_hvp on one CUDA GPU: copy bandwidth, eager, compile and Triton in one run.

For each shape it checks the Triton result against a float64 reference on a few rows (output
poisoned with NaN first), then times every backend with ``triton.testing.do_bench`` (median, L2
flushed between runs), and reports the percentage of the bandwidth floor: logits read once, u read
once and the output written once, at the device-to-device copy bandwidth measured in the same run.
Peak memory is ``torch.cuda.max_memory_allocated`` above what the inputs already hold.

    PYTHONPATH=$PWD python benchmarks/ce_hvp.py --out $OUT

Inputs come from a seeded CUDA generator (drawing gigabytes on the CPU would dominate the run).
``--dry-run`` runs tiny shapes on the CPU (with ``TRITON_INTERPRET=1``) to check the script itself;
its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (rows, vocab, dtype, shift_and_labels); the first four are the shapes.
SHAPES = [
    (16384, 50304, "fp32", False),
    (16384, 50304, "bf16", False),
    (8192, 128256, "bf16", False),
    (8192, 128256, "fp32", False),
    (16384, 50304, "bf16", True),
]
PEER_MS_H100 = {  # best peer kernel on an H100 80GB (issue 4), for orientation only
    (16384, 50304, "fp32"): 6.80,
    (16384, 50304, "bf16"): 3.44,
    (8192, 128256, "bf16"): 4.40,
    (8192, 128256, "fp32"): 8.67,
}


DEVICE = "cuda"
DRY_RUN_SHAPES = [(6, 300, "fp32", False), (6, 5000, "bf16", True)]


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn: Callable[[], object], rep_ms: int = 150) -> float:
    """Median ms of ``fn`` (the autotuners' timing, with a longer warmup and measurement)."""
    from torch_linop.kernels._ce_hvp_common import median_ms

    return median_ms(fn, torch.device(DEVICE), warmup=25, rep=rep_ms)


def copy_bandwidth(num_bytes: int = 4 << 30) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms * 1e-3)


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak allocation during one call, above what was allocated before it."""
    if DEVICE != "cuda":
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak


def inplace_ms(logits, u, labels, shift: bool, repeats: int = 7) -> tuple[float, int]:
    """Median ms of the in-place Triton call, u refreshed from a copy before each timed call."""
    from torch_linop.kernels import ce_hvp

    buffer = u.clone()
    flush = torch.empty(256 << 20 if DEVICE == "cuda" else 1, dtype=torch.int8, device=DEVICE)
    times = []
    for _ in range(repeats):
        buffer.copy_(u)
        flush.zero_()
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            ce_hvp(logits, buffer, labels, shift=shift, backend="triton", inplace=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append(bench_ms(lambda: ce_hvp(logits, buffer, labels, backend="triton")))
    buffer.copy_(u)
    peak = peak_extra_bytes(
        lambda: ce_hvp(logits, buffer, labels, shift=shift, backend="triton", inplace=True)
    )
    return sorted(times)[len(times) // 2], peak


def reference_rows(logits, u, labels, shift: bool, rows: torch.Tensor) -> torch.Tensor:
    """float64 product on selected rows of a (N, V) problem (HF shift semantics)."""
    probs = torch.softmax(logits[rows].double(), dim=-1)
    tangent = u[rows].double()
    product = probs * tangent - probs * (probs * tangent).sum(-1, keepdim=True)
    num_rows = logits.shape[0]
    if labels is None:
        has_target = torch.ones(num_rows, dtype=torch.bool, device=logits.device)
    else:
        has_target = labels != -100
    if shift:
        has_target = torch.cat([has_target[1:], has_target.new_zeros(1)])
    return product * (has_target[rows].double() / has_target.sum().double()).unsqueeze(-1)


def run_shape(num_rows: int, vocab: int, dtype_name: str, shift: bool, bandwidth: float) -> dict:
    from benchmarks.ce_hvp_tuning import tuned_configs, tuning_timings
    from torch_linop.kernels import _ce_hvp_cluster, _ce_hvp_two_pass, ce_hvp
    from torch_linop.kernels._ce_hvp_registry import CLUSTER_ENV  # after --dry-run's env

    dtype = DTYPES[dtype_name]
    generator = torch.Generator(device=DEVICE).manual_seed(num_rows * 7 + vocab)
    logits = (torch.randn(num_rows, vocab, generator=generator, device=DEVICE) * 3).to(dtype)
    u = torch.randn(num_rows, vocab, generator=generator, device=DEVICE).to(dtype)
    labels = None
    if shift:
        labels = torch.randint(0, vocab, (num_rows,), generator=generator, device=DEVICE)
        labels[torch.rand(num_rows, generator=generator, device=DEVICE) < 0.1] = -100
    element = logits.element_size()
    floor_bytes = 3 * num_rows * vocab * element
    floor_ms = floor_bytes / bandwidth * 1e3
    row = {
        "rows": num_rows,
        "vocab": vocab,
        "dtype": dtype_name,
        "shift_and_labels": shift,
        "floor_ms": floor_ms,
        "input_bytes": 2 * num_rows * vocab * element,
    }

    # Correctness first: poisoned output, every entry written, a few rows against float64.
    out = torch.full_like(logits, float("nan"))
    start = time.perf_counter()
    ce_hvp(logits, u, labels, shift=shift, backend="triton", out=out)
    synchronize()
    row["first_call_s_incl_tuning"] = time.perf_counter() - start
    check_rows = torch.tensor([0, 1, num_rows // 2, num_rows - 2, num_rows - 1], device=DEVICE)
    expected = reference_rows(logits, u, labels, shift, check_rows)
    row["all_written"] = bool(torch.isfinite(out).all())
    row["check_rel_err"] = float((out[check_rows].double() - expected).norm() / expected.norm())
    del out
    # The autotuner's pick: the two-pass kernel's, or the cluster kernel's where it took the call.
    for key, two_pass_config in tuned_configs(_ce_hvp_two_pass).items():
        if key[1] == vocab and key[2] == dtype:  # the key has no labels: tuned once per V, dtype
            row["triton_kernel"] = "two_pass"
            row["triton_config"] = two_pass_config.label()
            two_pass_timings = tuning_timings(_ce_hvp_two_pass).get(key, {})
            row["tuning_ms"] = {c.label(): t for c, t in two_pass_timings.items()}
    for key, cluster in tuned_configs(_ce_hvp_cluster).items():
        if key[1] == vocab and key[2] == dtype:  # the Hopper cluster kernel took the call
            row["triton_kernel"] = "cluster"
            row["triton_config"] = f"C{cluster[0]}x{cluster[1]}"
            cluster_timings = tuning_timings(_ce_hvp_cluster).get(key, {})
            row["tuning_ms"] = {f"C{c}x{n}": t for (c, n), t in cluster_timings.items()}

    def two_pass() -> object:  # the Triton two-pass kernel, with the cluster kernel switched off
        os.environ[CLUSTER_ENV] = "0"
        try:
            return ce_hvp(logits, u, labels, shift=shift, backend="triton")
        finally:
            del os.environ[CLUSTER_ENV]

    backends = {
        "triton": lambda: ce_hvp(logits, u, labels, shift=shift, backend="triton"),
        "two_pass": two_pass,
        "compile": lambda: ce_hvp(logits, u, labels, shift=shift, backend="compile"),
        "eager": lambda: ce_hvp(logits, u, labels, shift=shift, backend="eager"),
    }
    torch._dynamo.reset()  # compile each shape statically, as a fixed-shape training loop would
    for name, fn in backends.items():
        try:
            start = time.perf_counter()
            fn()
            synchronize()
            row[f"{name}_warmup_s"] = time.perf_counter() - start
            row[f"{name}_ms"] = backend_ms = bench_ms(fn)
            row[f"{name}_peak_extra_gb"] = peak_extra_bytes(fn) / 1e9
            row[f"{name}_pct_floor"] = 100 * floor_ms / backend_ms
        except Exception as error:  # report and go on: one failing backend must not hide the rest
            row[f"{name}_error"] = f"{type(error).__name__}: {error}"[:500]
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    in_place_ms, peak = inplace_ms(logits, u, labels, shift)
    row["triton_inplace_ms"] = in_place_ms
    row["triton_inplace_peak_extra_gb"] = peak / 1e9
    row["triton_inplace_pct_floor"] = 100 * floor_ms / in_place_ms
    row["output_gb"] = num_rows * vocab * element / 1e9
    return row


def markdown(rows: list[dict], bandwidth: float) -> str:
    lines = [
        f"copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s",
        "",
        "| N | V | dtype | shift+labels | kernel | eager ms | compile ms | Triton two-pass ms "
        "| ours ms | in-place ms | floor ms | two-pass % floor | ours % floor | in-place % floor "
        "| peak extra GB eager / compile / ours / in-place | output GB | H100 peer ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value: object, digits: int = 2) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else "err"

    for row in rows:
        peaks = " / ".join(
            fmt(row.get(f"{name}_peak_extra_gb"))
            for name in ("eager", "compile", "triton", "triton_inplace")
        )
        peer = PEER_MS_H100.get((row["rows"], row["vocab"], row["dtype"]))
        lines.append(
            f"| {row['rows']} | {row['vocab']} | {row['dtype']} | "
            f"{'yes' if row['shift_and_labels'] else 'no'} | {row.get('triton_kernel', '')} | "
            f"{fmt(row.get('eager_ms'))} | {fmt(row.get('compile_ms'))} | "
            f"{fmt(row.get('two_pass_ms'))} | {fmt(row.get('triton_ms'))} | "
            f"{fmt(row.get('triton_inplace_ms'))} | {fmt(row['floor_ms'])} | "
            f"{fmt(row.get('two_pass_pct_floor'), 1)} | {fmt(row.get('triton_pct_floor'), 1)} | "
            f"{fmt(row.get('triton_inplace_pct_floor'), 1)} "
            f"| {peaks} | {fmt(row['output_gb'])} | {'' if peer is None else f'{peer:.2f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(".bench_out"), help="folder for ce_hvp.json (untracked)"
    )
    parser.add_argument("--quick", action="store_true", help="first shape only")
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU shapes (interpreter)")
    args = parser.parse_args()
    global DEVICE
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.dry_run:
        DEVICE, shapes = "cpu", DRY_RUN_SHAPES
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/ce_hvp.py needs a CUDA device (or --dry-run)")
    bandwidth = copy_bandwidth(4 << 30 if DEVICE == "cuda" else 1 << 20)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s", flush=True)
    rows = []
    for shape in shapes:
        rows.append(run_shape(*shape, bandwidth))
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
        write_report(args.out, rows, bandwidth)
    report = write_report(args.out, rows, bandwidth)
    print(f"\n{report['device']}, torch {report['torch']}, triton {report['triton']}")
    print(report["table"])
    bad = [row for row in rows if not row["all_written"] or not row["check_rel_err"] < 2e-2]
    if bad:
        sys.exit(f"Triton results failed their check: {bad}")


def write_report(folder: Path | None, rows: list[dict], bandwidth: float) -> dict:
    import triton

    table = markdown(rows, bandwidth)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "rows": rows,
        "table": table,
    }
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ce_hvp.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
