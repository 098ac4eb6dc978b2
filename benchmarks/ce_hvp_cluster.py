"""Sweep of the Hopper cluster kernel's launch configs at the issue's shapes, in one run.

    PYTHONPATH=$PWD python benchmarks/ce_hvp_cluster.py --out $OUT     # an sm_90 GPU

For each shape: the copy-bandwidth floor, the two-pass Triton kernel (the cluster kernel
switched off), and the cluster kernel at every (cluster size, threads per CTA) candidate with all
resident clusters, plus, with ``--grids``, fewer clusters than resident. Every config's output is
first checked against a float64 reference on a few rows (NaN-poisoned, fully written). Prints a
table of % of the floor; writes ``ce_hvp_cluster.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

SHAPES = [
    (16384, 50304, torch.float32),
    (16384, 50304, torch.bfloat16),
    (8192, 128256, torch.bfloat16),
    (8192, 128256, torch.float32),
]
THREADS = (256, 512, 1024)


def check(kernel, logits, u, config) -> float:
    """Relative error of the config's output on the first rows against float64."""
    from torch_linop.kernels import ce_hvp

    rows = logits[:, :16]
    out = torch.full_like(rows, float("nan"))
    kernel.launch(rows, u[:, :16], None, out, ignore_index=-100, shift=False, scale=1 / 16,
                  config=config)  # fmt: skip
    if not torch.isfinite(out).all():
        return float("nan")
    expected = ce_hvp(rows.double(), u[:, :16].double(), backend="eager")
    return float((out.double() - expected).norm() / expected.norm())


def sweep(num_rows: int, vocab: int, dtype: torch.dtype, bandwidth: float, grids: bool) -> dict:
    from ce_hvp import bench_ms  # sibling script: the same timing as the main ce_hvp benchmark

    from torch_linop.kernels import _ce_hvp_cluster as kernel
    from torch_linop.kernels import ce_hvp
    from torch_linop.kernels._ce_hvp_registry import CLUSTER_ENV

    generator = torch.Generator(device="cuda").manual_seed(vocab)
    logits = (3 * torch.randn(1, num_rows, vocab, device="cuda", generator=generator)).to(dtype)
    u = torch.randn(1, num_rows, vocab, device="cuda", generator=generator).to(dtype)
    out = torch.empty_like(logits)
    floor_ms = 3 * logits.numel() * logits.element_size() / bandwidth * 1e3
    os.environ[CLUSTER_ENV] = "0"
    try:
        two_pass_ms = bench_ms(lambda: ce_hvp(logits, u, backend="triton", out=out))
    finally:
        del os.environ[CLUSTER_ENV]
    row: dict = {"rows": num_rows, "vocab": vocab, "dtype": str(dtype).removeprefix("torch."),
                 "floor_ms": floor_ms, "two_pass_pct": 100 * floor_ms / two_pass_ms,
                 "configs": []}  # fmt: skip
    for cluster in kernel.candidate_clusters(vocab, logits.element_size()):
        seg_vecs = kernel.segment_vectors(vocab, logits.element_size(), cluster)
        for threads in THREADS:
            config = (cluster, threads)
            resident = kernel._launcher(dtype, cluster, seg_vecs, logits.device, threads).resident
            counts = [resident]
            if grids:
                fewer = {resident - 2, resident * 3 // 4, resident // 2}
                counts += sorted((c for c in fewer if 0 < c < resident), reverse=True)
            error = check(kernel, logits, u, config)
            for count in counts:

                def run(count: int = count, config: tuple = config) -> None:
                    kernel.launch(logits, u, None, out, ignore_index=-100, shift=False,
                                  scale=1 / num_rows, config=config, num_clusters=count)  # fmt: skip

                ms = bench_ms(run)
                row["configs"].append(
                    {
                        "cluster": cluster,
                        "threads": threads,
                        "clusters": count,
                        "resident": resident,
                        "ms": ms,
                        "pct": 100 * floor_ms / ms,
                        "check_rel_err": error,
                    }  # fmt: skip
                )
    return row


def table(rows: list[dict]) -> str:
    lines = ["| N | V | dtype | two-pass % | cluster x threads (clusters/resident): % of floor |",
             "|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        cells = ", ".join(
            f"{c['cluster']}x{c['threads']} ({c['clusters']}/{c['resident']}): {c['pct']:.1f}"
            for c in row["configs"]
        )
        lines.append(f"| {row['rows']} | {row['vocab']} | {row['dtype']} | "
                     f"{row['two_pass_pct']:.1f} | {cells} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".bench_out"), help="JSON folder")
    parser.add_argument("--grids", action="store_true", help="also fewer clusters than resident")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        print("benchmarks/ce_hvp_cluster.py needs an sm_90 (Hopper) GPU", file=sys.stderr)
        return 2
    from ce_hvp import copy_bandwidth  # sibling script (benchmarks/ is on sys.path when run)

    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.3f} TB/s")
    rows = []
    for shape in SHAPES:
        rows.append(sweep(*shape, bandwidth, args.grids))
        torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        report = {"device": torch.cuda.get_device_name(), "bandwidth": bandwidth, "rows": rows}
        (args.out / "ce_hvp_cluster.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
