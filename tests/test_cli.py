"""The ``torch-linop`` command: usage errors exit with code 2 and a message that names the fix;
the numbers it reports equal dense ground truth on a tiny float64 model; the default job runs
end to end (table, PNG, JSON)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_linop.cli import main
from torch_linop.cli.hf import hide_broken_torchvision

hide_broken_torchvision()  # before anything imports transformers (which caches the check)

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
    """35 parameters; cross-entropy inferred from the integer targets."""
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


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest, and immune to a busy machine's scheduling."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
        (["--param-filter", "encoder.*"], "matches no trainable parameter"),
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
    pytest.importorskip("matplotlib")
    from torch_linop.cli.plot import _use_log_scale

    grid = np.linspace(-1, 10, 500)
    spiky = np.exp(-(grid**2) / 0.01) + 1e-6 * np.exp(-((grid - 9) ** 2) / 0.01) + 1e-9
    flat = 1.0 + 0.5 * np.sin(grid)
    assert _use_log_scale(spiky)
    assert not _use_log_scale(flat)


# --------------------------------------------------------------------------- numbers vs truth


def _tiny_problem(name: str):
    """The factory's model, data and loss, built again in this process (seeded, so identical)."""
    import tiny_factories

    from torch_linop.cli.user_model import infer_loss

    model, data, *rest = getattr(tiny_factories, name)()
    return model, data, rest[0] if rest else infer_loss(data[0])


def _cli_json(args: list[str], tmp_path: Path, capsys) -> dict:
    out_json = tmp_path / "result.json"
    code, out, err = run_cli([*args, "--json", str(out_json), "--no-progress"], capsys)
    assert code == 0, err
    assert f"JSON  {out_json}" in out
    return json.loads(out_json.read_text())


@pytest.mark.parametrize(
    ("curvature", "factory", "reference"),
    [
        ("hessian", "classifier", "dense_hessian"),
        ("ggn", "classifier", "dense_ggn"),
        ("ef", "regressor_with_loss", "dense_empirical_fisher"),
    ],
)
def test_numbers_match_dense_truth(curvature, factory, reference, factory_module, tmp_path, capsys):
    """Top eigenvalues, the trace and the diagonal (exact here: 105 products >= n = 35 form the
    matrix from its unit vectors), SLQ nodes (35 steps = the exact spectrum), against the dense
    matrix."""
    from torch_linop import reference as dense

    record = _cli_json(
        ["--model", f"tiny_factories:{factory}", "--curvature", curvature, "-k", "4",
         "--quantities", "eigs,trace,density,diag", "--num-matvecs", "105",
         "--output-dir", str(tmp_path)],
        tmp_path, capsys,
    )  # fmt: skip
    model, data, loss = _tiny_problem(factory)
    matrix = getattr(dense, reference)(model, data, loss).detach().numpy()
    exact = np.linalg.eigvalsh(matrix)
    exact = exact[np.argsort(-np.abs(exact))]  # "top" = largest magnitude, as lanczos's default
    assert record["num_parameters"] == matrix.shape[0] == 35
    assert record["num_data"] == 24
    eigen = record["eigenvalues"]
    assert all(eigen["converged"])
    np.testing.assert_allclose(eigen["values"], exact[:4], rtol=1e-8, atol=1e-12)
    trace = record["trace"]
    assert abs(trace["estimate"] - np.trace(matrix)) <= 1e-8 * abs(np.trace(matrix))
    density = record["spectral_density"]
    assert max(map(max, density["nodes"])) == pytest.approx(exact.max(), rel=1e-8)
    blocks = record["diagonal"]["blocks"]
    assert [block["name"] for block in blocks] == [name for name, _ in model.named_parameters()]
    true_block_sums = []
    start = 0
    for block in blocks:
        true_block_sums.append(np.diag(matrix)[start : start + block["size"]].sum())
        start += block["size"]
    total_true = np.diag(matrix).sum()
    total_estimate = sum(block["sum"] for block in blocks)
    assert total_estimate == pytest.approx(total_true, rel=1e-10)  # exact: n unit vectors
    np.testing.assert_allclose([block["sum"] for block in blocks], true_block_sums, rtol=1e-10)
    assert (tmp_path / f"{curvature}_spectrum.png").is_file()


def test_mc_fisher_approaches_ggn(factory_module, tmp_path, capsys) -> None:
    """For cross-entropy the Fisher equals the GGN; with many sampled labels the MC estimate's
    top eigenvalue approaches the GGN's, and the MC Fisher is positive semi-definite."""
    from torch_linop.reference import dense_ggn

    record = _cli_json(
        ["--model", "tiny_factories:classifier", "--curvature", "mc-fisher", "--mc-samples",
         "400", "-k", "3", "--quantities", "eigs", "--no-plot"],
        tmp_path, capsys,
    )  # fmt: skip
    model, data, loss = _tiny_problem("classifier")
    ggn_top = np.linalg.eigvalsh(dense_ggn(model, data, loss).detach().numpy())[-1]
    values = record["eigenvalues"]["values"]
    assert values[0] == pytest.approx(ggn_top, rel=0.1)
    assert min(values) > 0


def test_param_filter_restricts_the_matrix(factory_module, tmp_path, capsys) -> None:
    from torch_linop import match_names
    from torch_linop.reference import dense_hessian

    record = _cli_json(
        ["--model", "tiny_factories:classifier", "--param-filter", "2.*", "-k", "3",
         "--quantities", "eigs", "--no-plot"],
        tmp_path, capsys,
    )  # fmt: skip
    model, data, loss = _tiny_problem("classifier")
    block = dense_hessian(model, data, loss, param_filter=match_names("2.*")).detach().numpy()
    assert record["parameters"] == ["2.weight", "2.bias"]
    exact = np.linalg.eigvalsh(block)
    np.testing.assert_allclose(
        record["eigenvalues"]["values"], exact[np.argsort(-np.abs(exact))][:3], rtol=1e-8
    )


def test_hf_config_from_local_directory(tmp_path, monkeypatch, capsys) -> None:
    """A GPT-2 config saved to disk, random weights, Hessian of one attention projection."""
    transformers = pytest.importorskip("transformers")
    from torch_linop import match_names
    from torch_linop.cli.hf import hf_workload
    from torch_linop.reference import dense_hessian

    config_dir = tmp_path / "tiny-gpt2"
    transformers.GPT2Config(
        vocab_size=16, n_positions=16, n_embd=8, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ).save_pretrained(config_dir)  # fmt: skip
    monkeypatch.chdir(tmp_path)
    record = _cli_json(
        ["--hf-config", str(config_dir), "--hf-random-init", "--dtype", "float64",
         "--param-filter", "transformer.h.0.attn.c_proj.*", "-k", "3", "--quantities",
         "eigs,trace", "--num-matvecs", "216", "--no-plot"],
        tmp_path, capsys,
    )  # fmt: skip
    workload = hf_workload(str(config_dir), True, seed=0)
    model = workload.model.double()
    block = dense_hessian(
        model,
        workload.data,
        workload.loss,
        param_filter=match_names("transformer.h.0.attn.c_proj.*"),
    )
    block = block.detach().numpy()  # dense_hessian keeps a graph to the unselected parameters
    assert record["num_parameters"] == 72
    exact = np.linalg.eigvalsh(block)
    np.testing.assert_allclose(
        record["eigenvalues"]["values"], exact[np.argsort(-np.abs(exact))][:3], rtol=1e-6
    )
    # 216 products >= n = 72: the trace is computed exactly from the unit vectors
    assert record["trace"]["method"] == "exact" and record["trace"]["stderr"] == 0
    assert record["trace"]["estimate"] == pytest.approx(np.trace(block), rel=1e-6)


# --------------------------------------------------------------------------- the default job


def test_synthetic_fallback_without_scikit_learn(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # find_spec("sklearn") is None now
    monkeypatch.chdir(tmp_path)
    record = _cli_json(
        ["--quantities", "eigs,trace", "-k", "3", "--train-steps", "20", "--no-plot"],
        tmp_path, capsys,
    )  # fmt: skip
    assert record["description"]["data"].startswith("synthetic regression")
    assert record["num_parameters"] == 16 * 32 + 32 + 32 + 1
    values = record["eigenvalues"]["values"]
    assert values == sorted(values, key=abs, reverse=True)
    assert all(record["eigenvalues"]["converged"])


def test_default_job_end_to_end(tmp_path) -> None:
    """``python -m torch_linop`` as a user runs it (smaller SLQ budget to keep the test fast):
    the table on stdout, a real PNG figure, and a JSON file with consistent numbers."""
    image = pytest.importorskip("matplotlib.image")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, "-m", "torch_linop", "--json", "out.json", "--no-progress",
         "--slq-runs", "2", "--slq-steps", "32", "--threads", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    digits = importlib.util.find_spec("sklearn") is not None
    assert ("Hessian of MLP 64-32-10 (tanh)" if digits else "Hessian of MLP 16-32-1 (tanh)") in out
    assert "Top 10 eigenvalues of the Hessian" in out
    assert "Trace (Hutch++, 99 products)" in out
    png = tmp_path / "torch-linop-output" / "hessian_spectrum.png"
    assert f"Plot  {png}" in out
    pixels = image.imread(png)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 1000
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
    record = json.loads((tmp_path / "out.json").read_text())
    values = np.array(record["eigenvalues"]["values"])
    assert len(values) == 10 and np.all(np.diff(np.abs(values)) <= 0)
    assert all(record["eigenvalues"]["converged"])
    nodes = np.array(record["spectral_density"]["nodes"])
    assert nodes.max() == pytest.approx(values.max(), rel=1e-6)  # SLQ's extreme Ritz value
    grid = np.array(record["spectral_density"]["grid"])
    density = np.array(record["spectral_density"]["density"])
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)


def test_console_script_is_installed() -> None:
    import shutil

    script = shutil.which("torch-linop")
    if script is None:
        pytest.skip("the torch-linop console script is not on PATH (package not installed)")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--hf-random-init" in result.stdout


def test_every_option_is_documented() -> None:
    """docs/getting-started/command_line.md mentions every option the parser knows."""
    from torch_linop.cli.arguments import build_parser

    page = (REPO / "docs" / "getting-started" / "command_line.md").read_text(encoding="utf-8")
    options = [
        option
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    ]
    missing = [option for option in options if f"`{option}" not in page]
    assert not missing, f"options missing from command_line.md: {missing}"


def test_without_matplotlib_the_plot_is_skipped(factory_module, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec("matplotlib") is None now
    code, out, _ = run_cli(
        ["--model", "tiny_factories:classifier", "--quantities", "eigs", "-k", "2",
         "--no-progress"],
        capsys,
    )  # fmt: skip
    assert code == 0
    assert 'Plot  skipped: matplotlib is not installed (pip install "torch-linop[plot]")' in out


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "ef"])
def test_cache_graph_gives_the_same_numbers(factory_module, tmp_path, capsys, curvature) -> None:
    """``--cache-graph`` keeps the batches' graphs between products: the same eigenvalues (to
    rounding) and the same trace estimate (same probes) as without it."""
    args = ["--model", "tiny_factories:classifier", "--curvature", curvature, "-k", "3",
            "--quantities", "eigs,trace", "--no-plot"]  # fmt: skip
    plain = _cli_json(args, tmp_path, capsys)
    cached = _cli_json([*args, "--cache-graph"], tmp_path, capsys)
    np.testing.assert_allclose(
        cached["eigenvalues"]["values"], plain["eigenvalues"]["values"], rtol=1e-10
    )
    assert cached["trace"]["estimate"] == pytest.approx(plain["trace"]["estimate"], rel=1e-10)


def test_cache_graph_reaches_the_operator(factory_module, tmp_path, capsys, monkeypatch) -> None:
    import torch_linop.cli.analysis as analysis

    built = []
    original = analysis.GGNOperator

    def recording(*args, **kwargs):
        operator = original(*args, **kwargs)
        built.append(operator)
        return operator

    monkeypatch.setattr(analysis, "GGNOperator", recording)
    _cli_json(
        ["--model", "tiny_factories:classifier", "--curvature", "ggn", "-k", "2",
         "--quantities", "eigs", "--no-plot", "--cache-graph"],
        tmp_path, capsys,
    )  # fmt: skip
    assert built and built[0].cache_graph and built[0]._graphs is not None
