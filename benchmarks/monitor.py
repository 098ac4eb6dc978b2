"""CurvatureMonitor cost: products and seconds per check, warm vs cold starts, and the monitor's
share of training time with the default cadence (``every="auto"``, 5%).

Workloads (CPU, float32, one thread): an MLP on scikit-learn's digits and a tiny GPT-2 built from
a config on a synthetic token language. Each is trained first ("trained": then the learning rate
drops 10x, as late in a schedule) or not ("early": monitoring from step 1), on minibatches or
on the monitored batch itself ("full-batch", as edge-of-stability studies train). Two monitors (warm
starts and cold starts, sharpness and Adam-preconditioned sharpness, tol 1e-4) check the same
parameters every ``--every`` steps; a third monitor with the default cadence measures the share.

    python benchmarks/monitor.py [--out .bench_out/monitor.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from torch_linop import hf_lm_loss, supervised_loss
from torch_linop.monitor import CurvatureMonitor
from torch_linop.monitor.monitor import DEFAULT_FRESH_WEIGHT


def mlp_workload() -> tuple[nn.Module, list[Any], Any, Callable[[torch.Generator], Any]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    loss = supervised_loss(nn.functional.cross_entropy)

    def batch(generator: torch.Generator) -> Any:
        index = torch.randint(0, len(x), (128,), generator=generator)
        return x[index], y[index]

    return model, [(x[:256], y[:256])], loss, batch


def gpt2_workload() -> tuple[nn.Module, list[Any], Any, Callable[[torch.Generator], Any]]:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    config = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)

    def sequences(count: int, generator: torch.Generator) -> torch.Tensor:
        # a learnable language: each token is 3 * previous + 1 mod 64, with 10% noise
        rows = torch.empty(count, 24, dtype=torch.long)
        rows[:, 0] = torch.randint(0, 64, (count,), generator=generator)
        for t in range(1, 24):
            noise = torch.rand(count, generator=generator) < 0.1
            random = torch.randint(0, 64, (count,), generator=generator)
            rows[:, t] = torch.where(noise, random, (3 * rows[:, t - 1] + 1) % 64)
        return rows

    eval_tokens = sequences(16, torch.Generator().manual_seed(123))
    data = [{"input_ids": eval_tokens}]
    loss = hf_lm_loss()

    def batch(generator: torch.Generator) -> Any:
        return {"input_ids": sequences(16, generator)}

    return model, data, loss, batch


WORKLOADS = {"mlp": mlp_workload, "gpt2": gpt2_workload}


def train_step(model: nn.Module, loss: Any, batch: Any, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    loss(model, batch).backward()
    optimizer.step()


def run(
    name: str, phase: str, every: int, checks: int, share_steps: int, fresh_weight: float
) -> dict[str, Any]:
    torch.manual_seed(0)
    model, data, loss, minibatch = WORKLOADS[name]()
    if phase.endswith("full-batch"):  # gradient descent on the monitored data, as EoS studies do

        def batch(generator: torch.Generator) -> Any:
            return data[0]
    else:
        batch = minibatch
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    if phase.startswith("trained"):
        for _ in range(1500):
            train_step(model, loss, batch(generator), optimizer)
        optimizer.param_groups[0]["lr"] = 3e-4
    kwargs: dict[str, Any] = dict(optimizer=optimizer, preconditioned=True, cold_every=None)
    warm = CurvatureMonitor(model, data, loss, every=every, fresh_weight=fresh_weight, **kwargs)
    cold = CurvatureMonitor(model, data, loss, every=every, warm_start=False, **kwargs)
    for step in range(1, every * checks + 1):
        train_step(model, loss, batch(generator), optimizer)
        warm.step(step)
        cold.step(step)
    row: dict[str, Any] = {"workload": name, "phase": phase, "every": every, "checks": checks}
    row["parameters"] = sum(p.numel() for p in model.parameters())
    for quantity in ("top_eigenvalue", "preconditioned_top_eigenvalue"):
        warm_later = warm.history[1:]
        cold_later = cold.history[1:]
        short = "sharpness" if quantity == "top_eigenvalue" else "preconditioned"
        row[f"{short}_cold_products"] = float(
            np.mean([r.num_matvecs[quantity] for r in cold_later])
        )
        row[f"{short}_warm_products"] = float(
            np.mean([r.num_matvecs[quantity] for r in warm_later])
        )
        row[f"{short}_cold_seconds"] = float(np.mean([r.seconds[quantity] for r in cold_later]))
        row[f"{short}_warm_seconds"] = float(np.mean([r.seconds[quantity] for r in warm_later]))
        row[f"{short}_max_rel_diff"] = max(
            abs(a.values[quantity][0] - b.values[quantity][0]) / abs(b.values[quantity][0])
            for a, b in zip(warm.history, cold.history)
        )
        row[f"{short}_all_converged"] = all(r.converged[quantity] for r in warm.history)
    # the default cadence on a fresh copy of the run: its share of the training wall time
    auto = CurvatureMonitor(model, data, loss, **{**kwargs, "cold_every": 10})
    started = time.perf_counter()
    for step in range(1, share_steps + 1):
        train_step(model, loss, batch(generator), optimizer)
        auto.step(step)
    elapsed = time.perf_counter() - started
    row["auto_steps"], row["auto_checks"] = share_steps, len(auto.history)
    row["auto_share"] = auto.monitor_seconds / elapsed
    row["train_seconds"] = elapsed
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | phase | n | checks (every) | sharpness products cold / warm | s per check "
        "cold / warm | preconditioned products cold / warm | max rel. diff | auto: checks "
        "in steps, share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['phase']} | {r['parameters']} | {r['checks']} ({r['every']})"
            f" | {r['sharpness_cold_products']:.1f} / {r['sharpness_warm_products']:.1f}"
            f" ({r['sharpness_warm_products'] / r['sharpness_cold_products']:.2f}x)"
            f" | {r['sharpness_cold_seconds']:.3f} / {r['sharpness_warm_seconds']:.3f}"
            f" | {r['preconditioned_cold_products']:.1f} / {r['preconditioned_warm_products']:.1f}"
            f" ({r['preconditioned_warm_products'] / r['preconditioned_cold_products']:.2f}x)"
            f" | {max(r['sharpness_max_rel_diff'], r['preconditioned_max_rel_diff']):.1e}"
            f" | {r['auto_checks']} in {r['auto_steps']}, {r['auto_share']:.1%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--checks", type=int, default=10)
    parser.add_argument("--share-steps", type=int, default=3000)
    parser.add_argument("--workloads", default="mlp,gpt2")
    parser.add_argument(
        "--phases", default="trained, full-batch;trained, minibatch;early, minibatch"
    )
    parser.add_argument("--fresh-weight", type=float, default=DEFAULT_FRESH_WEIGHT)
    parser.add_argument("--out", default=".bench_out/monitor.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.workloads.split(","):
        for phase in args.phases.split(";"):
            rows.append(
                run(name, phase, args.every, args.checks, args.share_steps, args.fresh_weight)
            )
            print(rows[-1], flush=True)
    table = markdown(rows)
    print(table)
    payload = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.processor() or platform.machine()}), 1 thread",
        "torch": torch.__version__,
        "fresh_weight": args.fresh_weight,
        "rows": rows,
        "table": table,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
