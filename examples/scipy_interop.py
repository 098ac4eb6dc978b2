"""Curvature operators are scipy ``LinearOperator``s: ARPACK (``eigsh``), LOBPCG and conjugate
gradients run on them unchanged. Here: the GGN of a small classifier, its top eigenvalues three
ways, and a damped Gauss-Newton step solved with ``cg``, checked against the dense matrix.

Run: ``python examples/scipy_interop.py``.
"""

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import aslinearoperator, cg, eigsh, lobpcg
from torch import nn

from torch_linop import GGNOperator, lanczos, parameters_to_vector, supervised_loss
from torch_linop.reference import dense_ggn

torch.manual_seed(0)
inputs = torch.randn(256, 12, dtype=torch.float64)
labels = (inputs[:, :4].sum(dim=1) > 0).long() + (inputs[:, 4] > 1).long()  # 3 classes
model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)).to(torch.float64)
data = [(inputs[:128], labels[:128]), (inputs[128:], labels[128:])]
loss = supervised_loss(F.cross_entropy)

G = GGNOperator(model, data, loss)  # a scipy LinearOperator of shape (n, n), dtype float64
n = G.shape[0]
print(f"{G}")

# Top-5 eigenvalues: ARPACK is the reference, LOBPCG and our Lanczos must agree with it.
arpack = np.sort(eigsh(G, k=5, which="LA", return_eigenvectors=False))[::-1]
start = np.random.default_rng(0).standard_normal((n, 5))
lobpcg_values, _ = lobpcg(G, start, largest=True, tol=1e-9, maxiter=500)
lobpcg_values = np.sort(lobpcg_values)[::-1]
ours = lanczos(G, k=5, which="LA", seed=0).eigenvalues
print("ARPACK :", np.array2string(arpack, precision=6))
print("LOBPCG :", np.array2string(lobpcg_values, precision=6))
print("Lanczos:", np.array2string(ours, precision=6))
np.testing.assert_allclose(ours, arpack, rtol=1e-8)
np.testing.assert_allclose(lobpcg_values, arpack, rtol=1e-6)

# A damped Gauss-Newton step: solve (G + damping I) step = -gradient with conjugate gradients.
# Operators compose like any LinearOperator (G + damping * I is one), and cg only needs matvecs.
damping = 1e-3
parameters = list(model.parameters())
mean_loss = sum(len(batch[1]) * loss(model, batch) for batch in data) / len(inputs)
gradient = parameters_to_vector(torch.autograd.grad(mean_loss, parameters)).detach().numpy()
damped = G + damping * aslinearoperator(scipy.sparse.identity(n))
products = []
step, info = cg(damped, -gradient, rtol=1e-10, maxiter=10 * n, callback=products.append)
assert info == 0, "cg did not converge"
residual = np.linalg.norm(damped @ step + gradient) / np.linalg.norm(gradient)
print(f"cg: {len(products)} iterations, relative residual {residual:.1e}")

# Check against the dense GGN (n = 259 is small enough to form).
dense = dense_ggn(model, data, loss).numpy()
exact_step = np.linalg.solve(dense + damping * np.eye(n), -gradient)
error = np.linalg.norm(step - exact_step) / np.linalg.norm(exact_step)
print(f"cg step vs dense solve: relative difference {error:.1e}")
assert error < 1e-6

with torch.no_grad():
    before = float(mean_loss)
    offset = 0
    for parameter in parameters:
        size = parameter.numel()
        parameter += 0.5 * torch.from_numpy(step[offset : offset + size]).view_as(parameter)
        offset += size
    after = float(sum(len(batch[1]) * loss(model, batch) for batch in data) / len(inputs))
print(f"loss before {before:.4f}, after half a Gauss-Newton step {after:.4f}")
