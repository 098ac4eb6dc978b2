"""The built-in job: a small MLP on scikit-learn's bundled digits images (no download), or on a
synthetic regression task when scikit-learn is not installed."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from torch_linop.cli.workload import Workload
from torch_linop.losses import supervised_loss

BATCH_SIZE = 2048  # one batch: a product costs one forward/backward pass over the data


def builtin_workload(seed: int, dtype: torch.dtype) -> Workload:
    """Digits if scikit-learn is importable, else synthetic regression; weights from ``seed``."""
    if importlib.util.find_spec("sklearn") is not None:
        return digits_workload(seed, dtype)
    return synthetic_regression_workload(seed, dtype)


def _batches(
    inputs: torch.Tensor, targets: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (inputs[start : start + BATCH_SIZE], targets[start : start + BATCH_SIZE])
        for start in range(0, len(inputs), BATCH_SIZE)
    ]


def _mlp(sizes: tuple[int, ...], seed: int, dtype: torch.dtype) -> nn.Sequential:
    """Linear layers with tanh between them (smooth, so the Hessian differs from the GGN)."""
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if index > 0:
                layers.append(nn.Tanh())
            layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers).to(dtype)


def digits_workload(seed: int, dtype: torch.dtype) -> Workload:
    """64-32-10 tanh MLP, cross-entropy, on 80% of the 1,797 8x8 digits (20% held out)."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    inputs = (torch.as_tensor(images, dtype=torch.float64) / 16.0)[order].to(dtype)
    targets = torch.as_tensor(labels, dtype=torch.long)[order]
    num_train = int(0.8 * len(targets))
    model = _mlp((64, 32, 10), seed, dtype)
    train_x, train_y = inputs[:num_train], targets[:num_train]
    test_x, test_y = inputs[num_train:], targets[num_train:]

    def evaluate() -> str:
        device = next(model.parameters()).device
        with torch.no_grad():
            train_acc = (model(train_x.to(device)).argmax(1).cpu() == train_y).double().mean()
            test_acc = (model(test_x.to(device)).argmax(1).cpu() == test_y).double().mean()
        return f"train accuracy {100 * train_acc:.1f}%, held-out accuracy {100 * test_acc:.1f}%"

    return Workload(
        model=model,
        data=_batches(train_x, train_y),
        loss=supervised_loss(F.cross_entropy),
        model_name="MLP 64-32-10 (tanh)",
        data_name=f"scikit-learn digits, {num_train:,} training images",
        default_train_steps=200,
        learning_rate=1e-2,
        evaluate=evaluate,
    )


def synthetic_regression_workload(seed: int, dtype: torch.dtype) -> Workload:
    """16-32-1 tanh MLP, mean-squared error, on a noisy random teacher network's outputs."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(768, 16, generator=generator, dtype=torch.float64)
    hidden = torch.tanh(inputs @ torch.randn(16, 8, generator=generator, dtype=torch.float64))
    targets = hidden @ torch.randn(8, 1, generator=generator, dtype=torch.float64)
    targets += 0.1 * torch.randn(targets.shape, generator=generator, dtype=torch.float64)
    model = _mlp((16, 32, 1), seed, dtype)
    inputs, targets = inputs.to(dtype), targets.to(dtype)

    def evaluate() -> str:
        device = next(model.parameters()).device
        with torch.no_grad():
            mse = F.mse_loss(model(inputs.to(device)).cpu(), targets)
        return f"training mean-squared error {float(mse):.4f} (noise floor 0.0100)"

    return Workload(
        model=model,
        data=_batches(inputs, targets),
        loss=supervised_loss(F.mse_loss),
        model_name="MLP 16-32-1 (tanh)",
        data_name="synthetic regression (teacher network + noise), 768 samples",
        default_train_steps=300,
        learning_rate=1e-2,
        evaluate=evaluate,
    )
