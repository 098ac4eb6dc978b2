"""CurvatureMonitor against dense float64 truths on a tiny MLP trained with Adam: the recorded
sharpness and preconditioned sharpness at every check, what a check leaves untouched, warm vs
cold product counts, the product budget, and the history's JSON round trip."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from torch_linop import supervised_loss
from torch_linop.monitor import CurvatureMonitor, adam_threshold, load_history
from torch_linop.reference import dense_hessian

LOSS = supervised_loss(nn.functional.cross_entropy)


def make_problem(seed: int = 0, dropout: bool = False):
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 6), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(0.5))
    model = nn.Sequential(*layers, nn.Linear(6, 3)).double()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
    x = torch.randn(48, 4, generator=generator, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    data = [(x[:24], y[:24]), (x[24:], y[24:])]
    return model, data


def train_step(model, data, optimizer) -> None:
    optimizer.zero_grad()
    total = sum(LOSS(model, batch) * len(batch[1]) for batch in data) / 48
    total.backward()
    optimizer.step()


def dense_preconditioned(model, data, optimizer) -> np.ndarray:
    """P^-1/2 H P^-1/2 with P = sqrt(v / (1 - beta2^t)) + eps written out from the state."""
    hessian = dense_hessian(model, data, LOSS)
    (_beta1, beta2), eps = optimizer.param_groups[0]["betas"], optimizer.param_groups[0]["eps"]
    pieces = []
    for param in model.parameters():
        state = optimizer.state[param]
        v_hat = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
        pieces.append((v_hat.sqrt() + eps).reshape(-1))
    scale = torch.cat(pieces).rsqrt()
    return (scale[:, None] * hessian * scale[None, :]).numpy()


def test_each_check_equals_dense_eigvalsh() -> None:
    model, data = make_problem()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    monitor = CurvatureMonitor(
        model, data, LOSS, every=2, optimizer=optimizer, preconditioned=True, tol=1e-10
    )
    checked = 0
    for step in range(1, 9):
        train_step(model, data, optimizer)
        record = monitor.step(step)
        if record is None:
            continue
        checked += 1
        truth = np.linalg.eigvalsh(dense_hessian(model, data, LOSS).numpy())[-1]
        truth_pre = np.linalg.eigvalsh(dense_preconditioned(model, data, optimizer))[-1]
        assert record.converged == {"top_eigenvalue": True, "preconditioned_top_eigenvalue": True}
        assert abs(record.values["top_eigenvalue"][0] - truth) <= 1e-8 * abs(truth)
        pre = record.values["preconditioned_top_eigenvalue"][0]
        assert abs(pre - truth_pre) <= 1e-8 * abs(truth_pre)
        assert record.thresholds["2/lr"] == pytest.approx(2 / 0.05)
        assert record.thresholds["adam"] == pytest.approx(3.8 / 0.1 / 0.05)
    assert checked == 4 and [r.step for r in monitor.history] == [2, 4, 6, 8]
    assert [r.warm_started["top_eigenvalue"] for r in monitor.history] == [False, True, True, True]


def test_trace_is_within_its_error_bar_of_the_dense_trace() -> None:
    model, data = make_problem(1)
    monitor = CurvatureMonitor(model, data, LOSS, quantities=("trace",), trace_matvecs=60)
    record = monitor.check(0)
    truth = float(torch.trace(dense_hessian(model, data, LOSS)))
    # n = 51 and 60 Hutch++ products: the sketch captures the whole space, exact up to rounding
    assert abs(record.values["trace"][0] - truth) <= 4 * record.stderr["trace"] + 1e-8 * abs(truth)


def test_a_check_leaves_model_optimizer_and_rng_untouched() -> None:
    model, data = make_problem(2, dropout=True)
    model.train()
    model[0].eval()  # a mixed mode must come back as it was
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    train_step(model, data, optimizer)  # leaves .grad set, and Adam state
    monitor = CurvatureMonitor(
        model, data, LOSS, optimizer=optimizer, quantities=("top_eigenvalue", "trace"),
        preconditioned=True, cache_graph=True,
    )  # fmt: skip
    params = copy.deepcopy(model.state_dict())
    grads = [param.grad.clone() for param in model.parameters()]
    modes = [module.training for module in model.modules()]
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    rng = torch.get_rng_state()
    monitor.check(1)
    for name, value in model.state_dict().items():
        assert torch.equal(value, params[name]), name
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert [module.training for module in model.modules()] == modes
    after = optimizer.state_dict()
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(after["state"][index][key]), torch.as_tensor(value))
    assert after["param_groups"] == optimizer_state["param_groups"]
    assert torch.equal(torch.get_rng_state(), rng)


def test_modes_and_rng_restored_when_a_check_raises() -> None:
    model, data = make_problem(3, dropout=True)
    model.train()

    def failing_loss(model, batch):
        raise RuntimeError("boom")

    rng = torch.get_rng_state()
    monitor = CurvatureMonitor(model, data, failing_loss)
    with pytest.raises(RuntimeError, match="boom"):
        monitor.check(0)
    assert all(module.training for module in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


def test_warm_starts_spend_fewer_products_than_cold_starts() -> None:
    model, data = make_problem(4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):  # a trained model: later steps move the eigenvectors little
        train_step(model, data, optimizer)
    optimizer.param_groups[0]["lr"] = 1e-3
    kwargs = dict(every=5, optimizer=optimizer, preconditioned=True, cold_every=None)
    warm = CurvatureMonitor(model, data, LOSS, **kwargs)
    cold = CurvatureMonitor(model, data, LOSS, warm_start=False, **kwargs)
    for step in range(1, 21):
        train_step(model, data, optimizer)
        warm.step(step)
        cold.step(step)
    for name in ("top_eigenvalue", "preconditioned_top_eigenvalue"):
        warm_products = [record.num_matvecs[name] for record in warm.history[1:]]
        cold_products = [record.num_matvecs[name] for record in cold.history[1:]]
        assert sum(warm_products) < sum(cold_products), (name, warm_products, cold_products)
        for ours, theirs in zip(warm.history, cold.history):
            assert ours.values[name][0] == pytest.approx(theirs.values[name][0], rel=1e-6)


def test_top_k_block_warm_start_matches_dense() -> None:
    model, data = make_problem(5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = CurvatureMonitor(model, data, LOSS, k=3, every=1, tol=1e-10, optimizer=optimizer)
    for step in range(1, 3):
        train_step(model, data, optimizer)
        record = monitor.step(step)
        truth = np.linalg.eigvalsh(dense_hessian(model, data, LOSS).numpy())[::-1][:3]
        np.testing.assert_allclose(record.values["top_eigenvalue"], truth, rtol=1e-8)
    assert monitor.history[-1].warm_started["top_eigenvalue"]
    assert "adam" not in monitor.history[-1].thresholds  # SGD: only 2/lr
    assert monitor.history[-1].thresholds["2/lr"] == pytest.approx(200.0)


def test_budget_exhausted_warns_and_flags_unconverged() -> None:
    model, data = make_problem(6)
    monitor = CurvatureMonitor(model, data, LOSS, tol=1e-12, max_matvecs=2)
    with pytest.warns(RuntimeWarning, match="did not converge within max_matvecs=2"):
        record = monitor.check(0)
    assert record.converged["top_eigenvalue"] is False and not record.all_converged


def test_history_json_round_trip(tmp_path) -> None:
    model, data = make_problem(7)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    train_step(model, data, optimizer)
    monitor = CurvatureMonitor(
        model, data, LOSS, optimizer=optimizer, quantities=("top_eigenvalue", "trace"),
        preconditioned=True, every=1,
    )  # fmt: skip
    monitor.step()
    monitor.history[0].thresholds["nan_line"] = float("nan")
    monitor.save(tmp_path / "history.json")
    loaded = load_history(tmp_path / "history.json")
    assert len(loaded) == 1 and np.isnan(loaded[0].thresholds.pop("nan_line"))
    monitor.history[0].thresholds.pop("nan_line")
    assert loaded[0] == monitor.history[0]
    (tmp_path / "other.json").write_text('{"records": []}')
    with pytest.raises(ValueError, match="not a curvature history"):
        load_history(tmp_path / "other.json")


def test_plot_draws_a_panel_per_quantity_with_threshold_lines(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    model, data = make_problem(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    monitor = CurvatureMonitor(
        model, data, LOSS, every=1, optimizer=optimizer, preconditioned=True,
        quantities=("top_eigenvalue", "trace"),
    )  # fmt: skip
    for step in range(1, 3):
        train_step(model, data, optimizer)
        monitor.step(step)
    figure = monitor.plot(tmp_path / "curvature.png")
    assert len(figure.axes) == 3 and (tmp_path / "curvature.png").stat().st_size > 10_000
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert "2 / lr" in labels


def test_adam_threshold_is_where_momentum_iteration_loses_stability() -> None:
    """Closed form vs the companion matrix of x_{t+1} = (1 + b - lr (1 - b) a) x_t - b x_{t-1}."""
    lr, beta1 = 0.01, 0.9

    def spectral_radius(a: float) -> float:
        companion = np.array([[1 + beta1 - lr * (1 - beta1) * a, -beta1], [1.0, 0.0]])
        return float(np.abs(np.linalg.eigvals(companion)).max())

    threshold = adam_threshold(lr, beta1)
    assert threshold == pytest.approx(38 / lr)
    assert spectral_radius(threshold * 0.999) < 1 < spectral_radius(threshold * 1.001)


def test_bad_input_says_what_to_do() -> None:
    model, data = make_problem(9)
    with pytest.raises(ValueError, match="curvature must be one of"):
        CurvatureMonitor(model, data, LOSS, curvature="fisher")
    with pytest.raises(ValueError, match="pass optimizer="):
        CurvatureMonitor(model, data, LOSS, preconditioned=True)
    with pytest.raises(TypeError, match="Adam-type optimiser"):
        CurvatureMonitor(
            model, data, LOSS, preconditioned=True, optimizer=torch.optim.SGD(model.parameters())
        )
    with pytest.raises(ValueError, match="unknown quantities"):
        CurvatureMonitor(model, data, LOSS, quantities=("sharpness",))
    with pytest.raises(ValueError, match="every must be an int"):
        CurvatureMonitor(model, data, LOSS, every=0)
    optimizer = torch.optim.Adam(model.parameters())
    monitor = CurvatureMonitor(model, data, LOSS, optimizer=optimizer, preconditioned=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="no Adam state"):
            monitor.check(0)


def test_auto_cadence_keeps_checks_within_their_share(monkeypatch) -> None:
    """A fake clock: each training step takes 1 s, each check 1 s. With max_share=0.2 a check is
    due when (time in checks + the last check's time) <= 0.2 * the time since the first step."""
    import torch_linop.monitor.monitor as monitor_module

    now = [0.0]
    monkeypatch.setattr(monitor_module, "_clock", lambda: now[0])
    model, data = make_problem(10)
    monitor = CurvatureMonitor(model, data, LOSS, max_share=0.2)
    original = monitor._top_eigenvalues

    def one_second(*args):
        now[0] += 1.0  # inside the check: it measures 1 s
        return original(*args)

    monkeypatch.setattr(monitor, "_top_eigenvalues", one_second)
    checked = []
    for step in range(1, 41):
        now[0] += 1.0  # the training step
        if monitor.step(step) is not None:
            checked.append(step)
    # the first call (clock 1) checks; after c checks, the clock at step s reads s + c and the
    # next check is due when c + 1 <= 0.2 * (s + c - 1): s = 10, 14, 18, ...
    assert checked == [1, 10, 14, 18, 22, 26, 30, 34, 38]
    assert monitor.monitor_seconds == pytest.approx(len(checked))
    assert monitor.share == pytest.approx(9 / 48) and monitor.share <= 0.2


def test_ggn_on_a_batch_subset_equals_the_dense_ggn_of_that_subset() -> None:
    from torch_linop.reference import dense_ggn

    model, data = make_problem(11)
    monitor = CurvatureMonitor(model, data, LOSS, curvature="ggn", num_batches=1, tol=1e-10, k=2)
    record = monitor.check(0)
    truth = np.linalg.eigvalsh(dense_ggn(model, data[:1], LOSS).numpy())[::-1][:2]
    np.testing.assert_allclose(record.values["top_eigenvalue"], truth, rtol=1e-8)


@pytest.mark.parametrize("k", [1, 2])
def test_a_warm_check_at_unchanged_parameters_costs_one_block_step(k) -> None:
    """Warm checks test convergence after every block step: from Ritz vectors already converged
    at the same parameters (and no fresh directions) the first step, ``k`` products, meets tol
    and the check stops there with the dense eigenvalues; a cold check costs more."""
    model, data = make_problem(6)
    kwargs = dict(k=k, every=1, tol=1e-8, cold_every=None)
    warm = CurvatureMonitor(model, data, LOSS, fresh_weight=0.0, **kwargs)
    cold = CurvatureMonitor(model, data, LOSS, warm_start=False, **kwargs)
    for step in (1, 2):
        warm.step(step)
        cold.step(step)
    assert warm.history[1].warm_started["top_eigenvalue"]
    assert warm.history[1].num_matvecs["top_eigenvalue"] == k
    assert cold.history[1].num_matvecs["top_eigenvalue"] > k
    truth = np.linalg.eigvalsh(dense_hessian(model, data, LOSS).numpy())[::-1][:k]
    np.testing.assert_allclose(warm.history[1].values["top_eigenvalue"], truth, rtol=1e-7)
