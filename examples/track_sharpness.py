"""Track sharpness and Adam-preconditioned sharpness while training an MLP on scikit-learn's
bundled digits (nothing downloaded), with the monitor's default cadence (checks take at most 5%
of the wall time), then plot the trajectories against their stability lines.

Run: ``python examples/track_sharpness.py`` (writes track_sharpness.png and
track_sharpness.json in the working directory; needs matplotlib and scikit-learn).
"""

import time

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from sklearn.datasets import load_digits
from torch import nn

from torch_linop import HessianOperator, supervised_loss
from torch_linop.monitor import CurvatureMonitor, load_history

torch.manual_seed(0)
torch.set_num_threads(1)
digits = load_digits()
x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
y = torch.tensor(digits.target)
model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
loss = supervised_loss(nn.functional.cross_entropy)
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

# The curvature is taken on a fixed subset of 256 training samples, with kept-graph products.
subset = [(x[:256], y[:256])]
monitor = CurvatureMonitor(
    model, subset, loss, optimizer=optimizer, preconditioned=True, cache_graph=True
)

generator = torch.Generator().manual_seed(0)
started = time.perf_counter()
num_steps = 6000
for step in range(1, num_steps + 1):
    batch = torch.randint(0, len(x), (128,), generator=generator)
    optimizer.zero_grad()
    loss(model, (x[batch], y[batch])).backward()
    optimizer.step()
    monitor.step(step)
elapsed = time.perf_counter() - started

history = monitor.history
warm = [r.num_matvecs["top_eigenvalue"] for r in history if r.warm_started["top_eigenvalue"]]
cold = [r.num_matvecs["top_eigenvalue"] for r in history if not r.warm_started["top_eigenvalue"]]
last = history[-1]
print(
    f"{len(history)} checks in {num_steps} steps; monitor share {monitor.monitor_seconds / elapsed:.1%}"
)
print(f"products per sharpness check: cold {np.mean(cold):.1f}, warm {np.mean(warm):.1f}")
print(
    f"step {last.step}: sharpness {last.values['top_eigenvalue'][0]:.3f} (2/lr "
    f"{last.thresholds['2/lr']:.0f}), preconditioned {last.values['preconditioned_top_eigenvalue'][0]:.1f}"
    f" (Adam line {last.thresholds['adam']:.0f})"
)
assert all(record.all_converged for record in history)

# Check the last record against ARPACK on the same operator at the same parameters (the last
# check ran after the last step only if it was due: re-check now to compare like with like).
record = monitor.check(num_steps)
H = HessianOperator(model, subset, loss)
arpack = eigsh(H, k=1, which="LA", return_eigenvectors=False, tol=1e-6)[0]
assert abs(record.values["top_eigenvalue"][0] - arpack) <= 1e-3 * abs(arpack), (record, arpack)
print("the monitor's last sharpness agrees with ARPACK.")

monitor.save("track_sharpness.json")
assert load_history("track_sharpness.json") == monitor.history
monitor.plot("track_sharpness.png")
print("wrote track_sharpness.png")
