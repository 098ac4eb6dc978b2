"""Compare the ce_hvp Triton kernel designs on one CUDA GPU in a single run.

For each of the issue's four shapes it measures the copy bandwidth (as ``benchmarks/ce_hvp.py``
does) and from it the floor (logits read once, u read once, output written once), the eager
reference, the shipped ``ce_hvp(backend="triton")`` as "current" (its untuned default config),
and every design of ``benchmarks/ce_hvp_designs.py``: each candidate config is timed on the whole
problem, the fastest is checked against the eager float32 result (output poisoned with NaN first)
and timed again. Times are medians of ``triton.testing.do_bench`` (L2 flushed between runs).

    PYTHONPATH=$PWD python benchmarks/ce_hvp_variants.py --out $OUT

writes ``ce_hvp_variants.json`` and ``ce_hvp_variants.md`` to ``--out`` and prints the table.
``--smoke`` runs tiny shapes on the CPU through Triton's interpreter (``TRITON_INTERPRET=1`` must
be set) to check the script itself; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(ROOT))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = [  # (rows, vocab, dtype): the shapes
    (16384, 50304, "fp32"),
    (16384, 50304, "bf16"),
    (8192, 128256, "bf16"),
    (8192, 128256, "fp32"),
]
SMOKE_SHAPES = [(4, 300, "fp32"), (3, 1000, "bf16")]
# Largest error of a variant against eager float32 (max |diff| / max |eager|) counted as correct:
# both round to the output dtype, so half-precision outputs differ by an output ulp or two.
MAX_ERROR = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 4e-3}


def median_ms(fn: Callable[[], object], device: str, rep_ms: int = 50) -> float:
    """Median time of ``fn``: do_bench on CUDA (L2 flushed); one wall-clock run elsewhere (the
    smoke run's interpreter times mean nothing)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def errors(result: torch.Tensor, expected: torch.Tensor) -> dict:
    """Max error relative to the largest entry, relative L2 error, and whether all was written."""
    diff = (result.float() - expected.float()).abs()
    scale = expected.float().abs().max().clamp_min(1e-30)
    return {
        "all_written": bool(torch.isfinite(result).all()),
        "max_rel_err": float(diff.max() / scale),
        "rel_l2_err": float(diff.norm() / expected.float().norm().clamp_min(1e-30)),
    }


def smoke_candidates(variants_module, name: str) -> list:
    """Two small configs per variant, so tiny shapes still split rows and loop."""
    config = variants_module.VariantConfig
    if name == "current_sweep":
        return [config(128, 1), config(256, 2)]
    return [
        config(128, 1, seg_chunks=2, programs_per_sm=1, block_mb=1),
        config(256, 2, seg_chunks=1, programs_per_sm=2, block_mb=1),
    ]


def run_shape(
    num_rows: int,
    vocab: int,
    dtype_name: str,
    bandwidth: float | None,
    device: str,
    names: list[str],
    row: dict,
    on_progress: Callable[[], None],
) -> None:
    """Measure ``names`` ("eager", "current" or a variant) at one shape, into ``row``."""
    from benchmarks import ce_hvp_designs as variants
    from torch_linop.kernels import ce_hvp

    dtype = DTYPES[dtype_name]
    started = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(num_rows * 7 + vocab)
    logits = (torch.randn(num_rows, vocab, generator=generator, device=device) * 3).to(dtype)
    u = torch.randn(num_rows, vocab, generator=generator, device=device).to(dtype)
    out = torch.empty_like(u)
    row.update(rows=num_rows, vocab=vocab, dtype=dtype_name)
    if bandwidth is not None:
        row["floor_ms"] = 3 * num_rows * vocab * logits.element_size() / bandwidth * 1e3

    def record(name: str, ms: float) -> None:
        row[f"{name}_ms"] = ms
        if "floor_ms" in row:
            row[f"{name}_pct_floor"] = 100 * row["floor_ms"] / ms

    expected = ce_hvp(logits, u, backend="eager")
    if "eager" in names:
        record("eager", median_ms(lambda: ce_hvp(logits, u, backend="eager", out=out), device))
    if "current" in names:
        saved_autotune = os.environ.get("TORCH_LINOP_CE_HVP_AUTOTUNE")
        os.environ["TORCH_LINOP_CE_HVP_AUTOTUNE"] = "0"  # the shipped kernel's default config
        try:
            out.fill_(float("nan"))
            ce_hvp(logits, u, backend="triton", out=out)
            row["current_check"] = errors(out, expected)
            current = lambda: ce_hvp(logits, u, backend="triton", out=out)  # noqa: E731
            record("current", median_ms(current, device))
        except Exception as error:  # report and go on: one failure must not hide the rest
            row["current_error"] = f"{type(error).__name__}: {error}"[:500]
        finally:
            if saved_autotune is None:
                del os.environ["TORCH_LINOP_CE_HVP_AUTOTUNE"]
            else:
                os.environ["TORCH_LINOP_CE_HVP_AUTOTUNE"] = saved_autotune
        on_progress()

    logits3, u3, out3 = logits.unsqueeze(0), u.unsqueeze(0), out.unsqueeze(0)
    problem: dict = dict(ignore_index=-100, shift=False, scale=1.0 / num_rows)
    for name in names:
        if name not in variants.VARIANTS:
            continue
        launcher = variants.VARIANTS[name]
        variant_started = time.perf_counter()
        try:
            candidates = (
                smoke_candidates(variants, name)
                if device != "cuda"
                else variants.candidate_configs(name, vocab)
            )
            failed: dict = {}
            best, timings = variants.tune(
                name, logits3, u3, None, out3, candidates=candidates, failed=failed, **problem
            )
            if failed:
                row[f"{name}_failed_candidates"] = {c.label(): e for c, e in failed.items()}
            row[f"{name}_config"] = best.label()
            row[f"{name}_candidates_ms"] = {config.label(): ms for config, ms in timings.items()}
            out.fill_(float("nan"))
            launcher(logits3, u3, None, out3, config=best, **problem)
            row[f"{name}_check"] = errors(out, expected)

            def run(launcher=launcher, best=best) -> None:
                launcher(logits3, u3, None, out3, config=best, **problem)

            record(name, median_ms(run, device))
        except Exception as error:
            row[f"{name}_error"] = f"{type(error).__name__}: {error}"[:500]
        row[f"{name}_seconds_incl_compile"] = time.perf_counter() - variant_started
        on_progress()
    row["seconds"] = row.get("seconds", 0.0) + time.perf_counter() - started
    # the caller frees the cached GPU memory once the inputs are out of scope


def variant_names() -> list[str]:
    from benchmarks import ce_hvp_designs as variants

    return ["current", *variants.VARIANTS]


def markdown(rows: list[dict], bandwidth: float | None) -> str:
    names = variant_names()

    def fmt(value: object, digits: int = 2) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else "-"

    def cell(row: dict, name: str) -> str:
        if f"{name}_error" in row:
            return "error"
        ms = row.get(f"{name}_ms")
        pct = row.get(f"{name}_pct_floor")
        check = row.get(f"{name}_check", {})
        bad = check and (
            not check["all_written"] or not check["max_rel_err"] < MAX_ERROR[row["dtype"]]
        )
        text = fmt(ms) + (f" ({pct:.0f}%)" if isinstance(pct, float) else "")
        return text + (" WRONG" if bad else "")

    lines = []
    if bandwidth is not None:
        lines += [f"copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s", ""]
    lines += [
        "ms (% of floor); WRONG: the output failed its check against eager float32",
        "",
        "| N | V | dtype | floor ms | eager ms | " + " | ".join(names) + " | fastest |",
        "|---|---|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for row in rows:
        timed = {n: row[f"{n}_ms"] for n in names if isinstance(row.get(f"{n}_ms"), float)}
        fastest = min(timed, key=timed.__getitem__) if timed else "-"
        if fastest in timed and f"{fastest}_config" in row:
            fastest += f" {row[f'{fastest}_config']}"
        lines.append(
            f"| {row['rows']} | {row['vocab']} | {row['dtype']} | {fmt(row.get('floor_ms'))} | "
            f"{fmt(row.get('eager_ms'))} | " + " | ".join(cell(row, n) for n in names) + " | "
            f"{fastest} |"
        )
    lines += ["", "Best config per variant (all candidates' ms in the JSON):", ""]
    variant_only = names[1:]
    lines += [
        "| N | V | dtype | " + " | ".join(variant_only) + " |",
        "|---|---|---|" + "---|" * len(variant_only),
    ]
    for row in rows:
        lines.append(
            f"| {row['rows']} | {row['vocab']} | {row['dtype']} | "
            + " | ".join(row.get(f"{n}_config", "-") for n in variant_only)
            + " |"
        )
    return "\n".join(lines)


def occupancy_report() -> list[dict]:
    from benchmarks import ce_hvp_designs as variants

    return variants.occupancy_report()


def write_report(folder: Path | None, rows: list[dict], bandwidth: float | None, device: str):
    import triton

    table = markdown(rows, bandwidth)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "max_error": MAX_ERROR,
        "resident_programs_per_sm": occupancy_report(),
        "rows": rows,
        "table": table,
    }
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ce_hvp_variants.json").write_text(json.dumps(report, indent=2))
        (folder / "ce_hvp_variants.md").write_text(table + "\n")
    return report


def failures(rows: list[dict]) -> list[str]:
    """Variants whose output failed the check (errors in running them are reported, not failed)."""
    bad = []
    for row in rows:
        for name in variant_names():
            check = row.get(f"{name}_check")
            if check and (
                not check["all_written"] or not check["max_rel_err"] < MAX_ERROR[row["dtype"]]
            ):
                bad.append(f"{name} at {row['rows']}x{row['vocab']} {row['dtype']}: {check}")
    return bad


def main(argv: list[str] | None = None) -> int:
    from benchmarks import ce_hvp_designs as variants

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(".bench_out"), help="folder for the JSON and table"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shapes (interpreter)")
    parser.add_argument("--shapes", type=int, default=None, help="only the first N shapes")
    parser.add_argument(
        "--variants", default=",".join(variants.VARIANTS), help="comma-separated variant names"
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=230.0,
        help="write what was measured and exit (code 3) after this many seconds",
    )
    args = parser.parse_args(argv)
    chosen = [name for name in args.variants.split(",") if name]
    unknown = sorted(set(chosen) - set(variants.VARIANTS))
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {list(variants.VARIANTS)}")
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke runs Triton's interpreter: set TRITON_INTERPRET=1")
        device, shapes, bandwidth = "cpu", SMOKE_SHAPES, None
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/ce_hvp_variants.py needs a CUDA device (or --smoke)")
        from benchmarks.ce_hvp import copy_bandwidth

        device, shapes = "cuda", SHAPES
        bandwidth = copy_bandwidth()
        torch.cuda.empty_cache()
        print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s", flush=True)
    if args.shapes is not None:
        shapes = shapes[: args.shapes]
    started = time.perf_counter()
    rows: list[dict] = [{} for _ in shapes]
    lock = threading.Lock()

    def save() -> None:
        with lock:
            write_report(args.out, [row for row in rows if row], bandwidth, device)

    def give_up() -> None:  # a kernel that never returns must not eat the whole device call
        try:
            save()
        except Exception as error:  # the main thread may be mid-update; keep the last file
            print(f"could not write the partial report: {error}", flush=True)
        print(f"deadline of {args.deadline_s:.0f} s reached; partial results written", flush=True)
        os._exit(3)

    watchdog = threading.Timer(args.deadline_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    # The split-row kernel waits on sibling programs: it runs last, after every other result
    # is safely written.
    phases = [
        ["eager", "current", *(name for name in chosen if name != "split_coop")],
        [name for name in chosen if name == "split_coop"],
    ]
    for names in phases:
        for shape, row in zip(shapes, rows, strict=True):
            if names:
                run_shape(*shape, bandwidth, device, names, row, save)
                if device == "cuda":
                    torch.cuda.empty_cache()  # the 8192 x 128256 fp32 inputs are 4.2 GB each
                print(json.dumps(row), flush=True)
    watchdog.cancel()
    save()
    report = write_report(args.out, rows, bandwidth, device)
    print(
        f"\n{report['device']}, torch {report['torch']}, triton {report['triton']}, "
        f"{time.perf_counter() - started:.0f} s"
    )
    print(report["table"])
    bad = failures(rows)
    if bad:
        print("FAILED checks:\n" + "\n".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
