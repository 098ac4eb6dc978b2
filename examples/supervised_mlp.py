"""Hessian of a small MLP: top eigenvalues, trace and spectral density, then the same operator
handed to scipy's ARPACK (``eigsh``) and to the dense matrix, agreeing.

Run: ``python examples/supervised_mlp.py`` (a few seconds on a laptop CPU).
"""

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from torch import nn

from torch_linop import HessianOperator, lanczos, spectral_density, supervised_loss, trace
from torch_linop.reference import dense_hessian

torch.manual_seed(0)

# The seed library's usage block, with torch_linop imports.
model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 1)).to(torch.float64)
x, y = torch.randn(128, 20, dtype=torch.float64), torch.randn(128, 1, dtype=torch.float64)
data = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 128, 32)]

H = HessianOperator(model, data, supervised_loss(nn.functional.mse_loss))
eig = lanczos(H, k=5, seed=0)  # top-5 eigenvalues (largest magnitude) + eigenvectors
t = trace(H, num_matvecs=99, seed=0)  # Hutch++ trace estimate
density = spectral_density(H, num_runs=8, lanczos_steps=40, seed=0)

print(f"{H}")
print("top-5 eigenvalues (Lanczos):", np.array2string(eig.eigenvalues, precision=6))
print("residuals ||Hv - lambda v||:", np.array2string(eig.residuals, precision=1))
print(f"trace (Hutch++, {t.num_matvecs} products): {t.estimate:.6f} +/- {t.stderr:.1e}")
# SLQ estimates the eigenvalue distribution: each run is a Gauss quadrature rule (nodes, weights).
# It resolves features wider than about (spectral range) / lanczos_steps, such as the tail above 0.2.
tail_mass = np.mean(np.sum(density.weights * (density.nodes > 0.2), axis=1))
print(f"SLQ ({density.num_matvecs} products): {100 * tail_mass:.1f}% of the eigenvalues exceed 0.2")

# The same operator is a scipy LinearOperator: ARPACK agrees with our Lanczos.
arpack = eigsh(H, k=5, which="LM", return_eigenvectors=False)
arpack = arpack[np.argsort(-np.abs(arpack))]
print("top-5 eigenvalues (ARPACK): ", np.array2string(arpack, precision=6))
np.testing.assert_allclose(eig.eigenvalues, arpack, rtol=1e-8)

# 705 parameters are few enough to form the matrix: check everything against it.
dense = dense_hessian(model, data, supervised_loss(nn.functional.mse_loss)).numpy()
exact = np.linalg.eigvalsh(dense)
exact_top = exact[np.argsort(-np.abs(exact))][:5]
np.testing.assert_allclose(eig.eigenvalues, exact_top, rtol=1e-8)
print(
    f"exact trace {np.trace(dense):.6f}; Hutch++ is off by {abs(t.estimate - np.trace(dense)):.1e}"
)
assert abs(t.estimate - np.trace(dense)) < 5 * t.stderr + 1e-10
assert abs(density.nodes.max() - exact.max()) < 1e-6 * abs(exact).max()  # extreme Ritz value
print(f"exact: {100 * np.mean(exact > 0.2):.1f}% of the eigenvalues exceed 0.2")
assert abs(tail_mass - np.mean(exact > 0.2)) < 0.03  # 8 probe vectors: about 1% of noise
print("Lanczos, ARPACK and the dense matrix agree.")
