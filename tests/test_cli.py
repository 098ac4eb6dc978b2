"""The ``torch-linop`` command: usage errors exit with code 2 and a message that names the fix;
the numbers it reports equal dense ground truth on a tiny float64 model; the default job runs
end to end (table, PNG, JSON)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_linop.cli import main
from torch_linop.cli.plot import _use_log_scale

REPO = Path(__file__).resolve().parents[1]

TINY_FACTORY = '''
import torch
import torch.nn.functional as F
from torch import nn
from torch_linop import supervised_loss


def _data(targets_kind):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(24, 4, generator=generator, dtype=torch.float64)
    if targets_kind == "classes":
        y = torch.randint(0, 3, (24,), generator=generator)
    else:
        y = torch.randn(24, 3, generator=generator, dtype=torch.float64)
    return [(x[:10], y[:10]), (x[10:], y[10:])]


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def classifier():
    """31 parameters; cross-entropy inferred from the integer targets."""
    return _model(), _data("classes")


def regressor_with_loss():
    return _model(), _data("values"), supervised_loss(F.mse_loss)


def plain_callable_loss():
    def loss(model, batch):
        return F.mse_loss(model(batch[0]), batch[1])
    return _model(), _data("values"), loss


def only_model():
    return _model()


def swapped():
    return _data("values"), _model()


def one_shot_iterator():
    return _model(), iter(_data("values"))


def raises():
    raise RuntimeError("the dataset directory is missing")


not_callable = 42
'''


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module ``tiny_factories`` importable from the working directory."""
    (tmp_path / "tiny_factories.py").write_text(TINY_FACTORY, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    yield "tiny_factories"
    sys.modules.pop("tiny_factories", None)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(args)`` in-process: exit code (argparse's SystemExit included), stdout, stderr."""
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["--curvature", "laplacian"], "invalid choice: 'laplacian'"),
        (["--quantities", "eigs,spectrum"], "unknown quantity spectrum"),
        (["-k", "0"], "expected a positive integer"),
        (["--dtype", "float8"], "invalid choice: 'float8'"),
        (["--hf-random-init"], "--hf-random-init only applies to --hf-config"),
        (["--model", "a:b", "--hf-config", "gpt2"], "not allowed with argument"),
    ],
)
def test_bad_options_exit_2(args, message, capsys) -> None:
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert message in err


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:build", "no module named 'no_such_module_xyz'"),
        ("missing.py:build", "no such file"),
        ("tiny_factories", "is not MODULE:FACTORY"),
        ("tiny_factories:nope", "has no attribute 'nope'; its functions are classifier"),
        ("tiny_factories:not_callable", "is a int, not a callable"),
        ("tiny_factories:only_model", "returned Sequential; FACTORY must be a callable"),
        ("tiny_factories:swapped", "is a list, not an nn.Module"),
        ("tiny_factories:one_shot_iterator", "returned a one-shot iterator"),
        ("tiny_factories:raises", "RuntimeError: the dataset directory is missing"),
    ],
)
def test_bad_model_exit_2(spec, message, factory_module, capsys) -> None:
    code, out, err = run_cli(["--model", spec, "--no-progress", "--no-plot"], capsys)
    assert code == 2, out
    assert err.startswith("torch-linop: error: --model")
    assert message in err


def test_model_from_file_path(factory_module, capsys) -> None:
    code, out, _ = run_cli(
        ["--model", "tiny_factories.py:classifier", "--quantities", "eigs", "-k", "2",
         "--no-progress", "--no-plot"],
        capsys,
    )  # fmt: skip
    assert code == 0, out
    assert "Top 2 eigenvalues of the Hessian" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--param-filter", "encoder.*"], "no parameter selected"),
        (["--curvature", "ggn", "--model", "tiny_factories:plain_callable_loss"],
         "GGNOperator needs a loss that separates the model's forward pass"),
        (["--hf-config", "gpt2"], "never downloads; add --hf-random-init"),
        (["--hf-config", "bert-base-uncased", "--hf-random-init"],
         "neither a local directory nor a built-in tiny config"),
        (["--device", "tpu:9"], "--device 'tpu:9'"),
    ],
)  # fmt: skip
def test_bad_configuration_exit_2(args, message, factory_module, capsys) -> None:
    if "--model" not in args and "--hf-config" not in args:
        args = [*args, "--model", "tiny_factories:classifier"]
    code, out, err = run_cli([*args, "--no-progress", "--no-plot", "--quantities", "eigs"], capsys)
    assert code == 2, out
    assert message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_exits_2(factory_module, capsys) -> None:
    code, _, err = run_cli(["--model", "tiny_factories:classifier", "--device", "cuda"], capsys)
    assert code == 2
    assert "CUDA is not available here; use --device cpu" in err


def test_log_scale_decision() -> None:
    grid = np.linspace(-1, 10, 500)
    spiky = np.exp(-(grid**2) / 0.01) + 1e-6 * np.exp(-((grid - 9) ** 2) / 0.01) + 1e-9
    flat = 1.0 + 0.5 * np.sin(grid)
    assert _use_log_scale(spiky)
    assert not _use_log_scale(flat)
