"""GGN and Hessian products on GPT-2 small (from its config, random weights) as multiples of one
gradient, exact vs finite-difference JVP, and the fused-LM-head GGN at vocabulary 128,256.

    python benchmarks/lm_ggn.py --out results/        # on a GPU (the issue's shapes)
    python benchmarks/lm_ggn.py --smoke               # tiny sizes, CPU is fine
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from torch_linop import GGNOperator, HessianOperator, ProductOptions, hf_lm_loss


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], Any], device: torch.device, repeats: int
) -> tuple[float, float, float]:
    """Median seconds, peak GiB allocated during the timed calls above what was allocated
    before them, and GiB kept between calls (a cached graph: allocated after the warm-up call
    minus before it)."""
    synchronize(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    fn()
    synchronize(device)
    kept = 0.0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        kept = (base - before) / 2**30
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = (
        (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else 0.0
    )
    return sorted(times)[len(times) // 2], peak, kept


def gpt2(vocab: int, layers: int, width: int, heads: int, positions: int, device, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_layer=layers, n_embd=width, n_head=heads, n_positions=positions
    )
    with torch.device(device):
        model = GPT2LMHeadModel(config)
    return model.eval()


def tokens(
    vocab: int, batch: int, seq: int, device, seed: int = 1
) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch, seq), generator=generator).to(device)}]


def gradient_runner(model, batches, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return lambda: torch.autograd.grad(loss(model, batches[0]), params)


def ratio_table(device, sizes, shapes, repeats) -> list[dict[str, Any]]:
    rows = []
    model = gpt2(**sizes, device=device)
    for batch, seq in shapes:
        data = tokens(sizes["vocab"], batch, seq, device)
        loss = hf_lm_loss()
        grad_s, grad_peak, _ = measure(gradient_runner(model, data, loss), device, repeats)
        graph_free = GGNOperator(model, data, loss)
        graph_free._sandwich.jvp.forward_mode.record_output_in_dual_forward = False
        ops = {
            "GGN exact (fwd JVP + fused CE + VJP)": GGNOperator(model, data, loss),
            "GGN exact, graph-free JVP + plain forward": graph_free,
            "GGN exact, cached graph": GGNOperator(model, data, loss, cache_graph=True),
            "GGN finite-difference JVP": GGNOperator(
                model, data, loss, jvp_method="finite_difference"
            ),
            "GGN one-sided difference JVP": GGNOperator(
                model, data, loss, jvp_method="forward_difference"
            ),
            "GGN one-sided difference JVP, cached graph": GGNOperator(
                model, data, loss, jvp_method="forward_difference", cache_graph=True
            ),
            "Hessian (double backward)": HessianOperator(model, data, loss),
            "Hessian (double backward, cached graph)": HessianOperator(
                model, data, loss, cache_graph=True
            ),
            "Hessian (finite differences)": HessianOperator(
                model, data, loss, method="finite_difference"
            ),
        }
        if device.type == "cuda":  # one-column products replayed from a CUDA graph
            ops["GGN exact, cached graph, CUDA graph"] = GGNOperator(
                model, data, loss, cache_graph=True, options=ProductOptions(cuda_graph=True)
            )
            ops["Hessian (cached graph, CUDA graph)"] = HessianOperator(
                model, data, loss, cache_graph=True, options=ProductOptions(cuda_graph=True)
            )
        vector = torch.randn(ops["Hessian (double backward)"].shape[0], device=device)
        reference = {}
        for name, op in ops.items():
            seconds, peak, kept = measure(lambda op=op, vector=vector: op @ vector, device, repeats)
            product = op @ vector
            family = name.split()[0]
            error = None
            if family in reference:
                exact = reference[family]
                error = float((product - exact).norm() / exact.norm())
            else:
                reference[family] = product
            rows.append(
                {
                    "shape": f"{batch}x{seq}",
                    "product": name,
                    "ms": seconds * 1e3,
                    "x_gradient": seconds / grad_s,
                    "peak_gib": peak,
                    "kept_gib": kept,
                    "gradient_peak_gib": grad_peak,
                    "rel_error_vs_exact": error,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            if hasattr(op, "clear_cache"):
                op.clear_cache()  # the next rows' memory is measured without this graph
        del ops, reference, graph_free
    return rows


def fused_head_rows(
    device, sizes, batch, seq, repeats, micro_batches: int = 1
) -> list[dict[str, Any]]:
    """GGN matvec with the LM head fused into the CE Hessian: the (N, V) logits never exist.

    With ``micro_batches > 1`` the batch's sequences go through the operator's data loop in that
    many equal parts (each weighted by its token count): the same product over all the tokens,
    with the model's activations of one part alive at a time."""
    rows = []
    model = gpt2(**sizes, device=device)
    (whole,) = tokens(sizes["vocab"], batch, seq, device)
    data = [{"input_ids": part} for part in whole["input_ids"].chunk(micro_batches)]
    for name, loss in (
        ("fused head", hf_lm_loss(fused_head=True)),
        ("plain (logits materialised)", hf_lm_loss()),
    ):
        op = GGNOperator(model, data, loss)
        vector = torch.randn(op.shape[0], device=device)
        try:
            seconds, peak, kept = measure(lambda op=op, vector=vector: op @ vector, device, repeats)
            row = {"product": name, "ms": seconds * 1e3, "peak_gib": peak}
        except torch.OutOfMemoryError as error:
            row = {"product": name, "error": f"OutOfMemoryError: {str(error)[:160]}"}
        row.update(tokens=batch * seq, vocab=sizes["vocab"], micro_batches=len(data))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del op
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-fused-head", action="store_true")
    parser.add_argument("--skip-ratios", action="store_true")
    parser.add_argument("--head-shape", default="256x256", help="BATCHxSEQ of the fused-head run")
    parser.add_argument(
        "--head-micro-batches", type=int, default=1, help="parts the fused-head batch is split in"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.smoke:
        small = dict(vocab=211, layers=2, width=32, heads=4, positions=64)
        ratios = ratio_table(device, small, [(2, 16)], 2)
        head = fused_head_rows(device, dict(small, vocab=1000), 4, 32, 2)
    else:
        small = dict(vocab=50257, layers=12, width=768, heads=12, positions=1024)
        ratios = (
            []
            if args.skip_ratios
            else ratio_table(device, small, [(8, 256), (8, 512)], args.repeats)
        )
        head = []
        if not args.skip_fused_head:
            big_vocab = dict(small, vocab=128256)
            head_batch, head_seq = (int(x) for x in args.head_shape.split("x"))
            head = fused_head_rows(
                device, big_vocab, head_batch, head_seq, 2, args.head_micro_batches
            )
    print()
    print(
        "| tokens | product | ms | x gradient | peak GiB (gradient) | kept GiB "
        "| rel. error vs exact |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in ratios:
        error = "" if row["rel_error_vs_exact"] is None else f"{row['rel_error_vs_exact']:.1e}"
        print(
            f"| {row['shape']} | {row['product']} | {row['ms']:.1f} | {row['x_gradient']:.2f} | "
            f"{row['peak_gib']:.2f} ({row['gradient_peak_gib']:.2f}) | {row['kept_gib']:.2f} "
            f"| {error} |"
        )
    if head:
        print()
        print("| tokens | micro-batches | vocab | GGN matvec | ms | peak GiB above model |")
        print("|---|---|---|---|---|---|")
        for row in head:
            result = row.get("error") or f"{row['ms']:.0f} | {row['peak_gib']:.1f}"
            print(
                f"| {row['tokens']} | {row['micro_batches']} | {row['vocab']} | "
                f"{row['product']} | {result} |"
            )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "lm_ggn.json"), "w") as handle:
            json.dump({"ratios": ratios, "fused_head": head}, handle, indent=1)


if __name__ == "__main__":
    main()
