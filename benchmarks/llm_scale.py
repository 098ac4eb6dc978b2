"""LLM scale on one GPU: top eigenpairs, trace and spectral density of a ~1B Llama-style LM.

Runs every phase of issue 10 in one process and prints one table (time, matvecs, peak memory per
phase), with the seed library (hessian-eigenthings) measured in the same run when installed.

    python benchmarks/llm_scale.py --out results/          # the 0.95B model on one GPU
    python benchmarks/llm_scale.py --smoke                 # a tiny model, CPU is fine
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from torch_linop import GGNOperator, HessianOperator
from torch_linop.losses.language_models import hf_lm_loss
from torch_linop.planning import LLAMA_SIZES, Plan, plan
from torch_linop.solvers import lanczos, spectral_density, trace
from torch_linop.solvers._memory import device_budget
from torch_linop.solvers.eigenpairs import _capacity

FULL = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=16,
    vocab_size=32000,
)
# bf16 products carry ~1e-2 relative rounding noise, so true residuals cannot go far below it
BF16_TOL = 3e-2
BF16_MAX_MATVECS = 400
CHECKPOINT_SECONDS = 120.0  # solver checkpoints every two minutes (where they fit on the disk)
SMOKE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=97
)


def build_model(sizes: dict[str, int], dtype: torch.dtype, device: torch.device, seed: int):
    """A Llama-style causal LM from its config, random weights (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**sizes, max_position_embeddings=1024)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def make_batches(vocab: int, batch: int, seq: int, device: torch.device, seed: int):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    return [{"input_ids": tokens.to(device)}]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def gradient_fn(model, batches, loss):
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> None:
        value = loss(model, batches[0])
        torch.autograd.grad(value, params)

    return run


class Phases:
    """Collects one row per phase: seconds, matvecs, peak GiB above the model, notes.

    After every phase the rows are written to ``results_path`` (the run's phase-level
    checkpoint): a rerun with ``--resume`` keeps the finished phases and runs the rest.
    """

    def __init__(
        self, device: torch.device, model_gib: float, results_path: str | None, resume: bool
    ) -> None:
        self.device = device
        self.model_gib = model_gib
        self.results_path = results_path
        self.rows: list[dict[str, Any]] = []
        self.done: dict[str, dict[str, Any]] = {}
        if resume and results_path and os.path.exists(results_path):
            with open(results_path) as handle:
                saved = json.load(handle)["rows"]
            self.done = {row["phase"]: row for row in saved if "error" not in row}

    def save(self, extra: dict[str, Any]) -> None:
        if self.results_path:
            os.makedirs(os.path.dirname(self.results_path) or ".", exist_ok=True)
            with open(self.results_path, "w") as handle:
                json.dump({**extra, "rows": self.rows}, handle, indent=1, default=str)

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if name in self.done:
            print(f"{name}: kept from the previous run", flush=True)
            self.rows.append(self.done[name])
            return self.done[name]
        reset_peak(self.device)
        synchronize(self.device)
        start = time.perf_counter()
        try:
            info = fn()
        except Exception as error:  # a failed phase is reported, not hidden
            info = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            traceback.print_exc()
            error.__traceback__ = None  # drop frames that hold device tensors
        synchronize(self.device)
        row = {
            "phase": name,
            "seconds": time.perf_counter() - start,
            "peak_gib_above_model": peak_gib(self.device) - self.model_gib,
            **info,
        }
        self.rows.append(row)
        self.save({})
        print(json.dumps(row, default=str), flush=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return row


def eig_phase(op, k: int, tol: float, seed: int, checkpoint: str | None, **options: Any):
    """Top-k eigenpairs; the basis size is chosen by the solver from free device memory."""

    def run() -> dict[str, Any]:
        # the basis the solver will allocate, by its own rule (reported in the table)
        basis_dtype = options.get("basis_dtype", op.torch_dtype)
        basis = _capacity(op.shape[0], k, 1, None, device_budget(op.device), basis_dtype)
        result = lanczos(
            op,
            k=k,
            which="LA",
            tol=tol,
            seed=seed,
            progress=True,
            checkpoint=checkpoint,
            checkpoint_seconds=CHECKPOINT_SECONDS,
            **options,
        )
        relative = result.residuals / max(result.norm_estimate, 1e-30)  # ||Hv - lv|| / ||H||
        return {
            "matvecs": result.num_matvecs,
            "restarts": result.num_restarts,
            "converged": int(result.converged.sum()),
            "eigenvalues": [float(x) for x in result.eigenvalues],
            "max_relative_residual": float(relative.max()),
            "basis": basis,
        }

    return run


def seed_library_phase(model, batches, k: int, device: torch.device):
    """hessian-eigenthings' own lanczos on the same model and data (it may run out of memory)."""

    def run() -> dict[str, Any]:
        import hessian_eigenthings as he
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def loss_fn(model, batch):
            return hf_lm_loss()(model, batch)

        operator = he.HessianOperator(model, batches, loss_fn)
        vector = torch.randn(operator.size, device=device, dtype=next(model.parameters()).dtype)
        # its products need a double-backward attention path: the math SDPA backend (= eager)
        with sdpa_kernel([SDPBackend.MATH]):
            seconds = median_seconds(lambda: operator.matvec(vector), device, repeats=2)
            result = he.lanczos(operator, k=k, seed=0)
        return {
            "hvp_seconds": seconds,
            "eigenvalues": [float(x) for x in getattr(result, "eigenvalues", [])],
        }

    return run


def checkpoint_path(folder: str | None, phase: str) -> str | None:
    return None if folder is None else os.path.join(folder, phase.replace(" ", "_") + ".pt")


def matvec_row(op, vector, gradient_seconds: float, device: torch.device):
    def run() -> dict[str, Any]:
        seconds = median_seconds(lambda: op @ vector, device)
        return {"median_s": seconds, "x_gradient": seconds / gradient_seconds}

    return run


def predicted_gib(sizes: dict[str, int], batch: int, seq: int) -> dict[str, float]:
    """The planner's peak above the model (the vector and the product's workspace) for the
    uncached Hessian and GGN products of this run, in GiB (predicted on the meta device)."""
    from transformers import LlamaConfig

    config = LlamaConfig(**sizes, max_position_embeddings=1024)
    predictions = {}
    for curvature in ("hessian", "ggn"):
        predicted = plan(
            config,
            curvature=curvature,
            dtype=torch.float32,
            seq_len=seq,
            micro_batch=batch,
            tokens_per_rank=batch * seq,
            device_memory=None,
            basis_device="cpu",
        )
        predictions[f"{curvature} matvec"] = (
            predicted.vector_bytes + predicted.workspace_bytes
        ) / 2**30
    return predictions


def plan_tables(seq_len: int, sequences_per_rank: int) -> None:
    """The planner's tables for Llama 1B-70B on 8 x 80 GB and 8 x 141 GB with 560 GB of host
    memory: as given, then with activation checkpointing and the basis on the host."""
    for title, options in (
        ("defaults (no activation checkpointing, fp32 basis on the GPUs)", {}),
        (
            "activation_checkpointing=True, basis_device='cpu'",
            dict(activation_checkpointing=True, basis_device="cpu"),
        ),
    ):
        print(f"\n{title}, seq_len {seq_len}, {sequences_per_rank} sequences per rank, bf16\n")
        print(Plan.header())
        for name in LLAMA_SIZES:
            for device_memory in (80 * 10**9, 141 * 10**9):
                for curvature in ("hessian", "ggn"):
                    result = plan(
                        name,
                        world_size=8,
                        device_memory=device_memory,
                        host_memory=560 * 10**9,
                        seq_len=seq_len,
                        tokens_per_rank=sequences_per_rank * seq_len,
                        curvature=curvature,
                        **options,
                    )
                    print("| " + " | ".join(result.row()) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny model (CPU is fine)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--trace-matvecs", type=int, default=99)
    parser.add_argument("--slq-steps", type=int, default=90)
    parser.add_argument("--skip", default="", help="comma-separated phases to skip")
    parser.add_argument("--out", default=None, help="folder for llm_scale.json")
    parser.add_argument(
        "--checkpoints", default=None, help="folder for solver checkpoints (not under --out)"
    )
    parser.add_argument("--resume", action="store_true", help="keep finished phases from --out")
    parser.add_argument(
        "--plan-table",
        action="store_true",
        help="print the planner's tables for Llama 1B-70B on 8 GPUs and exit",
    )
    args = parser.parse_args()
    if args.plan_table:
        plan_tables(seq_len=2048, sequences_per_rank=8)
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    sizes = SMOKE if args.smoke else FULL
    seq = 16 if args.smoke else args.seq
    skip = set(filter(None, args.skip.split(",")))
    if args.checkpoints:
        os.makedirs(args.checkpoints, exist_ok=True)

    model = build_model(sizes, torch.float32, device, seed=0)
    batches = make_batches(sizes["vocab_size"], args.batch, seq, device, seed=1)
    num_params = sum(p.numel() for p in model.parameters())
    model_gib = num_params * 4 / 2**30
    print(f"model: {num_params / 1e9:.3f}B parameters, {model_gib:.1f} GiB fp32; device {device}")
    predictions = predicted_gib(sizes, args.batch, seq)
    for name, gib in predictions.items():
        print(f"planner: {name} peak above the model {gib:.2f} GiB (predicted on meta)")
    results_path = os.path.join(args.out, "llm_scale.json") if args.out else None
    phases = Phases(device, model_gib, results_path, args.resume)
    loss = hf_lm_loss()
    # default SDPA attention stays as HuggingFace sets it; the operators switch to the math
    # backend only inside their products (SDPA's fused kernels have no double backward)
    hessian = HessianOperator(model, batches, loss)
    cached = HessianOperator(model, batches, loss, cache_graph=True)
    ggn = GGNOperator(model, batches, loss)
    ggn_cached = GGNOperator(model, batches, loss, cache_graph=True)
    vector = torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(2))
    vector = vector.to(device)

    gradient_seconds = median_seconds(gradient_fn(model, batches, loss), device)
    phases.run("gradient", lambda: {"median_s": gradient_seconds})
    phases.run("hessian matvec", matvec_row(hessian, vector, gradient_seconds, device))
    phases.run(
        "hessian matvec (cached graph)", matvec_row(cached, vector, gradient_seconds, device)
    )
    cached.clear_cache()  # its kept graph would count in the next rows' peaks
    phases.run("ggn matvec", matvec_row(ggn, vector, gradient_seconds, device))
    phases.run(
        "ggn matvec (cached graph)", matvec_row(ggn_cached, vector, gradient_seconds, device)
    )
    del vector
    cached.clear_cache()  # the eigen phases build them again and keep them while they run
    ggn_cached.clear_cache()
    ckpt = args.checkpoints
    if "hessian_eigs" not in skip:
        phases.run(
            "hessian top-10",
            eig_phase(cached, args.k, args.tol, 0, checkpoint_path(ckpt, "hessian top-10")),
        )
    if "ggn_eigs" not in skip:
        phases.run(
            "ggn top-10",
            eig_phase(ggn_cached, args.k, args.tol, 0, checkpoint_path(ckpt, "ggn top-10")),
        )
        ggn_cached.clear_cache()
    if "trace" not in skip:
        phases.run(
            "hutch++ trace",
            lambda: (
                lambda r: {
                    "estimate": r.estimate,
                    "stderr": r.stderr,
                    "matvecs": r.num_matvecs,
                }
            )(
                trace(
                    cached,
                    num_matvecs=args.trace_matvecs,
                    seed=0,
                    progress=True,
                    checkpoint=checkpoint_path(ckpt, "hutchpp"),
                    checkpoint_seconds=CHECKPOINT_SECONDS,
                )
            ),
        )
    if "slq" not in skip:
        phases.run(
            "slq density",
            lambda: (
                lambda r: {
                    "matvecs": args.slq_steps,
                    "support": [float(r.nodes.min()), float(r.nodes.max())],
                }
            )(
                spectral_density(
                    cached,
                    num_runs=1,
                    lanczos_steps=args.slq_steps,
                    seed=0,
                    progress=True,
                    checkpoint=checkpoint_path(ckpt, "slq"),
                    checkpoint_seconds=CHECKPOINT_SECONDS,
                )
            ),
        )
    cached.clear_cache()
    fp32_top = next((r for r in phases.rows if r["phase"] == "hessian top-10"), {})
    if "bf16" not in skip:
        del hessian, cached, ggn, ggn_cached
        model = model.to(torch.bfloat16)
        bf16_hessian = HessianOperator(model, batches, loss, cache_graph=True)
        phases.model_gib = num_params * 2 / 2**30
        # bf16 products (float32 accumulation inside matmuls and in the CE closed form), the
        # Lanczos basis and its arithmetic in float32: orthogonality is where precision matters
        row = phases.run(
            "bf16 hessian top-10",
            eig_phase(
                bf16_hessian,
                args.k,
                max(args.tol, BF16_TOL),
                0,
                checkpoint_path(ckpt, "bf16 top-10"),
                basis_dtype=torch.float32,
                max_matvecs=BF16_MAX_MATVECS,
            ),
        )
        if "eigenvalues" in row and "eigenvalues" in fp32_top:
            diffs = [
                abs(a - b) / max(abs(b), 1e-30)
                for a, b in zip(row["eigenvalues"], fp32_top["eigenvalues"])
            ]
            row["max_rel_diff_vs_fp32"] = max(diffs)
            print(f"bf16 vs fp32 top-{args.k}: max relative difference {max(diffs):.3g}")
        del bf16_hessian
        model = model.to(torch.float32)
    if "seed_library" not in skip:
        phases.run(
            "hessian-eigenthings lanczos", seed_library_phase(model, batches, args.k, device)
        )

    print()
    print(
        "| phase | seconds | matvecs | x gradient | peak GiB above model "
        "| planner's prediction | notes |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in phases.rows:
        notes = row.get("error") or (
            f"converged {row['converged']}/{args.k}, max rel residual "
            f"{row['max_relative_residual']:.2e}, restarts {row['restarts']}, "
            f"basis {row.get('basis', '?')}"
            if "converged" in row
            else ""
        )
        if "max_rel_diff_vs_fp32" in row:
            notes += f"; vs fp32 {row['max_rel_diff_vs_fp32']:.2e}"
        if "median_s" in row:
            notes += f"median {1e3 * row['median_s']:.0f} ms"
        if "estimate" in row:
            notes += f"estimate {row['estimate']:.4g} +- {row['stderr']:.2g}"
        if "support" in row:
            notes += f"nodes in [{row['support'][0]:.4g}, {row['support'][1]:.4g}]"
        if "hvp_seconds" in row:
            top = ", ".join(f"{x:.4g}" for x in row["eigenvalues"][:4])
            notes += f"its HVP {1e3 * row['hvp_seconds']:.0f} ms; its eigenvalues {top}, ..."
        if "eigenvalues" in row and "converged" in row:
            notes += "; top " + ", ".join(f"{x:.4g}" for x in row["eigenvalues"][:3])
        ratio = row.get("x_gradient")
        predicted = f"{predictions[row['phase']]:.1f}" if row["phase"] in predictions else ""
        print(
            f"| {row['phase']} | {row['seconds']:.1f} | {row.get('matvecs', '')} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} | "
            f"{row['peak_gib_above_model']:.1f} | {predicted} | {notes} |"
        )
    phases.save(
        {
            "params": num_params,
            "command": " ".join(sys.argv),
            "planner_predicted_gib_above_model": predictions,
        }
    )
    if not math.isfinite(gradient_seconds):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
