"""docs/errors.md is checked against the code: every row of its tables (id, call, exception,
message fragment, fix) is run here from the registry below, and must raise that exception with
that fragment in its message (CLI rows: exit code 2 and the fragment on stderr). A documented
id without a check, or a check without a documented id, fails the test."""

from __future__ import annotations

import builtins
import functools
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import (
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    MCFisherOperator,
    ProductOptions,
    ce_hvp,
    hf_classification_loss,
    hf_masked_lm_loss,
    hf_seq2seq_loss,
    match_names,
    supervised_loss,
)
from torch_linop.cli import main as cli_main
from torch_linop.solvers import diagonal, lanczos, power_iteration, spectral_density, trace

# torch's forward-mode AD loads TorchScript decompositions on first use and warns about it
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)
DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
ROW = re.compile(
    r"^\|\s*`(?P<id>[a-z0-9-]+)`\s*\|(?P<call>[^|]+)\|\s*(?P<raises>[^|]+?)\s*\|"
    r"\s*`(?P<message>[^`]+)`\s*\|(?P<fix>[^|]+)\|\s*$"
)
DTYPE = torch.float64

# --------------------------------------------------------------------------- shared inputs


def mlp() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)


def batches(num: int = 2, nan: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    data = []
    for _ in range(num):
        inputs = torch.randn(5, 4, generator=generator, dtype=DTYPE)
        data.append((inputs * float("nan") if nan else inputs, torch.randint(0, 3, (5,))))
    return data


CE = supervised_loss(F.cross_entropy)
SIZE = 43  # parameters of mlp()


def hessian(**kwargs) -> HessianOperator:
    return HessianOperator(mlp(), batches(), CE, **kwargs)


def spd(n: int = 10) -> np.ndarray:
    return np.diag(np.arange(1.0, n + 1))


class OnePass:
    """Re-iterable in form only: ``iter()`` hands out the same iterator, empty after one pass."""

    def __init__(self, data: list) -> None:
        self.iterator = iter(data)

    def __iter__(self):
        return self.iterator


def out_of_memory(*_):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")


def checkpoint_of(tmp_path: Path, **kwargs) -> Path:
    """A checkpoint of lanczos(spd(), 2, seed=0) (or another run, by kwargs)."""
    path = tmp_path / "run.pt"
    options = {"seed": 0, **kwargs}
    lanczos(spd(), 2, checkpoint=path, checkpoint_every=1, **options)
    return path


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Check:
    run: Callable[[Path], object] | None = None  # raises; gets a temporary folder
    cli_args: tuple[str, ...] | None = None  # or: a command line that must exit with 2


REGISTRY: dict[str, Check] = {}


def case(identifier: str) -> Callable[[Callable[[Path], object]], Callable[[Path], object]]:
    def register(function: Callable[[Path], object]) -> Callable[[Path], object]:
        assert identifier not in REGISTRY, identifier
        REGISTRY[identifier] = Check(run=function)
        return function

    return register


def cli_case(identifier: str, *args: str) -> None:
    assert identifier not in REGISTRY, identifier
    REGISTRY[identifier] = Check(cli_args=args)


def simple(identifier: str, call: Callable[[], object]) -> None:
    case(identifier)(lambda _tmp: call())


# operators: model, parameters, options
simple("op-no-parameters", lambda: HessianOperator(nn.Tanh(), batches(), CE))
simple("op-nothing-selected", lambda: hessian(param_filter=match_names("encoder.*")))
simple("op-param-filter-not-callable", lambda: hessian(param_filter="0.*"))
simple("op-model-not-module", lambda: HessianOperator(lambda x: x, batches(), CE))
simple(
    "op-mixed-dtypes",
    lambda: HessianOperator(
        nn.Sequential(nn.Linear(4, 5).double(), nn.Linear(5, 3)), batches(), CE
    ),
)
simple(
    "op-mixed-devices",
    lambda: HessianOperator(
        nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3, device="meta")), batches(), CE
    ),
)
simple("op-unknown-method", lambda: hessian(method="exact"))
simple("op-cache-graph-method", lambda: hessian(method="forward", cache_graph=True))
simple("op-cache-graph-type", lambda: hessian(cache_graph=1))
simple(
    "op-cuda-graph-needs-cache",
    lambda: GGNOperator(mlp(), batches(), CE, options=ProductOptions(cuda_graph=True)),
)
simple(
    "op-cuda-graph-device",
    lambda: GGNOperator(
        mlp(), batches(), CE, cache_graph=True, options=ProductOptions(cuda_graph=True)
    ),
)
simple(
    "op-cuda-graph-difference",
    lambda: GGNOperator(
        mlp(),
        batches(),
        CE,
        jvp_method="forward_difference",
        cache_graph=True,
        options=ProductOptions(cuda_graph=True),
    ),
)
simple(
    "op-cuda-graph-mc-fisher",
    lambda: MCFisherOperator(
        mlp(), batches(), CE, cache_graph=True, options=ProductOptions(cuda_graph=True)
    ),
)
simple("op-unknown-jvp-method", lambda: GGNOperator(mlp(), batches(), CE, jvp_method="reverse"))
simple("op-mc-samples", lambda: MCFisherOperator(mlp(), batches(), CE, mc_samples=0))
simple("op-num-batches", lambda: hessian(options=ProductOptions(num_batches=0)))
simple("op-num-data", lambda: hessian(options=ProductOptions(num_data=0)))
simple("op-options-type", lambda: hessian(options={"num_data": 8}))
simple(
    "op-options-and-old-keyword",
    lambda: hessian(num_data=8, options=ProductOptions(num_batches=1)),
)
simple(
    "op-dropout-train-mode",
    lambda: HessianOperator(
        nn.Sequential(mlp(), nn.Dropout(0.5)).train(),
        batches(),
        CE,
        options=ProductOptions(check_deterministic=True),
    ),
)
simple(
    "op-nondeterministic",
    lambda: HessianOperator(nn.Sequential(mlp(), nn.Dropout(0.5)).train(), batches(), CE),
)


def weight_normed_mlp() -> nn.Module:
    model = mlp()
    model[0] = torch.nn.utils.parametrizations.weight_norm(model[0])
    return model


simple("op-weight-norm-hessian", lambda: HessianOperator(weight_normed_mlp(), batches(), CE))


def tied_padding_lm() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        embed = nn.Embedding(6, 3, padding_idx=0)
        head = nn.Linear(3, 6, bias=False)
    head.weight = embed.weight
    return nn.Sequential(embed, nn.Tanh(), head).to(DTYPE)


TOKEN_DATA = [(torch.tensor([0, 2, 3, 1]), torch.tensor([2, 3, 1, 4]))]
simple("op-tied-padding-row", lambda: GGNOperator(tied_padding_lm(), TOKEN_DATA, CE))


@case("op-not-symmetric")
def _(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the op-weight-norm-hessian warning
        operator = HessianOperator(weight_normed_mlp(), batches(), CE)
    operator.check_symmetric()


# losses
simple("op-criterion-module", lambda: HessianOperator(mlp(), batches(), nn.CrossEntropyLoss()))
simple(
    "op-ggn-plain-callable",
    lambda: GGNOperator(mlp(), batches(), lambda model, batch: model(batch[0]).sum()),
)
simple("op-reduction-none", lambda: supervised_loss(nn.MSELoss(reduction="none")))
simple(
    "op-reduction-batchmean",
    lambda: supervised_loss(functools.partial(F.kl_div, reduction="batchmean")),
)
simple(
    "op-mc-fisher-no-sampler",
    lambda: (
        MCFisherOperator(mlp(), batches(), supervised_loss(F.l1_loss))
        @ torch.ones(SIZE, dtype=DTYPE)
    ),
)
CLASS_WEIGHTED = supervised_loss(nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.0])))
simple(
    "op-ef-class-weights",
    lambda: (
        EmpiricalFisherOperator(mlp(), batches(), CLASS_WEIGHTED) @ torch.ones(SIZE, dtype=DTYPE)
    ),
)
simple(
    "op-class-weights-zero",
    lambda: (
        HessianOperator(mlp(), [(x, torch.full_like(y, 2)) for x, y in batches()], CLASS_WEIGHTED)
        @ torch.ones(SIZE, dtype=DTYPE)
    ),
)


@case("op-class-weights-process-group")
def _(tmp_path: Path) -> None:
    from unittest import mock

    operator = HessianOperator(mlp(), batches(), CLASS_WEIGHTED)
    # as if torch.distributed were initialised: the total class weight is the first collective
    with mock.patch("torch_linop.data_parallel.resolve", return_value=object()):
        operator._total_mass()


def tiny_bert(model_class_name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=13,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=3,
    )
    return getattr(transformers, model_class_name)(config).eval()


TOKENS = torch.ones(2, 4, dtype=torch.long)
simple(
    "loss-seq2seq-encoder-only",
    lambda: hf_seq2seq_loss()(
        tiny_bert("BertForMaskedLM"), {"input_ids": TOKENS, "labels": TOKENS}
    ),
)
simple(
    "loss-classification-float-labels",
    lambda: hf_classification_loss()(
        tiny_bert("BertForSequenceClassification"),
        {"input_ids": TOKENS, "labels": torch.zeros(2)},
    ),
)
simple(
    "loss-masked-lm-label-shape",
    lambda: hf_masked_lm_loss()(
        tiny_bert("BertForMaskedLM"), {"input_ids": TOKENS, "labels": TOKENS[:, :3]}
    ),
)
simple(
    "op-ef-no-per-sample-losses",
    lambda: (
        EmpiricalFisherOperator(
            mlp(), batches(), lambda m, b: m(b[0]), lambda out, b: F.cross_entropy(out, b[1])
        )
        @ torch.ones(SIZE, dtype=DTYPE)
    ),
)
simple(
    "op-target-shape",
    lambda: (
        HessianOperator(
            nn.Linear(4, 1).double(),
            [(torch.zeros(5, 4, dtype=DTYPE), torch.zeros(5, dtype=DTYPE))],
            supervised_loss(F.mse_loss),
        )
        @ torch.ones(5, dtype=DTYPE)
    ),
)
simple(
    "op-batch-layout",
    lambda: HessianOperator(mlp(), [batches()[0][0]], CE) @ torch.ones(SIZE, dtype=DTYPE),
)
simple(
    "op-loss-not-scalar",
    lambda: (
        HessianOperator(
            mlp(), batches(), lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")
        )
        @ torch.ones(SIZE, dtype=DTYPE)
    ),
)
simple(
    "op-loss-not-tensor",
    lambda: HessianOperator(mlp(), batches(), lambda m, b: 1.0) @ torch.ones(SIZE, dtype=DTYPE),
)
simple(
    "op-loss-integer",
    lambda: (
        HessianOperator(mlp(), batches(), lambda m, b: torch.tensor(1))
        @ torch.ones(SIZE, dtype=DTYPE)
    ),
)
# data
simple("op-data-tensor", lambda: HessianOperator(mlp(), batches()[0][0], CE))
simple("op-data-generator", lambda: HessianOperator(mlp(), (b for b in batches()), CE))
simple("op-data-not-iterable", lambda: HessianOperator(mlp(), None, CE))
simple("op-data-empty", lambda: HessianOperator(mlp(), [], CE))
simple(
    "op-data-exhausted",
    lambda: HessianOperator(mlp(), OnePass(batches()), CE) @ torch.ones(SIZE, dtype=DTYPE),
)
simple(
    "op-batch-size-fn",
    lambda: (
        hessian(options=ProductOptions(batch_size_fn=lambda batch: -1))
        @ torch.ones(SIZE, dtype=DTYPE)
    ),
)
simple(
    "op-no-samples",
    lambda: (
        HessianOperator(mlp(), [(x, torch.full_like(y, -100)) for x, y in batches()], CE)
        @ torch.ones(SIZE, dtype=DTYPE)
    ),
)
simple(
    "op-nan-data-loss",
    lambda: HessianOperator(mlp(), batches(nan=True), CE) @ torch.ones(SIZE, dtype=DTYPE),
)
simple(
    "op-nan-data-product",
    lambda: GGNOperator(mlp(), batches(nan=True), CE) @ torch.ones(SIZE, dtype=DTYPE),
)
# vectors
simple("op-vector-length", lambda: hessian() @ torch.zeros(7, dtype=DTYPE))
simple("op-ndarray-length", lambda: hessian().matvec(np.zeros(7)))
simple(
    "op-data-dtype",
    lambda: (
        HessianOperator(mlp(), [(x.float(), y) for x, y in batches()], CE)
        @ torch.ones(SIZE, dtype=DTYPE)
    ),
)
simple("op-vector-dtype", lambda: hessian() @ torch.zeros(SIZE, dtype=torch.float32))
simple("op-vector-device", lambda: hessian() @ torch.zeros(SIZE, dtype=DTYPE, device="meta"))
simple(
    "op-vector-nan",
    lambda: hessian() @ torch.full((SIZE,), float("nan"), dtype=DTYPE),
)
simple("op-vector-complex", lambda: hessian().matvec(np.zeros(SIZE, dtype=np.complex128)))
simple("op-matvec-of-a-matrix", lambda: hessian().matvec(torch.zeros(SIZE, 2, dtype=DTYPE)))
simple("op-matmat-of-a-vector", lambda: hessian().matmat(torch.zeros(SIZE, dtype=DTYPE)))


@case("op-out-of-memory")
def _(tmp_path: Path) -> None:
    model = mlp()
    model[0].register_forward_hook(out_of_memory)
    HessianOperator(model, batches(), CE) @ torch.ones(SIZE, dtype=DTYPE)


# solvers
simple("solver-k-too-large", lambda: lanczos(spd(), 10))
simple("solver-k-zero", lambda: lanczos(spd(), 0))
simple("solver-tol", lambda: lanczos(spd(), 2, tol=0.0))
simple("solver-which", lambda: lanczos(spd(), 2, which="LR"))
simple("solver-zero-budget", lambda: lanczos(spd(), 2, max_matvecs=0))
simple("solver-basis-too-small", lambda: lanczos(spd(), 2, max_basis=3))
simple("solver-basis-dtype", lambda: lanczos(spd(), 2, basis_dtype=torch.int32))
simple("solver-basis-device", lambda: lanczos(spd(), 2, basis_device="gpu"))
simple("solver-return-eigenvectors", lambda: lanczos(spd(), 2, return_eigenvectors="no"))
simple("solver-not-square", lambda: lanczos(np.ones((3, 4)), 1))
simple("solver-complex", lambda: lanczos(spd().astype(np.complex128), 1))
simple("solver-not-symmetric", lambda: lanczos(np.triu(np.ones((10, 10))), 1))
simple("solver-unsupported-type", lambda: lanczos([[1.0, 0.0], [0.0, 2.0]], 1))
simple("solver-non-finite-operator", lambda: lanczos(spd() * np.nan, 1))


@case("solver-irreproducible-products")
def _(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    model = model.to(DTYPE).train()
    inputs = torch.randn(20, 4, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    labels = torch.arange(20) % 3
    shuffled = DataLoader(TensorDataset(inputs, labels), batch_size=5, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the op-nondeterministic warning
        operator = HessianOperator(model, shuffled, CE)
    lanczos(operator, 2, seed=0, max_matvecs=12, tol=1e-10)


simple("solver-seed", lambda: lanczos(spd(), 2, seed=1.5))
simple("solver-progress", lambda: lanczos(spd(), 2, progress="yes"))
simple("solver-trace-zero-budget", lambda: trace(spd(), 0))
simple("solver-trace-sketch-too-big", lambda: trace(spd(), 100))
simple("solver-trace-method", lambda: trace(spd(), 10, method="hutch"))
simple("solver-distribution", lambda: trace(spd(), 10, distribution="normal"))
simple("solver-block-size", lambda: diagonal(spd(), 10, block_size=0))
simple("solver-slq-steps", lambda: spectral_density(spd(), lanczos_steps=11))
simple("solver-slq-sigma", lambda: spectral_density(spd(), lanczos_steps=5, sigma=-1.0))
simple("solver-power-momentum", lambda: power_iteration(spd(), momentum=-1.0))
simple("solver-power-max-iter", lambda: power_iteration(spd(), max_iter=0))
# checkpoints
case("checkpoint-other-options")(
    lambda tmp: lanczos(spd(), 2, seed=1, checkpoint=checkpoint_of(tmp))
)
case("checkpoint-other-solver")(lambda tmp: trace(spd(), 10, checkpoint=checkpoint_of(tmp)))
case("checkpoint-other-operator")(
    lambda tmp: lanczos(2 * spd(), 2, seed=0, checkpoint=checkpoint_of(tmp))
)
case("checkpoint-interval")(
    lambda tmp: lanczos(spd(), 2, checkpoint=tmp / "run.pt", checkpoint_every=0)
)
case("checkpoint-missing-folder")(lambda tmp: lanczos(spd(), 2, checkpoint=tmp / "no" / "run.pt"))
case("checkpoint-is-folder")(lambda tmp: lanczos(spd(), 2, checkpoint=tmp))


@case("checkpoint-other-model-state")
def _(tmp_path: Path) -> None:
    path = tmp_path / "run.pt"
    lanczos(hessian(), 2, seed=0, checkpoint=path, checkpoint_every=1)
    trained = mlp()
    with torch.no_grad():
        trained[0].weight.add_(1e-3)  # another model state: same names and shapes
    lanczos(HessianOperator(trained, batches(), CE), 2, seed=0, checkpoint=path)


@case("checkpoint-corrupt")
def _(tmp_path: Path) -> None:
    path = checkpoint_of(tmp_path)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    lanczos(spd(), 2, seed=0, checkpoint=path)


@case("checkpoint-foreign-file")
def _(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    lanczos(spd(), 2, seed=0, checkpoint=path)


# kernels
LOGITS, TANGENT = torch.randn(4, 5), torch.randn(4, 5)
simple("kernel-shape", lambda: ce_hvp(LOGITS, torch.randn(4, 6)))
simple("kernel-dtype", lambda: ce_hvp(LOGITS.long(), TANGENT))
simple("kernel-logits-rank", lambda: ce_hvp(LOGITS[0], TANGENT[0]))
simple("kernel-not-tensor", lambda: ce_hvp(LOGITS.numpy(), TANGENT))
simple("kernel-device", lambda: ce_hvp(LOGITS, TANGENT.to("meta")))
simple("kernel-label-dtype", lambda: ce_hvp(LOGITS, TANGENT, torch.zeros(4)))
simple("kernel-label-shape", lambda: ce_hvp(LOGITS, TANGENT, torch.zeros(5, dtype=torch.long)))
simple("kernel-reduction", lambda: ce_hvp(LOGITS, TANGENT, reduction="none"))
simple("kernel-backend", lambda: ce_hvp(LOGITS, TANGENT, backend="cuda"))
# command line
cli_case("cli-unknown-option", "--no-such-option")
cli_case("cli-quantity", "--quantities", "eigs,spectrum")
cli_case("cli-top-k", "-k", "0")
cli_case("cli-curvature", "--curvature", "laplacian")
cli_case("cli-dtype", "--dtype", "float8")
cli_case("cli-hf-random-init", "--hf-random-init")
cli_case("cli-model-module", "--model", "no_such_module_xyz:build")
cli_case("cli-model-spec", "--model", "no_colon_here")
cli_case("cli-device", "--device", "tpu:9")
cli_case("cli-param-filter", "--param-filter", "encoder.*")
cli_case("cli-top-k-limit", "-k", "5000")
cli_case("cli-output-dir", "--output-dir", "/dev/null/plots")
cli_case("cli-json-path", "--json", "/dev/null/out.json")

# --------------------------------------------------------------------------- the tests


@dataclass(frozen=True)
class Row:
    identifier: str
    call: str
    raises: str
    message: str
    fix: str


def documented_rows() -> list[Row]:
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            rows.append(
                Row(
                    match["id"],
                    match["call"].strip(),
                    match["raises"].strip().strip("`"),
                    match["message"],
                    match["fix"].strip(),
                )
            )
    return rows


ROWS = documented_rows()


def exception_class(name: str) -> type[BaseException]:
    if name == "torch.OutOfMemoryError":
        return torch.OutOfMemoryError
    found = getattr(builtins, name, None)
    assert isinstance(found, type) and issubclass(found, BaseException), name
    return found


def warning_class(name: str) -> type[Warning] | None:
    """The warning class of a row that documents a warning (UserWarning, RuntimeWarning)."""
    found = getattr(builtins, name, None)
    return found if isinstance(found, type) and issubclass(found, Warning) else None


def test_catalogue_and_registry_match():
    ids = [row.identifier for row in ROWS]
    assert len(ids) == len(set(ids)), "duplicate ids in docs/errors.md"
    assert len(ids) >= 25
    undocumented = sorted(set(REGISTRY) - set(ids))
    unchecked = sorted(set(ids) - set(REGISTRY))
    assert not undocumented, f"checks missing from docs/errors.md: {undocumented}"
    assert not unchecked, f"documented errors without a check: {unchecked}"
    for row in ROWS:
        assert row.call and row.fix, row.identifier
        is_cli = REGISTRY[row.identifier].cli_args is not None
        assert (row.raises == "exit 2") is is_cli, row.identifier


@pytest.mark.parametrize("row", ROWS, ids=[row.identifier for row in ROWS])
def test_documented_error(row: Row, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    check = REGISTRY.get(row.identifier)
    if check is None:
        pytest.fail(f"{row.identifier} is documented but has no check in this file")
    if check.cli_args is not None:
        try:
            code = cli_main(list(check.cli_args))
        except SystemExit as exit_:
            code = exit_.code
        assert code == 2
        assert row.message in capsys.readouterr().err
        return
    assert check.run is not None
    warning = warning_class(row.raises)
    if warning is not None:
        with pytest.warns(warning) as record:
            check.run(tmp_path)
        assert any(row.message in str(w.message) for w in record), [str(w.message) for w in record]
        return
    with pytest.raises(exception_class(row.raises)) as raised:
        check.run(tmp_path)
    assert row.message in str(raised.value)


def test_python_m_torch_linop_exits_2_on_bad_options():
    """The real entry point (a fresh interpreter), not only ``main()``."""
    result = subprocess.run(
        [sys.executable, "-m", "torch_linop", "--quantities", "spectrum"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "unknown quantity spectrum" in result.stderr
