"""Can a curvature product be captured in a CUDA graph, and what does replaying it save?

    python benchmarks/cuda_graph_products.py --out results/      # on a GPU

On GPT-2 small (from its config) at 8x256 and 8x512 tokens: a gradient, the cached-graph GGN
product (exact and one-sided difference JVP) and the cached-graph Hessian product, each timed
eagerly and, where capture works, as a replayed ``torch.cuda.CUDAGraph`` (the vector copied into a
static input first). A replay is checked against the eager product. An experiment: the library
does not capture graphs; this script measures whether it should.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

import torch
from lm_ggn import gpt2, measure, tokens  # sibling script: same models, data and timing

from torch_linop import GGNOperator, HessianOperator, hf_lm_loss

GPT2_SMALL = dict(vocab=50257, layers=12, width=768, heads=12, positions=1024)


def captured(fn: Callable[[], Any], attempts: int = 2) -> Callable[[], Any]:
    """``fn`` captured in a CUDA graph after warm-up calls, on the warm-up stream (so that
    per-stream library handles exist before the capture); a failed capture is tried again
    once (the first capture of a process met one-time initialisation); returns replay."""
    stream = torch.cuda.Stream()
    for attempt in range(attempts):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream):
                fn()
            return graph.replay
        except Exception:
            if attempt == attempts - 1:
                raise
            torch.cuda.synchronize()
    raise AssertionError("unreachable")


def rows_for(model, data, repeats: int) -> list[dict[str, Any]]:
    device = next(model.parameters()).device
    loss = hf_lm_loss()
    params = [p for p in model.parameters() if p.requires_grad]
    shape = "x".join(str(s) for s in data[0]["input_ids"].shape)
    rows: list[dict[str, Any]] = []

    def gradient() -> Any:
        return torch.autograd.grad(loss(model, data[0]), params)

    grad_s = measure(gradient, device, repeats)[0]
    try:
        replay = captured(gradient)
        graph_grad_s: float | None = measure(replay, device, repeats)[0]
        error = ""
    except Exception as exc:  # capture is an experiment: record why it failed
        graph_grad_s, error = None, f"{type(exc).__name__}: {str(exc)[:300]}"
    rows.append(
        {"shape": shape, "product": "gradient", "eager_ms": grad_s * 1e3,
         "graph_ms": None if graph_grad_s is None else graph_grad_s * 1e3, "error": error}
    )  # fmt: skip
    print(json.dumps(rows[-1]), flush=True)
    operators = {
        "GGN exact, cached graph": GGNOperator(model, data, loss, cache_graph=True),
        "GGN one-sided difference, cached graph": GGNOperator(
            model, data, loss, jvp_method="forward_difference", cache_graph=True
        ),
        "Hessian, cached graph": HessianOperator(model, data, loss, cache_graph=True),
    }
    generator = torch.Generator().manual_seed(0)
    for name, op in operators.items():
        vector = torch.randn(op.shape[0], 1, generator=generator).to(device)
        static = vector.clone()
        eager_s = measure(lambda op=op, static=static: op._apply(static), device, repeats)[0]
        row: dict[str, Any] = {"shape": shape, "product": name, "eager_ms": eager_s * 1e3}
        try:
            out: list[torch.Tensor] = []
            replay = captured(lambda op=op, s=static, out=out: out.append(op._apply(s)))
            row["graph_ms"] = measure(replay, device, repeats)[0] * 1e3
            fresh = torch.randn(op.shape[0], 1, generator=generator).to(device)
            static.copy_(fresh)
            replay()
            expected = op._apply(fresh)
            row["replay_rel_error"] = float((out[-1] - expected).norm() / expected.norm())
            row["error"] = ""
        except Exception as exc:
            row["graph_ms"], row["error"] = None, f"{type(exc).__name__}: {str(exc)[:300]}"
        row["x_gradient_eager"] = eager_s / grad_s
        if row["graph_ms"] is not None:
            row["x_gradient_graph_vs_eager_gradient"] = row["graph_ms"] / (grad_s * 1e3)
            if graph_grad_s is not None:
                row["x_gradient_both_graphed"] = row["graph_ms"] / (graph_grad_s * 1e3)
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
        op.clear_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="8x256,8x512")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("CUDA graphs need a CUDA device")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    model = gpt2(**GPT2_SMALL, device=device)
    rows = []
    for shape in args.shapes.split(","):
        batch, seq = (int(x) for x in shape.split("x"))
        rows += rows_for(model, tokens(GPT2_SMALL["vocab"], batch, seq, device), args.repeats)
    print("\n| tokens | product | eager ms | graph ms | x gradient (eager) | graph / eager grad | "
          "both graphed | note |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        graph = "" if row.get("graph_ms") is None else f"{row['graph_ms']:.1f}"
        print(
            f"| {row['shape']} | {row['product']} | {row['eager_ms']:.1f} | {graph} | "
            f"{row.get('x_gradient_eager', 1.0):.2f} | "
            f"{row.get('x_gradient_graph_vs_eager_gradient', float('nan')):.2f} | "
            f"{row.get('x_gradient_both_graphed', float('nan')):.2f} | {row['error'][:80]} |"
        )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cuda_graph_products.json"), "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
