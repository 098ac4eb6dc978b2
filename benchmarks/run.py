"""Command line of the benchmark harness: run one suite, print its markdown tables, and write
them with a JSON file of every measurement (and the machine, versions and command) under
``--out``.

    python -m benchmarks matvec [--device cpu|cuda] [--dtype float32|float64] [--smoke]
                                [--out DIR] [--models mlp,cnn,gpt] [--peers ours,curvlinops]

Numbers from different runs, let alone machines, are never mixed: each file is one run.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks.suites import SUITE_NAMES, RunConfig
from benchmarks.suites._report import SuiteResult

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DISTRIBUTIONS = {
    "torch-linop": "torch-linop",
    "torch": "torch",
    "numpy": "numpy",
    "scipy": "scipy",
    "transformers": "transformers",
    "triton": "triton",
    "curvlinops": "curvlinops-for-pytorch",
    "hessian-eigenthings": "hessian-eigenthings",
    "pyhessian": "pyhessian",
    "backpack": "backpack-for-pytorch",
}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="torch-linop against the libraries users would pick instead.",
    )
    parser.add_argument("suite", choices=SUITE_NAMES)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: per suite")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument(
        "--out",
        default=".bench_out",
        help="folder for .md and .json (default: .bench_out, untracked)",
    )
    parser.add_argument("--models", help="comma-separated subset of mlp,cnn,gpt,mlp-small")
    parser.add_argument(
        "--peers",
        help="comma-separated subset of ours,autograd,curvlinops,hessian_eigenthings,"
        "pyhessian,backpack (ours is always included)",
    )
    parser.add_argument("--repeats", type=int, help="timed repeats (default: per suite)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, help="override every model's batch size")
    parser.add_argument("--seq-len", type=int, help="override the transformer's sequence length")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    return parser.parse_known_args(argv)


def make_config(args: argparse.Namespace, extra: list[str]) -> RunConfig:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {args.device!r}")
    if extra and args.suite != "kernel":
        raise SystemExit(f"unknown arguments for suite {args.suite}: {' '.join(extra)}")
    peers = None
    if args.peers:
        peers = [name.strip() for name in args.peers.split(",") if name.strip()]
        if "ours" in peers:
            peers.remove("ours")
        peers.insert(0, "ours")
    models = [name.strip() for name in args.models.split(",")] if args.models else None
    return RunConfig(
        suite=args.suite,
        device=device,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        smoke=args.smoke,
        out=Path(args.out),
        models=models,
        peers=peers,
        repeats=args.repeats,
        seed=args.seed,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        extra_args=list(extra),
    )


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+uncommitted" if dirty else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(config: RunConfig, argv: list[str]) -> dict[str, Any]:
    """Where, when and with what this run happened."""
    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks " + " ".join(shlex.quote(arg) for arg in argv),
        "git": _git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": config.device.type,
        "versions": {name: _version(dist) for name, dist in DISTRIBUTIONS.items()},
        "tf32": {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        },
    }
    if config.device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(config.device)
        meta["cuda"] = torch.version.cuda
    return meta


def _header(suite: str, meta: dict[str, Any]) -> str:
    versions = ", ".join(f"{name} {v}" for name, v in meta["versions"].items() if v)
    where = meta.get("gpu") or meta["cpu"]
    load = meta.get("load_average_at_start")
    load_text = f"; load average at start {load[0]:.1f}" if load else ""
    return "\n".join(
        [
            f"## `{suite}` — {meta['date']}",
            "",
            f"- command: `{meta['command']}`",
            f"- machine: {where} ({meta['device']}; {meta['cpu_count']} CPUs, "
            f"{meta['torch_threads']} torch threads{load_text})",
            f"- versions: python {meta['python']}, {versions}; git {meta['git']}",
        ]
    )


def render(result: SuiteResult, meta: dict[str, Any]) -> str:
    parts = [_header(result.suite, meta)]
    if result.settings:
        settings = ", ".join(f"{key}={value}" for key, value in result.settings.items())
        parts.append(f"- settings: {settings}")
    parts.extend(f"- {note}" for note in result.notes)
    parts.extend(table.markdown() for table in result.tables)
    parts.extend(result.sections)
    return "\n\n".join(parts) + "\n"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write(result: SuiteResult, meta: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``<suite>-<device>-<time>.md`` and ``.json`` under ``out``; return both paths."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = out / f"{result.suite}-{meta['device']}-{stamp}"
    markdown_path, json_path = stem.with_suffix(".md"), stem.with_suffix(".json")
    markdown_path.write_text(render(result, meta))
    payload = {
        "suite": result.suite,
        "meta": meta,
        "settings": result.settings,
        "notes": result.notes,
        "tables": [
            {"title": t.title, "columns": t.columns, "rows": t.rows, "notes": t.notes}
            for t in result.tables
        ],
        "sections": result.sections,
        "records": result.records,
    }
    json_path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    return markdown_path, json_path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse_args(argv)
    config = make_config(args, extra)
    threads = torch.get_num_threads()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if args.threads:
        torch.set_num_threads(args.threads)
    # exact float32 products on GPUs: TF32 would cost ~3 digits in every comparison
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    meta = environment(config, argv)
    suite = importlib.import_module(f"benchmarks.suites.{config.suite}")
    started = time.perf_counter()
    try:
        result: SuiteResult = suite.run(config)
    finally:
        gc.unfreeze()  # suites freeze the heap to keep collections cheap; let exit clean up
        torch.set_num_threads(threads)  # leave an in-process caller (tests) as it was
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    meta["wall_seconds"] = round(time.perf_counter() - started, 1)
    markdown_path, json_path = write(result, meta, config.out)
    print(render(result, meta))
    print(f"wrote {markdown_path} and {json_path} ({meta['wall_seconds']} s)")
    return 0
