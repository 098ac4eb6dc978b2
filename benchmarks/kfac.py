"""KFAC / EKFAC: factor cost, approximation quality, and preconditioned CG (CPU).

Three measurements, printed as markdown tables and written as JSON:

1. factor time vs one gradient: wall time (best of --repeats) of computing the Kronecker
   factors over the data, ours and curvlinops 3's (when installed), next to one pass of
   ``loss.backward()`` over the same data (float32; an MLP and a small CNN);
2. quality against the exact GGN (float64, type-2): ``approximation_quality``'s relative
   Frobenius error (with its standard error), top-5 eigenspace overlap and trace ratio, for
   KFAC and EKFAC;
3. CG on the damped exact GGN ``(G + lambda I) x = b``: products with G until the relative
   residual is 1e-6, without a preconditioner and with the exactly damped KFAC / EKFAC inverse
   (damping relative to tr(KFAC) / n); a one-layer MSE control, where KFAC is exact, must take
   one product.

    python benchmarks/kfac.py [--repeats 3] [--out .bench_out/kfac.json]
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
import scipy.sparse.linalg
import torch
from torch import nn

from torch_linop import GGNOperator, supervised_loss
from torch_linop.kfac import EKFACOperator, KFACOperator, approximation_quality


def mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


def cnn(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(channels * 2 * 2, 10),
    )


def digits(num: int, dtype: torch.dtype, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's bundled 8x8 digits (no download), standardised, as (1, 8, 8) images."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images[:num], dtype=dtype).reshape(-1, 1, 8, 8)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(labels[:num])
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, num, batch)]


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def factor_times(repeats: int) -> list[dict[str, Any]]:
    try:
        import curvlinops
    except ImportError:
        curvlinops = None
    records = []
    builders: tuple[tuple[str, Callable[[], nn.Module]], ...] = (
        ("MLP 64-256-256-10", lambda: mlp(256)),
        ("CNN 2x conv16", lambda: cnn(16)),
    )
    for name, build in builders:
        torch.manual_seed(0)
        model = build()
        data = digits(1024, torch.float32, 256)
        loss = nn.CrossEntropyLoss()

        def gradient(model: nn.Module = model, data: list = data, loss: nn.Module = loss) -> None:
            model.zero_grad()
            for x, y in data:
                (loss(model(x), y) * x.shape[0] / 1024).backward()

        record = {"model": name, "num_data": 1024, "batch_size": 256}
        record["gradient_s"] = best_time(gradient, repeats)
        for fisher in ("type-2", "mc"):
            ours = KFACOperator(model, data, loss, fisher_type=fisher)
            record[f"ours_{fisher}_s"] = best_time(ours.compute_factors, repeats)
            if curvlinops is not None:
                theirs = curvlinops.KFACLinearOperator(
                    model,
                    loss,
                    list(model.parameters()),
                    data,
                    fisher_type=fisher,
                    check_deterministic=False,
                )
                record[f"curvlinops_{fisher}_s"] = best_time(
                    theirs.compute_kronecker_factors, repeats
                )
        records.append(record)
    return records


def quality_and_cg() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    quality_records, cg_records = [], []
    cases: tuple[tuple[str, Callable[[], nn.Module], nn.Module], ...] = (
        ("MLP 64-16-16-10", lambda: mlp(16), nn.CrossEntropyLoss()),
        ("CNN 2x conv4", lambda: cnn(4), nn.CrossEntropyLoss()),
        # control: one linear layer with MSE, where KFAC (joined bias) is the exact GGN
        (
            "Linear 64-10, MSE (KFAC exact)",
            lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
            nn.MSELoss(),
        ),
    )
    for name, build, loss in cases:
        torch.manual_seed(0)
        model = build().double()
        data = digits(512, torch.float64, 128)
        if isinstance(loss, nn.MSELoss):
            generator = torch.Generator().manual_seed(1)
            data = [
                (x, torch.randn(x.shape[0], 10, generator=generator, dtype=torch.float64))
                for x, _ in data
            ]
        ggn = GGNOperator(model, data, supervised_loss(loss))
        operators = {
            "KFAC": KFACOperator(model, data, loss, separate_weight_and_bias=False),
            "EKFAC": EKFACOperator(model, data, loss, separate_weight_and_bias=False),
        }
        for label, operator in operators.items():
            quality = approximation_quality(operator, ggn, num_probes=64, k=5, seed=0)
            quality_records.append({"model": name, "approximation": label, **quality.__dict__})
        damping_scale = float(operators["KFAC"].trace()) / ggn.shape[0]
        rhs = np.random.default_rng(0).standard_normal(ggn.shape[0])
        for relative_damping in (1e-1, 1e-3):
            damping = relative_damping * damping_scale
            record: dict[str, Any] = {
                "model": name,
                "num_params": ggn.shape[0],
                "damping": damping,
                "relative_damping": relative_damping,
            }
            preconditioners = {"none": None}
            for label, operator in operators.items():
                preconditioners[label] = operator.inverse(damping, use_exact_damping=True)
            for label, preconditioner in preconditioners.items():
                record[f"products_{label}"] = cg_products(ggn, damping, rhs, preconditioner)
            cg_records.append(record)
    return quality_records, cg_records


class NextTokenLogits(nn.Module):
    """A GPT-2 LM head model as ``ids -> next-token logits (batch, vocab, seq - 1)``."""

    def __init__(self, language_model: nn.Module) -> None:
        super().__init__()
        self.language_model = language_model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model(input_ids=ids).logits[:, :-1].transpose(1, 2)


def gpt2_quality() -> list[dict[str, Any]]:
    """KFAC / EKFAC of a randomly initialised 2-layer GPT-2 (n_embd 32, vocab 64, 16 tokens)
    against its exact GGN, over the Conv1D weights and biases of its blocks (float64)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = NextTokenLogits(GPT2LMHeadModel(config)).double().eval()
    ids = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(1))
    data = [(ids[i : i + 8], ids[i : i + 8, 1:]) for i in range(0, 32, 8)]
    params = {
        name: param
        for name, param in model.named_parameters()
        if ".h." in name and any(f".{kind}." in name for kind in ("c_attn", "c_proj", "c_fc"))
    }
    loss = nn.CrossEntropyLoss()
    ggn = GGNOperator(
        model, data, supervised_loss(loss), param_filter=lambda name, _: name in params
    )
    records = []
    for label, operator_class, fisher in (
        ("KFAC type-2", KFACOperator, "type-2"),
        ("KFAC MC", KFACOperator, "mc"),
        ("EKFAC MC", EKFACOperator, "mc"),
    ):
        operator = operator_class(
            model, data, loss, params=params, fisher_type=fisher, separate_weight_and_bias=False
        )
        quality = approximation_quality(operator, ggn, num_probes=32, k=5, seed=0)
        records.append(
            {
                "model": "GPT-2 2x32, 16 tokens",
                "num_params": ggn.shape[0],
                "approximation": label,
                **quality.__dict__,
            }
        )
    return records


def cg_products(ggn: Any, damping: float, rhs: np.ndarray, preconditioner: Any) -> int | None:
    """Products with the exact GGN until ``||r|| <= 1e-6 ||b||`` (None if 2000 did not do)."""
    count = [0]

    def product(vector: np.ndarray) -> np.ndarray:
        count[0] += 1
        return ggn @ vector + damping * vector

    system = scipy.sparse.linalg.LinearOperator(ggn.shape, matvec=product, dtype=np.float64)
    _, info = scipy.sparse.linalg.cg(system, rhs, rtol=1e-6, atol=0, maxiter=2000, M=preconditioner)
    return count[0] if info == 0 else None


def table(records: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for record in records:
        cells = []
        for column in columns:
            value = record.get(column)
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(".bench_out/kfac.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    times = factor_times(args.repeats)
    quality, cg = quality_and_cg()
    quality += gpt2_quality()
    print(table(times, list(times[0])))
    print()
    print(
        table(
            quality,
            [
                "model",
                "approximation",
                "relative_frobenius_error",
                "relative_frobenius_error_stderr",
                "top_k_overlap",
                "trace_ratio",
                "trace_ratio_stderr",
            ],
        )
    )
    print()
    print(table(cg, list(cg[0])))
    payload = {
        "date": datetime.now(timezone.utc).isoformat(),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads": args.threads,
        "factor_times": times,
        "quality": quality,
        "cg": cg,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
