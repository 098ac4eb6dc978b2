"""Benchmarks of torch-linop against the libraries users would pick instead (PyHessian,
hessian-eigenthings, curvlinops, BackPACK, hand-rolled ``torch.autograd`` + scipy).

Entry point: ``python -m benchmarks <suite> [--device cpu|cuda] [--dtype] [--smoke] [--out DIR]``
with suites ``matvec``, ``eigs``, ``trace``, ``slq`` and ``kernel`` (see ``benchmarks.run``).
Shared models and data: ``benchmarks.models``; one adapter per library: ``benchmarks.peers``.
"""
