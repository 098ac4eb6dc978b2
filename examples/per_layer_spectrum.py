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

# One smoothing width for all layers, so that their curves can be compared: a 40th of the
# largest top eigenvalue (SLQ's default would be each layer's own node range / steps).
operators = {label: HessianOperator(model, data, loss, param_filter=match_names(pattern))
             for label, pattern in layers.items()}  # fmt: skip
tops = {label: lanczos(H, k=1, which="LA", seed=0) for label, H in operators.items()}
sigma = max(top.eigenvalues[0] for top in tops.values()) / 40

figure, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
print(f"{'layer':<18} {'params':>6} {'top eigenvalue':>15} {'SLQ max node':>13}")
for (label, H), color in zip(operators.items(), ("#1f4e79", "#c0392b", "#2e7d32")):
    steps = min(40, H.shape[0])
    density = spectral_density(H, num_runs=6, lanczos_steps=steps, sigma=sigma, seed=0)
    top = tops[label].eigenvalues[0]
    # SLQ's largest node converges to the largest eigenvalue first: the two agree.
    assert abs(density.nodes.max() - top) < 1e-6 * abs(top)
    print(f"{label:<18} {H.shape[0]:>6} {top:>15.5f} {density.nodes.max():>13.5f}")
    floor = 1e-4  # the smoothed density is ~0 between separated eigenvalues; show 4 decades
    ax.semilogy(density.grid, np.maximum(density.density, floor), color=color, label=label)
    ax.axvline(top, color=color, linestyle=":", linewidth=1)

ax.set_ylim(floor, None)
ax.set_xlabel(r"eigenvalue $\lambda$")
ax.set_ylabel("density (log scale)")
ax.set_title(
    f"Hessian spectral density per layer (SLQ, Gaussian smoothing $\\sigma$ = {sigma:.2g} for all)"
    "\ndotted: each layer's top eigenvalue",
    fontsize=10,
)
ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
ax.grid(True, alpha=0.3)
figure.savefig(args.output, dpi=150)
print(f"sigma = {sigma:.3g}: the same Gaussian smoothing for every layer")
print(f"wrote {args.output}")
