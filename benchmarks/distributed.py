"""Data-parallel and FSDP2-sharded curvature products on GPT-2 small, 1 vs 2 GPUs, in one run.

    PYTHONPATH=$PWD python benchmarks/distributed.py --out $OUT

launches ``torchrun --standalone --nproc-per-node N`` for N = 1 and 2 (this file in ``--worker``
mode), then writes ``distributed.json`` and a Markdown table ``distributed.md`` to ``--out``.

Strong scaling: the data set is fixed (``--sequences`` sequences of ``--seq-len`` tokens, from a
seeded CPU generator; nothing is downloaded) and split across the ranks, each rank iterating its
own batches of ``--batch`` sequences. Per operator it reports seconds per matvec (median of
``--reps`` after one warm-up that also counts the samples), tokens per second, the speed-up
over one GPU, and ``torch.cuda.max_memory_allocated`` per rank. Rows:

- data-parallel ``GGNOperator`` and ``HessianOperator`` (replicated parameters, one all-reduce
  per matvec) — exact products, the same matrix as one GPU on all the data;
- FSDP2 (``fully_shard`` per block and at the root) on sharded parameters and vectors:
  ``FSDPGGNOperator`` (exact forward-mode JVP, and the finite-difference JVP) and
  ``FSDPHessianOperator`` (exact reverse-over-forward ``method="autograd"``, and finite
  differences), each with ``sharded_lanczos`` for the top eigenvalue (``--lanczos-iterations``
  products);
- solvers: Hutch++ trace of the GGN (``--trace-matvecs`` products, seed 0), data-parallel
  ``trace`` against FSDP2 ``sharded_trace`` (the same probes: the estimates must agree), and one
  FSDP2 ``sharded_spectral_density`` run (``--slq-steps`` products).

Agreement columns: ``v^T A v`` for a fixed Gaussian ``v`` (seeded), so the 1- and 2-GPU runs and
the exact and FSDP operators can be compared without moving 124M-entry vectors around.
``--device cpu --tiny`` runs the same code on gloo with a 2-layer toy config, to check the
script on a machine without GPUs; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

GPUS = (1, 2)


# ----------------------------------------------------------------------------- problem
def _hide_broken_torchvision() -> None:
    """transformers imports torchvision when installed; a wheel built for another torch fails
    to import, so make it look absent (as tests/lm/conftest.py does)."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # type: ignore[assignment]


def build_model(tiny: bool, device: torch.device) -> torch.nn.Module:
    _hide_broken_torchvision()
    from transformers import GPT2Config, GPT2LMHeadModel

    if tiny:
        config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=64)
    else:
        config = GPT2Config()  # GPT-2 small: 12 layers, 768 wide, 50257 tokens, 124M parameters
    config.attn_pdrop = config.embd_pdrop = config.resid_pdrop = 0.0
    torch.manual_seed(0)  # the same initial weights on every rank
    model: Any = GPT2LMHeadModel(config)
    return model.to(device=device, dtype=torch.float32).eval()


def all_batches(args: argparse.Namespace, vocab: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (args.sequences, args.seq_len), generator=generator)
    return [{"input_ids": tokens[i : i + args.batch]} for i in range(0, args.sequences, args.batch)]


def my_batches(batches: list[Any], rank: int, world: int) -> list[Any]:
    """Contiguous equal shards (the sequence count is a multiple of world * batch)."""
    per_rank = len(batches) // world
    return batches[rank * per_rank : (rank + 1) * per_rank]


# ----------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def time_products(
    apply: Any, vector: torch.Tensor, reps: int, device: torch.device
) -> tuple[dict[str, Any], torch.Tensor]:
    """One warm-up product, then ``reps`` timed ones; the max over ranks of each rep's time."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    product = apply(vector)
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        product = apply(vector)
        synchronize(device)
        elapsed = torch.tensor(
            [time.perf_counter() - start], dtype=torch.float64, device=_comm(device)
        )
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"seconds": statistics.median(times), "all_seconds": times, "memory": memory}, product


def _comm(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_max(value: float, device: torch.device) -> list[float]:
    tensor = torch.tensor([value], dtype=torch.float64, device=_comm(device))
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return [float(t) for t in gathered]


# ----------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    from torch.distributed.fsdp import fully_shard

    from torch_linop import GGNOperator, HessianOperator
    from torch_linop.distributed import (
        FSDPGGNOperator,
        FSDPHessianOperator,
        sharded_lanczos,
        sharded_spectral_density,
        sharded_trace,
    )
    from torch_linop.losses.language_models import hf_lm_loss
    from torch_linop.solvers import trace

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=5))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()

    model: Any = build_model(args.tiny, device)
    batches = my_batches(all_batches(args, model.config.vocab_size), rank, world)
    tokens = args.sequences * args.seq_len
    loss = hf_lm_loss()
    size = sum(p.numel() for p in model.parameters())
    probe = torch.randn(size, generator=torch.Generator().manual_seed(2)).to(device)
    rows: list[dict[str, Any]] = []

    def record(kind: str, name: str, timing: dict, quadratic: float | None, extra: dict) -> None:
        memories = gather_max(float(timing["memory"]), device)
        rows.append(
            {
                "kind": kind,
                "operator": name,
                "gpus": world,
                "seconds_per_matvec": timing["seconds"],
                "all_seconds": timing["all_seconds"],
                "tokens_per_second": tokens / timing["seconds"],
                "max_memory_gib_per_rank": [m / 2**30 for m in memories],
                "vTAv": quadratic,
                **extra,
            }
        )

    def timed(solver: Any, *solver_args: Any, **options: Any) -> tuple[Any, float]:
        synchronize(device)
        start = time.perf_counter()
        result = solver(*solver_args, **options)
        synchronize(device)
        return result, time.perf_counter() - start

    solver_rows: list[dict[str, Any]] = []

    def trace_row(kind: str, name: str, estimate: Any, seconds: float) -> None:
        solver_rows.append(
            {"solver": "trace (Hutch++)", "kind": kind, "operator": name, "gpus": world,
             "seconds": seconds, "matvecs": estimate.num_matvecs, "estimate": estimate.estimate,
             "stderr": estimate.stderr}
        )  # fmt: skip

    # data parallel: replicated parameters, one all-reduce per matvec
    for name, op in (
        ()
        if "dp" not in args.parts.split(",")
        else (
            ("GGN", GGNOperator(model, batches, loss)),
            ("Hessian", HessianOperator(model, batches, loss)),
        )
    ):
        timing, product = time_products(op.apply, probe, args.reps, device)
        record("data-parallel", name, timing, float(probe @ product), {})
        if name == "GGN":
            trace_row("data-parallel", name, *timed(trace, op, args.trace_matvecs, seed=0))
        del op, product
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # FSDP2: parameters and vectors sharded
    fsdp_operators: tuple[tuple[str, Any], ...] = ()
    if "fsdp" in args.parts.split(","):
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        fsdp_operators = (
            ("GGN", lambda: FSDPGGNOperator(model, batches, loss)),
            (
                "GGN (FD JVP)",
                lambda: FSDPGGNOperator(model, batches, loss, jvp_method="finite_difference"),
            ),
            ("Hessian", lambda: FSDPHessianOperator(model, batches, loss, method="autograd")),
            ("Hessian (FD)", lambda: FSDPHessianOperator(model, batches, loss)),
        )
    for name, build in fsdp_operators:
        op = build()
        local_probe = op.shard_vector(probe)
        timing, product = time_products(op.apply, local_probe, args.reps, device)
        quadratic = float(op.dot(local_probe[:, None], product[:, None]))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        # sharded_lanczos is lanczos: a budget of products, Ritz residual estimates
        eig = sharded_lanczos(
            op,
            1,
            which="LA",
            max_matvecs=args.lanczos_iterations,
            return_eigenvectors=False,
            seed=0,
        )
        lanczos_seconds = time.perf_counter() - start
        lanczos_memory = gather_max(
            float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0.0,
            device,
        )
        extra = {
            "local_vector_entries_per_rank": gather_max(float(op.local_size), device),
            "top_eigenvalue": float(eig.eigenvalues[0]),
            "top_residual_estimate": float(eig.residuals[0]),
            "lanczos_matvecs": eig.num_matvecs,
            "lanczos_seconds": lanczos_seconds,
            "lanczos_max_memory_gib_per_rank": [m / 2**30 for m in lanczos_memory],
        }
        record("fsdp2", name, timing, quadratic, extra)
        if name == "GGN":
            trace_row("fsdp2", name, *timed(sharded_trace, op, args.trace_matvecs, seed=0))
            density, seconds = timed(
                sharded_spectral_density, op, num_runs=1, lanczos_steps=args.slq_steps, seed=0
            )
            solver_rows.append(
                {"solver": "SLQ density", "kind": "fsdp2", "operator": name, "gpus": world,
                 "seconds": seconds, "matvecs": density.num_matvecs,
                 "estimate": float(density.nodes.max()), "stderr": None}
            )  # fmt: skip
        del op, product
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if rank == 0:
        meta = {
            "gpus": world,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "parameters": size,
            "tokens": tokens,
            "batch": args.batch,
            "seq_len": args.seq_len,
        }
        Path(args.result).write_text(
            json.dumps({"meta": meta, "rows": rows, "solvers": solver_rows}, indent=2)
        )
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- launcher
def launch(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for gpus in GPUS:
        result = out / f"distributed_{gpus}.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={gpus}", __file__, "--worker", "--result", str(result),
            "--device", args.device, "--sequences", str(args.sequences),
            "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--reps", str(args.reps),
            "--lanczos-iterations", str(args.lanczos_iterations),
            "--trace-matvecs", str(args.trace_matvecs), "--slq-steps", str(args.slq_steps),
            "--parts", args.parts,
        ] + (["--tiny"] if args.tiny else [])  # fmt: skip
        print("running:", " ".join(command), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True)
        print(f"  {gpus} GPU(s) done in {time.perf_counter() - started:.1f} s", flush=True)
        runs[gpus] = json.loads(result.read_text())
    summary = summarize(runs)
    (out / "distributed.json").write_text(json.dumps(summary, indent=2))
    (out / "distributed.md").write_text(markdown(summary))
    print(markdown(summary))


def summarize(runs: dict[int, dict]) -> dict:
    baseline = {(r["kind"], r["operator"]): r for r in runs[1]["rows"]}
    rows = []
    for gpus in GPUS:
        for row in runs[gpus]["rows"]:
            base = baseline[(row["kind"], row["operator"])]
            row = dict(row)
            row["speedup_vs_1_gpu"] = base["seconds_per_matvec"] / row["seconds_per_matvec"]
            if row["vTAv"] is not None and base["vTAv"]:
                row["vTAv_rel_diff_vs_1_gpu"] = abs(row["vTAv"] - base["vTAv"]) / abs(base["vTAv"])
            # none in a --parts fsdp run: no "vs exact" column then
            exact = next(
                (r for r in runs[gpus]["rows"]
                 if r["kind"] == "data-parallel" and r["operator"] == row["operator"].split()[0]),
                None,
            )  # fmt: skip
            if exact is not None and exact["vTAv"]:
                row["vTAv_rel_diff_vs_exact"] = abs(row["vTAv"] - exact["vTAv"]) / abs(
                    exact["vTAv"]
                )
            rows.append(row)
    solvers = []
    single = {(r["solver"], r["kind"]): r for r in runs[1]["solvers"]}
    for gpus in GPUS:
        for row in runs[gpus]["solvers"]:
            row = dict(row)
            base = single[(row["solver"], row["kind"])]
            row["speedup_vs_1_gpu"] = base["seconds"] / row["seconds"]
            row["estimate_rel_diff_vs_1_gpu"] = abs(row["estimate"] - base["estimate"]) / abs(
                base["estimate"]
            )
            solvers.append(row)
    return {"meta": {g: runs[g]["meta"] for g in GPUS}, "rows": rows, "solvers": solvers}


def markdown(summary: dict) -> str:
    meta = summary["meta"][1]
    lines = [
        f"GPT-2 ({meta['parameters'] / 1e6:.1f}M parameters), {meta['tokens']} tokens "
        f"({meta['batch']} x {meta['seq_len']} per batch), float32, TF32 off, {meta['device']}, "
        f"torch {meta['torch']}. Seconds per matvec: median over the timed reps, max over ranks.",
        "",
        "| kind | operator | GPUs | s / matvec | tokens / s | speed-up | max mem / rank (GiB) "
        "| vTAv rel. diff vs 1 GPU | vs exact |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in summary["rows"]:
        memory = ", ".join(f"{m:.2f}" for m in row["max_memory_gib_per_rank"])
        lines.append(
            f"| {row['kind']} | {row['operator']} | {row['gpus']} "
            f"| {row['seconds_per_matvec']:.4f} | {row['tokens_per_second']:.0f} "
            f"| {row['speedup_vs_1_gpu']:.2f}x | {memory} "
            f"| {row.get('vTAv_rel_diff_vs_1_gpu', float('nan')):.1e} "
            f"| {row.get('vTAv_rel_diff_vs_exact', float('nan')):.1e} |"
        )
    lines += ["", "| FSDP2 operator | GPUs | top eigenvalue | residual est. | Lanczos matvecs "
              "| Lanczos s | max mem / rank (GiB) | vector entries / rank |",
              "|---|---:|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for row in summary["rows"]:
        if row["kind"] != "fsdp2":
            continue
        memory = ", ".join(f"{m:.2f}" for m in row["lanczos_max_memory_gib_per_rank"])
        entries = ", ".join(f"{int(e)}" for e in row["local_vector_entries_per_rank"])
        lines.append(
            f"| {row['operator']} | {row['gpus']} | {row['top_eigenvalue']:.6g} "
            f"| {row['top_residual_estimate']:.1e} | {row['lanczos_matvecs']} "
            f"| {row['lanczos_seconds']:.1f} | {memory} | {entries} |"
        )
    lines += ["", "Solvers on the GGN (seed 0: data-parallel `trace` and FSDP2 `sharded_trace` use "
              "the same probes; SLQ: the largest node of one run).", "",
              "| solver | kind | GPUs | matvecs | s | speed-up | estimate | rel. diff vs 1 GPU |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in summary["solvers"]:
        lines.append(
            f"| {row['solver']} | {row['kind']} | {row['gpus']} | {row['matvecs']} "
            f"| {row['seconds']:.2f} | {row['speedup_vs_1_gpu']:.2f}x | {row['estimate']:.8g} "
            f"| {row['estimate_rel_diff_vs_1_gpu']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".bench_out/distributed")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy GPT-2 config (script check)")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--lanczos-iterations", type=int, default=8)
    parser.add_argument("--trace-matvecs", type=int, default=12)
    parser.add_argument("--slq-steps", type=int, default=10)
    parser.add_argument(
        "--parts",
        default="dp,fsdp",
        help="dp (data-parallel products and trace), fsdp (FSDP2 products and solvers), or both",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sequences % (max(GPUS) * args.batch):
        parser.error(f"--sequences must be a multiple of {max(GPUS)} x --batch")
    if args.worker:
        worker(args)
    else:
        launch(args)


if __name__ == "__main__":
    main()
