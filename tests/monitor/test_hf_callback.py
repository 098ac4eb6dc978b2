"""CurvatureCallback inside ``Trainer.train()`` on a tiny GPT-2 built from a config: its
``curvature/...`` keys reach ``trainer.state.log_history``, and the logged sharpness is the
monitor's record, itself checked against a fresh Lanczos run at the final parameters."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

from torch_linop import HessianOperator, hf_lm_loss, lanczos  # noqa: E402
from torch_linop.monitor import CurvatureCallback  # noqa: E402


def test_callback_logs_through_the_trainer(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (16, 8), generator=generator)
    examples = [{"input_ids": row, "labels": row} for row in tokens]
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=4,
        per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=100,
        save_strategy="no", disable_tqdm=True, lr_scheduler_type="constant",
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=examples)
    callback = CurvatureCallback(
        examples=examples[:8], batch_size=4, every=2, preconditioned=True, max_matvecs=200
    ).attach(trainer)
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "curvature/top_eigenvalue" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    for key in ("curvature/preconditioned_top_eigenvalue", "curvature/threshold_2_over_lr",
                "curvature/threshold_adam", "curvature/matvecs", "curvature/converged"):  # fmt: skip
        assert key in logged[-1], key
    monitor = callback.monitor
    assert monitor is not None and len(monitor.history) == 2
    last = monitor.history[-1]
    assert logged[-1]["curvature/top_eigenvalue"] == last.values["top_eigenvalue"][0]
    assert last.all_converged
    # the last check ran at the final parameters: an independent cold Lanczos agrees
    model.eval()
    operator = HessianOperator(model, monitor.data, hf_lm_loss())
    fresh = lanczos(operator, k=1, which="LA", tol=1e-4, seed=1)
    assert last.values["top_eigenvalue"][0] == pytest.approx(fresh.eigenvalues[0], rel=1e-3)


def test_callback_without_attach_says_how() -> None:
    callback = CurvatureCallback(data=[{"input_ids": torch.zeros(1, 2, dtype=torch.long)}], every=1)
    state = type("State", (), {"global_step": 1})()
    with pytest.raises(RuntimeError, match="attach"):
        callback.on_step_end(None, state, None)
