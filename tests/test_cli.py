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


def diverging():
    """A loss that is infinite from the first step: training cannot go anywhere."""
    def loss(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1]) * float("inf")
    return _model(), _data("classes"), loss


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


# --------------------------------------------------------------------------- checks before work


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the run gets as far as training (the checks must come first)."""
    import torch_linop.cli.training as training

    def refuse(*args, **kwargs):
        raise AssertionError("the run trained before reporting the usage error")

    monkeypatch.setattr(training, "train", refuse)


def test_param_filter_matching_nothing_is_reported_before_training(
    factory_module, no_training, capsys
) -> None:
    code, _, err = run_cli(
        ["--model", "tiny_factories:classifier", "--param-filter", "decoder.*,head.*",
         "--train-steps", "5", "--no-progress", "--no-plot"],
        capsys,
    )  # fmt: skip
    assert code == 2
    assert "--param-filter 'decoder.*,head.*' matches no trainable parameter" in err
    assert "0.weight, 0.bias, 2.weight, 2.bias" in err and "--param-filter '0.*'" in err
    assert "match_names" not in err and "match_regex" not in err  # no Python API in CLI advice


def test_k_beyond_a_large_matrix_exits_2_with_the_limit(tmp_path, no_training, capsys) -> None:
    """-k 5000 on the built-in job's 2,410 parameters: refused before training, with the limit
    (it used to be clamped silently and run thousands of products)."""
    pytest.importorskip("sklearn")
    code, _, err = run_cli(["-k", "5000", "--no-progress", "--no-plot"], capsys)
    assert code == 2
    assert "-k 5000" in err and "n = 2,410" in err and "use -k 2409 or fewer" in err


def test_k_at_least_n_on_a_small_matrix_gives_every_eigenvalue(
    factory_module, tmp_path, capsys
) -> None:
    """-k 50 on 35 parameters: the 35 x 35 matrix is formed and diagonalised, and the report
    says so (it used to print "Top 34" and exit 0)."""
    from torch_linop.reference import dense_hessian

    out_json = tmp_path / "all.json"
    code, out, err = run_cli(
        ["--model", "tiny_factories:classifier", "-k", "50", "--quantities", "eigs",
         "--json", str(out_json), "--no-progress", "--no-plot"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "All 35 eigenvalues of the Hessian" in out
    assert "dense eigh of the 35 x 35 matrix formed with 35 products: -k is at least n" in out
    record = json.loads(out_json.read_text())
    model, data, loss = _tiny_problem("classifier")
    exact = np.linalg.eigvalsh(dense_hessian(model, data, loss).detach().numpy())
    np.testing.assert_allclose(
        record["eigenvalues"]["values"], exact[np.argsort(-np.abs(exact))], rtol=1e-9, atol=1e-13
    )
    assert record["eigenvalues"]["dense"] and all(record["eigenvalues"]["converged"])
    assert max(record["eigenvalues"]["residuals"]) < 1e-12


@pytest.mark.parametrize(
    ("option", "target", "message"),
    [
        ("--output-dir", "a_file/plots", "--output-dir"),
        ("--json", "a_file/out.json", "--json"),
        ("--json", "a_directory", "is a directory; give a file name"),
    ],
)
def test_unwritable_outputs_exit_2_before_any_work(
    option, target, message, factory_module, tmp_path, no_training, capsys
) -> None:
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "a_directory").mkdir()
    code, out, err = run_cli(
        ["--model", "tiny_factories:classifier", "--train-steps", "5", "--quantities", "eigs",
         "-k", "2", "--no-progress", option, str(tmp_path / target)],
        capsys,
    )  # fmt: skip
    assert code == 2, out
    assert err.startswith("torch-linop: error: ") and message in err
    assert "Traceback" not in err and out == ""


def test_closed_stdout_ends_quietly(factory_module, tmp_path) -> None:
    """``torch-linop ... | head -1``: the reader has gone before the report is printed. The run
    stops with 141 (128 + SIGPIPE, as Unix tools do) and no BrokenPipeError traceback."""
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "torch_linop", "--model", "tiny_factories.py:classifier",
         "--quantities", "eigs", "-k", "2", "--no-plot", "--no-progress"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    process.stdout.close()  # the pipe's only reader is gone: the first print fails
    _, err = process.communicate(timeout=120)
    assert process.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"BrokenPipeError" not in err


def test_float16_trains_in_float32_and_says_so(tmp_path, capsys) -> None:
    """Adam in float16 overflowed within 20 steps, and the NaN loss was then blamed on the data.
    Now the training runs in float32 and the analysis in float16."""
    pytest.importorskip("sklearn")
    code, out, err = run_cli(
        ["--dtype", "float16", "--train-steps", "20", "--quantities", "trace",
         "--num-matvecs", "6", "--no-progress", "--no-plot"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "(trained in float32: Adam overflows float16)" in out
    assert "torch.float16 on" in out
    trace_value = float(out.split("Trace (Hutch++, 6 products): ")[1].split()[0])
    assert np.isfinite(trace_value) and trace_value > 0


def test_diverging_training_names_the_step_not_the_data(factory_module, capsys) -> None:
    code, out, err = run_cli(
        ["--model", "tiny_factories:diverging", "--train-steps", "3", "--quantities", "eigs",
         "-k", "2", "--no-progress", "--no-plot"],
        capsys,
    )  # fmt: skip
    assert code == 2, out
    assert "training diverged: the loss became inf at Adam step 1 of 3 in float64" in err
    assert "--train-steps 0" in err and "data" not in err


# --------------------------------------------------------------------------- what the report says


def test_top_means_largest_magnitude_as_in_lanczos(factory_module, tmp_path, capsys) -> None:
    """The tiny classifier's Hessian has eigenvalue -0.331 among its six largest in magnitude:
    the CLI's top 6 equal ``lanczos``'s default (which="LM") and the dense matrix's."""
    from torch_linop import HessianOperator, lanczos
    from torch_linop.reference import dense_hessian

    record = _cli_json(
        ["--model", "tiny_factories:classifier", "-k", "6", "--quantities", "eigs", "--no-plot"],
        tmp_path, capsys,
    )  # fmt: skip
    model, data, loss = _tiny_problem("classifier")
    exact = np.linalg.eigvalsh(dense_hessian(model, data, loss).detach().numpy())
    by_magnitude = exact[np.argsort(-np.abs(exact))][:6]
    assert by_magnitude.min() < 0  # the case where "largest" and "largest magnitude" differ
    library = lanczos(HessianOperator(model, data, loss), 6, seed=0).eigenvalues
    np.testing.assert_allclose(record["eigenvalues"]["values"], by_magnitude, rtol=1e-8)
    np.testing.assert_allclose(record["eigenvalues"]["values"], library, rtol=1e-8)
    assert record["eigenvalues"]["which"] == "largest magnitude"


@pytest.mark.parametrize(("curvature", "symbol"), [("ggn", "G"), ("ef", "F"), ("hessian", "H")])
def test_report_uses_the_matrix_symbol(curvature, symbol, factory_module, capsys) -> None:
    code, out, _ = run_cli(
        ["--model", "tiny_factories:classifier", "--curvature", curvature, "-k", "2",
         "--quantities", "eigs", "--no-progress", "--no-plot"],
        capsys,
    )  # fmt: skip
    assert code == 0
    assert f"x ||{symbol}|| = " in out and f"residual = ||{symbol} v - lambda v||" in out
    others = {"H", "G", "F"} - {symbol}
    assert not any(f"||{other}" in out for other in others)
    assert ("largest |lambda| first" in out) == (curvature == "hessian")  # PSD: largest = |largest|


def test_exact_trace_prints_no_error_bar(factory_module, capsys) -> None:
    from torch_linop.reference import dense_ggn

    code, out, _ = run_cli(
        ["--model", "tiny_factories:classifier", "--curvature", "ggn", "--quantities", "trace",
         "--num-matvecs", "35", "--no-progress", "--no-plot"],
        capsys,
    )  # fmt: skip
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("Trace"))
    assert "+/-" not in line and "exact" in line
    model, data, loss = _tiny_problem("classifier")
    exact = np.trace(dense_ggn(model, data, loss).detach().numpy())
    assert float(line.rsplit(": ", 1)[1]) == pytest.approx(exact, rel=1e-6)  # printed to 7 digits


def test_indefinite_share_above_100_percent_gets_a_note() -> None:
    from types import SimpleNamespace

    from torch_linop.cli.analysis import Analysis
    from torch_linop.cli.report import format_report

    eigen = SimpleNamespace(
        eigenvalues=np.array([2.0, 1.5]), residuals=np.zeros(2), converged=np.ones(2, bool),
        residuals_are_true=True, num_restarts=0, num_matvecs=10, num_iterations=5, tol=1e-10,
        norm_estimate=2.0,
    )  # fmt: skip
    trace = SimpleNamespace(estimate=3.0, stderr=0.01, num_matvecs=30, method="hutch++")
    for curvature, noted in (("hessian", True), ("ggn", False)):
        analysis = Analysis(curvature, 10, 5, ["w"], eigen=eigen, trace=trace)
        report = format_report(analysis, {"model": "m"})
        assert "hold 116.7% of it" in report
        assert ("indefinite: its negative eigenvalues lower the trace" in report) == noted


def _block_stderr_truth(matrix: np.ndarray, block: slice, num_probes: int) -> float:
    """Standard error of Hutchinson's estimate of one diagonal block's trace, sum_{i in B}
    z_i (A z)_i with Rademacher z: variance 2 sum_{i != j in B} A_ij^2 + sum_{i in B, j not
    in B} A_ij^2, over ``num_probes`` probes."""
    inside = matrix[block, block]
    outside = np.delete(matrix[block], np.arange(matrix.shape[0])[block], axis=1)
    variance = 2 * (np.sum(inside**2) - np.sum(np.diag(inside) ** 2)) + np.sum(outside**2)
    return float(np.sqrt(variance / num_probes))


def test_diagonal_block_sums_have_standard_errors(factory_module, tmp_path, capsys) -> None:
    """30 probes on 35 parameters (an estimate, not the exact path): each tensor's diagonal sum
    carries a standard error close to the closed-form one, the sums lie within 4 of them of the
    truth, and the sum over all tensors is shown next to the trace to compare."""
    from torch_linop.reference import dense_hessian

    out_json = tmp_path / "diag.json"
    code, out, err = run_cli(
        ["--model", "tiny_factories:classifier", "--quantities", "trace,diag", "--num-matvecs",
         "30", "--json", str(out_json), "--no-progress", "--no-plot"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "sum +/- its standard error" in out and "all tensors" in out
    record = json.loads(out_json.read_text())
    model, data, loss = _tiny_problem("classifier")
    matrix = dense_hessian(model, data, loss).detach().numpy()
    start = 0
    for block in record["diagonal"]["blocks"]:
        rows = slice(start, start + block["size"])
        start += block["size"]
        truth = _block_stderr_truth(matrix, rows, 30)
        assert block["sum_stderr"] == pytest.approx(truth, rel=0.6)
        assert abs(block["sum"] - np.trace(matrix[rows, rows])) < 4 * truth
    total = record["diagonal"]["total"]
    assert total["sum"] == pytest.approx(sum(b["sum"] for b in record["diagonal"]["blocks"]))
    assert total["stderr"] == pytest.approx(_block_stderr_truth(matrix, slice(0, 35), 30), rel=0.6)


# --------------------------------------------------------------------------- the figure


def _figure_of(args: list[str], factory: str = "classifier"):
    from torch_linop.cli.analysis import analyse, build_operator
    from torch_linop.cli.arguments import parse_options
    from torch_linop.cli.plot import draw_figure
    from torch_linop.cli.user_model import user_workload

    options = parse_options(["--model", f"tiny_factories:{factory}", "--no-progress", *args])
    workload = user_workload(options.model)
    analysis = analyse(build_operator(workload, options), options)
    return draw_figure(analysis, workload.model_name), analysis


def _overlapping_tick_labels(figure) -> list[tuple[str, str]]:
    renderer = figure.canvas.get_renderer()
    clashes = []
    for ax in figure.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [label for label in axis.get_ticklabels(which="both") if label.get_text()]
            labels = [label for label in labels if label.get_visible()]
            boxes = [label.get_window_extent(renderer) for label in labels]
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    if boxes[i].overlaps(boxes[j]):
                        clashes.append((labels[i].get_text(), labels[j].get_text()))
    return clashes


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_figure_states_smoothing_keeps_legend_off_the_curve(curvature, factory_module) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figure, analysis = _figure_of(
        ["--curvature", curvature, "-k", "5", "--quantities", "eigs,trace,density,diag",
         "--num-matvecs", "30", "--slq-runs", "2", "--slq-steps", "12"],
    )  # fmt: skip
    try:
        figure.canvas.draw()
        density_ax = figure.axes[0]
        legend = density_ax.get_legend()
        texts = [text.get_text() for text in legend.get_texts()]
        assert any(
            f"= {analysis.density.sigma:.2g}" in text and "smoothing" in text for text in texts
        )
        renderer = figure.canvas.get_renderer()
        assert not legend.get_window_extent(renderer).overlaps(
            density_ax.get_window_extent(renderer)
        )
        if curvature == "ggn":  # PSD: nothing drawn below 0, and the legend says why
            assert density_ax.get_xlim()[0] >= 0
            assert np.asarray(density_ax.lines[0].get_xdata()).min() >= 0  # the density curve
            assert any("PSD matrix" in text for text in texts)
        else:  # indefinite: the lowest Ritz value is marked
            lowest = float(np.min(analysis.density.nodes))
            assert lowest < 0
            assert any(f"lowest SLQ Ritz value {lowest:.2g}" in text for text in texts)
        assert _overlapping_tick_labels(figure) == []
    finally:
        plt.close(figure)


# --------------------------------------------------------------------------- threads


def test_small_models_run_on_one_thread_and_threads_are_restored(factory_module, capsys) -> None:
    from torch_linop.cli.threads import SMALL_MODEL_PARAMETERS, choose_threads

    cpu = torch.device("cpu")
    assert choose_threads(None, 35, cpu) == 1
    assert choose_threads(3, 35, cpu) == 3
    torch.set_num_threads(2)
    assert choose_threads(None, SMALL_MODEL_PARAMETERS, cpu) == 2
    code, out, _ = run_cli(
        ["--model", "tiny_factories:classifier", "--quantities", "eigs", "-k", "2",
         "--no-progress", "--no-plot"],
        capsys,
    )  # fmt: skip
    assert code == 0
    assert "threads     1 (the default below 1M parameters" in out
    assert torch.get_num_threads() == 2  # main() leaves the caller's setting as it was
