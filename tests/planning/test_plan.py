"""The planner on tiny Llama configs: parameter counts against the real model, the depth and
micro-batch extrapolation against a full meta rehearsal, the choices it makes against its own
budget, the advice it gives against a plan that follows it, and its refusals of bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from torch_linop.planning import Plan, footprint, plan, rehearse

MIB = 2**20


def tiny_config(num_layers: int = 3, tie: bool = False) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        tie_word_embeddings=tie,
        max_position_embeddings=64,
    )


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_is_the_real_models(tie: bool) -> None:
    config = tiny_config(tie=tie)
    real = LlamaForCausalLM(config)
    expected = sum(param.numel() for param in real.parameters())  # tied: counted once
    result = plan(config, seq_len=16, dtype=torch.float32, device_memory=None)
    assert result.num_params == expected
    assert result.parameter_bytes == expected * 4


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_two_layer_extrapolation_matches_a_full_rehearsal(curvature: str) -> None:
    config = tiny_config(num_layers=3)
    fit = footprint(config, curvature, seq_len=16, dtype=torch.float32)
    full = rehearse(config, curvature, micro_batch=3, seq_len=16, dtype=torch.float32)
    assert abs(fit.workspace(3, 3) - full.peak) <= 0.05 * full.peak


def test_fsdp_shards_parameters_and_vectors() -> None:
    config = tiny_config()
    single = plan(config, seq_len=16, dtype=torch.float32, device_memory=None)
    sharded = plan(config, world_size=4, seq_len=16, dtype=torch.float32, device_memory=None)
    assert sharded.parameter_bytes == -(-single.num_params // 4) * 4
    assert sharded.vector_bytes == sharded.parameter_bytes
    assert sharded.gathered_bytes > 0 and single.gathered_bytes == 0
    assert sharded.basis_bytes == sharded.basis_vectors * sharded.parameter_bytes


def test_picks_the_largest_micro_batch_that_fits_next_to_the_basis() -> None:
    config = tiny_config()
    kwargs = dict(seq_len=16, tokens_per_rank=16 * 8, dtype=torch.float32, k=2)
    at_four = plan(config, device_memory=None, micro_batch=4, **kwargs)
    at_five = plan(config, device_memory=None, micro_batch=5, **kwargs)
    assert at_five.product_peak_bytes > at_four.product_peak_bytes
    needed = at_four.product_peak_bytes + at_four.basis_bytes  # the wanted basis at 4 sequences
    chosen = plan(config, device_memory=int(needed / 0.9) + 1, **kwargs)
    assert chosen.fits and chosen.micro_batch == 4
    assert chosen.basis_vectors == chosen.basis_wanted
    assert chosen.num_micro_batches == 2
    assert chosen.device_peak_bytes == needed


def test_advice_for_a_product_that_does_not_fit_works() -> None:
    config = tiny_config(num_layers=4)
    kwargs = dict(seq_len=64, dtype=torch.float32, basis_device="cpu", host_memory=None)
    roomy = plan(config, device_memory=None, **kwargs)
    tight = int(0.8 * roomy.product_peak_bytes / 0.9)
    refused = plan(config, device_memory=tight, **kwargs)
    assert not refused.fits
    (problem,) = refused.problems
    assert "activation_checkpointing=True" in problem
    followed = plan(config, device_memory=tight, activation_checkpointing=True, **kwargs)
    assert followed.fits
    assert followed.workspace_bytes < refused.workspace_bytes


def test_advice_for_a_basis_that_does_not_fit_works() -> None:
    config = tiny_config()
    kwargs = dict(seq_len=16, dtype=torch.float32, k=10)
    roomy = plan(config, device_memory=None, **kwargs)
    # room for the product and 8 float32 vectors: fewer than k + 2 = 12
    tight = int((roomy.product_peak_bytes + 8 * roomy.parameter_bytes) / 0.9)
    refused = plan(config, device_memory=tight, **kwargs)
    assert refused.basis_vectors == 8 and not refused.fits
    assert "basis_device='cpu'" in refused.problems[0]
    assert "basis_dtype=torch.bfloat16" in refused.problems[0]
    on_host = plan(config, device_memory=tight, basis_device="cpu", **kwargs)
    in_bf16 = plan(config, device_memory=tight, basis_dtype=torch.bfloat16, **kwargs)
    assert on_host.fits and in_bf16.fits and in_bf16.basis_vectors >= 12


def test_table_renders_one_row() -> None:
    result = plan(tiny_config(), seq_len=16, dtype=torch.float32, device_memory=10**9)
    lines = result.table().splitlines()
    assert lines[0] == Plan.header().splitlines()[0]
    assert len(lines) == 3 and lines[2].count("|") == lines[0].count("|")
    assert "hessian" in lines[2] and lines[2].endswith("| yes |")


def test_bad_input_is_refused_with_the_fix() -> None:
    config = tiny_config()
    with pytest.raises(ValueError, match="curvature must be one of"):
        plan(config, curvature="fisher")
    with pytest.raises(ValueError, match="micro_batch=3 sequences must be in"):
        plan(config, seq_len=16, tokens_per_rank=32, micro_batch=3)
    with pytest.raises(ValueError, match="basis_device"):
        plan(config, basis_device="disk")
    with pytest.raises(ValueError, match="unknown model 'llama-8b'"):
        plan("llama-8b")
    with pytest.raises(TypeError, match="HuggingFace causal LM"):
        plan(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_meta_rehearsal_allocates_what_a_real_cpu_product_allocates(curvature: str) -> None:
    """The rehearsal's meta kernels create the storages the CPU kernels create: the same counter
    over a real float32 product on CPU (random weights and tokens) gives the same peak."""
    from torch_linop import GGNOperator, HessianOperator, hf_lm_loss
    from torch_linop.planning import LiveBytes

    config = tiny_config()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": tokens}
    operator_class = HessianOperator if curvature == "hessian" else GGNOperator
    operator = operator_class(model, [batch], hf_lm_loss())
    vector = torch.randn(operator.shape[0], 1, generator=torch.Generator().manual_seed(2))
    operator @ vector  # probes the capabilities once, as the rehearsal's first product does
    with LiveBytes(devices=("cpu",)) as counter:
        tangents = operator._split_columns(vector)
        with operator._product_context():
            pieces = operator.batch_product(batch, tangents)
        joined = torch.cat([piece.reshape(1, -1) for piece in pieces], dim=1).T
        del pieces, joined
    rehearsed = rehearse(config, curvature, micro_batch=3, seq_len=16, dtype=torch.float32)
    assert counter.peak == rehearsed.peak
