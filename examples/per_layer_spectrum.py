"""One Hessian spectral density per layer of a trained MLP, plotted together (log-scaled).

Each layer's density is that of the diagonal block of the Hessian over the layer's weight and
bias (``param_filter=match_names("<layer>.*")``). Run:
``python examples/per_layer_spectrum.py [--output per_layer_spectrum.png]``.
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from torch_linop import HessianOperator, lanczos, match_names, spectral_density, supervised_loss  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--output", default="per_layer_spectrum.png", help="where the figure goes")
args = parser.parse_args()

# A 3-class problem from a random teacher network, and a 3-layer tanh MLP trained on it.
generator = torch.Generator().manual_seed(0)
inputs = torch.randn(600, 10, generator=generator, dtype=torch.float64)
teacher = torch.randn(10, 3, generator=generator, dtype=torch.float64)
labels = (torch.tanh(inputs) @ teacher).argmax(dim=1)
torch.manual_seed(0)
model = nn.Sequential(
    nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3)
).to(torch.float64)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(150):
    optimizer.zero_grad()
    F.cross_entropy(model(inputs), labels).backward()
    optimizer.step()
accuracy = (model(inputs).argmax(1) == labels).double().mean()
print(f"trained: training accuracy {100 * accuracy:.1f}%")

data = [(inputs[:300], labels[:300]), (inputs[300:], labels[300:])]
loss = supervised_loss(F.cross_entropy)
layers = {"layer 1 (10->24)": "0.*", "layer 2 (24->24)": "2.*", "layer 3 (24->3)": "4.*"}

figure, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
print(f"{'layer':<18} {'params':>6} {'top eigenvalue':>15} {'SLQ max node':>13}")
for (label, pattern), color in zip(layers.items(), ("#1f4e79", "#c0392b", "#2e7d32")):
    H = HessianOperator(model, data, loss, param_filter=match_names(pattern))
    steps = min(40, H.shape[0])
    density = spectral_density(H, num_runs=6, lanczos_steps=steps, seed=0)
    top = lanczos(H, k=1, which="LA", seed=0)
    # SLQ's largest node converges to the largest eigenvalue first: the two agree.
    assert abs(density.nodes.max() - top.eigenvalues[0]) < 1e-6 * abs(top.eigenvalues[0])
    print(f"{label:<18} {H.shape[0]:>6} {top.eigenvalues[0]:>15.5f} {density.nodes.max():>13.5f}")
    floor = 1e-4  # the smoothed density is ~0 between separated eigenvalues; show 4 decades
    ax.semilogy(density.grid, np.maximum(density.density, floor), color=color, label=label)
    ax.axvline(top.eigenvalues[0], color=color, linestyle=":", linewidth=1)

ax.set_ylim(floor, None)
ax.set_xlabel(r"eigenvalue $\lambda$")
ax.set_ylabel("density (log scale)")
ax.set_title("Hessian spectral density per layer (SLQ); dotted: top eigenvalue")
ax.legend(frameon=False)
ax.grid(True, alpha=0.3)
figure.savefig(args.output, dpi=150)
print(f"wrote {args.output}")
