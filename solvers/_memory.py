"""Memory-aware defaults for solvers at LLM scale: how many n-vectors fit on the device.

A vector of a 1B-parameter float32 model is 4 GB, so the number of columns multiplied at once,
the Krylov basis and the Hutch++ sketch must be sized from the memory that is actually free.
On CPU (and for small operators) nothing is capped.
"""

from __future__ import annotations

import torch

BLOCK_BYTES = 1 << 30  # columns multiplied together: at most about 1 GiB of vectors
DEVICE_FRACTION = 0.65  # share of the free device memory a solver's stored vectors may use


def vector_bytes(size: int, dtype: torch.dtype) -> int:
    """Bytes of one n-vector in ``dtype``."""
    return size * torch.empty((), dtype=dtype).element_size()


def default_block_size(size: int, dtype: torch.dtype) -> int:
    """Columns per product block: all that fit in about 1 GiB of vectors, at least one (so a
    block of a huge model is one column and the batched product's graph is not multiplied)."""
    return max(1, BLOCK_BYTES // max(1, vector_bytes(size, dtype)))


def device_budget(device: torch.device) -> int | None:
    """Bytes the solver may keep on ``device``: a share of its free memory (None: no cap)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free * DEVICE_FRACTION)


def fits_on_device(device: torch.device, num_bytes: int) -> bool:
    """Whether ``num_bytes`` more fit on ``device`` (with 1 GiB to spare), counting what
    PyTorch's caching allocator holds unused (it reuses that). Always true off CUDA."""
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    unused_cache = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return num_bytes + (1 << 30) <= free + unused_cache


def vectors_within(
    budget: int | None, size: int, dtype: torch.dtype, copies: int = 1
) -> int | None:
    """How many n-vectors (each stored ``copies`` times) fit in ``budget`` (None: no cap)."""
    if budget is None:
        return None
    return budget // max(1, copies * vector_bytes(size, dtype))


def tall_qr(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a tall ``(n, s)`` matrix that also works for n in the billions.

    cuSOLVER's QR overflows its 32-bit workspace sizes on a 1B-row matrix, so large inputs use
    CholeskyQR2 (two rounds of ``R = chol(Y^T Y)`` in float64, ``Q = Y R^-1``; Yamamoto et al.
    2015), which is as accurate as Householder for the well-conditioned sketches of the
    estimators; a rank-deficient input falls back to Householder QR.
    """
    if matrix.shape[0] * matrix.shape[1] < (1 << 28):
        return torch.linalg.qr(matrix)
    orthonormal = matrix
    triangular = torch.eye(matrix.shape[1], dtype=torch.float64, device=matrix.device)
    for _ in range(2):
        gram = (orthonormal.T @ orthonormal).double()
        factor, info = torch.linalg.cholesky_ex(gram, upper=True)
        if int(info) != 0:
            return torch.linalg.qr(matrix)
        inverse = torch.linalg.inv(factor).to(matrix.dtype)
        orthonormal = orthonormal @ inverse
        triangular = factor @ triangular
    return orthonormal, triangular.to(matrix.dtype)
