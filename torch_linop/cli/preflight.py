"""Checks that run before any training or product, so that a run which would fail at its end
(an unwritable output path, a parameter filter that selects nothing, more eigenvalues than the
matrix has) fails at once with exit code 2 and the fix."""

from __future__ import annotations

import fnmatch
import os
import tempfile
from pathlib import Path

from torch import nn

from torch_linop.cli.errors import UsageError

# Below this many selected parameters, -k >= n forms the n x n matrix with n products and
# diagonalises it (numpy eigh); above it, -k must stay below n (Lanczos finds at most n - 1).
DENSE_EIGH_LIMIT = 1024


def check_writable_directory(directory: Path, option: str) -> None:
    """``directory`` exists as a writable folder or can be created: its nearest existing ancestor
    is a folder in which a probe file can be written (and is deleted again). Nothing is created,
    so a run that stops on another usage error leaves no empty folder behind."""
    directory = directory.expanduser()
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{str(existing)!r} is a file")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".torch-linop-probe-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UsageError(
            f"{option} {str(directory)!r} is not a writable directory ({reason}); choose a "
            f"directory you can write to, e.g. {option} ./torch-linop-output"
        ) from None


def check_writable_file(path: Path, option: str) -> None:
    """``path`` can be created or overwritten: its folder is writable and it is not a folder."""
    path = path.expanduser()
    if path.is_dir():
        raise UsageError(
            f"{option} {str(path)!r} is a directory; give a file name such as out.json"
        )
    check_writable_directory(path.parent if str(path.parent) else Path("."), option)
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {str(path)!r} exists and is read-only; choose another file")


def selected_parameters(model: nn.Module, patterns: tuple[str, ...]) -> dict[str, int]:
    """Name -> size of the trainable parameters the ``--param-filter`` globs select (all
    trainable ones without globs); nothing selected is a usage error naming the model's
    parameters, so the user can write a pattern that matches."""
    trainable = {
        name: param.numel() for name, param in model.named_parameters() if param.requires_grad
    }
    if not trainable:
        raise UsageError(
            "the model has no trainable parameters (all have requires_grad=False), so there is "
            "no curvature to compute"
        )
    if not patterns:
        return trainable
    selected = {
        name: size
        for name, size in trainable.items()
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    }
    if not selected:
        names = list(trainable)
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        raise UsageError(
            f"--param-filter {','.join(patterns)!r} matches no trainable parameter; the model's "
            f"parameters are {shown}. Patterns are globs over these names, e.g. "
            f"--param-filter '{_example_pattern(names[0])}'"
        )
    return selected


def _example_pattern(name: str) -> str:
    """``"0.weight"`` -> ``"0.*"``; ``"transformer.h.0.attn.c_attn.weight"`` -> ``"transformer.*"``."""
    return name.split(".")[0] + ".*" if "." in name else name


def check_top_k(top_k: int, num_parameters: int) -> bool:
    """Whether ``-k`` needs the dense path (``k >= n`` on a small matrix); a ``k >= n`` too large
    to form the matrix is a usage error stating the limit."""
    if num_parameters < 2:
        raise UsageError(
            "the selected parameters form a 1 x 1 matrix; select more parameters to compute "
            "eigenvalues, or drop eigs from --quantities"
        )
    if top_k < num_parameters:
        return False
    if num_parameters <= DENSE_EIGH_LIMIT:
        return True
    raise UsageError(
        f"-k {top_k} asks for at least as many eigenvalues as the matrix has rows "
        f"(n = {num_parameters:,} selected parameters); Lanczos finds at most n - 1: use "
        f"-k {num_parameters - 1} or fewer (all eigenvalues are computed densely only up to "
        f"n = {DENSE_EIGH_LIMIT:,})"
    )
