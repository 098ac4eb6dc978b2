"""Where the time of a curvature product goes: torch.profiler tables for one gradient, one GGN
product and one Hessian product of GPT-2 small (from its config, random weights).

    python benchmarks/profile_products.py --out results/        # on a GPU
    python benchmarks/profile_products.py --smoke               # tiny, CPU is fine

Prints, per product, the wall time, the summed device-kernel time (the gap is launch and host
overhead) and the operators with the most device (or CPU) time.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import torch
from lm_ggn import gpt2, measure, tokens  # sibling script: same models, data and timing
from torch.profiler import ProfilerActivity, profile

from torch_linop import GGNOperator, HessianOperator, hf_lm_loss

SMOKE = dict(vocab=211, layers=2, width=32, heads=4, positions=64)
GPT2_SMALL = dict(vocab=50257, layers=12, width=768, heads=12, positions=1024)


def profile_one(name: str, fn: Callable[[], Any], device: torch.device, rows: int) -> str:
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    fn()
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    # device-side events only, as the profiler's own "Self CUDA time total" counts them (an
    # operator's self device time repeats its kernels')
    kernel_us = sum(
        e.self_device_time_total
        for e in events
        if e.device_type != torch.autograd.DeviceType.CPU and not e.is_user_annotation
    )
    launches = sum(e.count for e in events if e.key.startswith("cudaLaunchKernel"))
    header = (
        f"## {name}: wall {1e3 * measure(fn, device, 5)[0]:.1f} ms, device kernels "
        f"{kernel_us / 1e3:.1f} ms, kernel launches {launches}\n"
    )
    return header + events.table(sort_by=sort, row_limit=rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--shape", default="8x256", help="BATCHxSEQ")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    batch, seq = (2, 16) if args.smoke else (int(x) for x in args.shape.split("x"))
    sizes = SMOKE if args.smoke else GPT2_SMALL
    model = gpt2(**sizes, device=device)
    data = tokens(sizes["vocab"], batch, seq, device)
    loss = hf_lm_loss()
    params = [p for p in model.parameters() if p.requires_grad]
    ggn = GGNOperator(model, data, loss)
    cached_ggn = GGNOperator(model, data, loss, cache_graph=True)
    hessian = HessianOperator(model, data, loss)
    cached_difference = GGNOperator(
        model, data, loss, cache_graph=True, jvp_method="forward_difference"
    )
    vector = torch.randn(ggn.shape[0], generator=torch.Generator().manual_seed(2)).to(device)
    products = {
        "gradient": lambda: torch.autograd.grad(loss(model, data[0]), params),
        "GGN (forward-mode JVP, CE Hessian, VJP)": lambda: ggn @ vector,
        "GGN, cached graph (graph-free dual forward, CE Hessian, VJP)": lambda: cached_ggn @ vector,
        "GGN, cached graph, one-sided difference JVP": lambda: cached_difference @ vector,
        "Hessian (double backward)": lambda: hessian @ vector,
    }
    report = "".join(profile_one(n, fn, device, args.rows) for n, fn in products.items())
    print(report)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_products.txt"), "w") as handle:
            handle.write(report)


if __name__ == "__main__":
    main()
