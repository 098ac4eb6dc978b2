"""Exact products through FSDP2 on a tiny transformer (2 gloo ranks): tied input/output
embeddings, causal SDPA attention, LayerNorm and GELU, one ``fully_shard`` per block and one at
the root. The forward-mode GGN and the reverse-over-forward Hessian equal the dense torch.func
matrices of the unsharded model to rounding, also with a parameter filter that selects the tied
embedding and a LayerNorm only. These are the layers on which torch's own reverse-over-forward
derivatives are wrong (softmax: pytorch#162350, layer_norm: pytorch#196700) and on which a
per-module tangent misses tied weights, so each would show here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torch_linop import supervised_loss
from torch_linop.reference import dense_ggn, dense_hessian

# --import-mode=importlib leaves this folder off sys.path (rank processes start with it)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gloo_ranks import (  # noqa: E402
    finish_ranks,
    one_thread,
    run_rank,
    save_results,
    start_ranks,
)

WORLD = 2
VOCAB, WIDTH, LENGTH = 11, 8, 5
ROUNDING = 1e-11  # relative to the largest entry of the dense matrix
LAUNCH_TIMEOUT_S = 90.0  # a guard against hangs on a loaded machine, not a time budget
NUM_VECTORS = 3
LOSS = supervised_loss(F.cross_entropy)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.out = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.up, self.down = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden.shape
        q, k, v = self.qkv(self.norm1(hidden)).view(batch, length, 3, 2, WIDTH // 2).unbind(2)
        heads = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        hidden = hidden + self.out(heads.transpose(1, 2).reshape(batch, length, WIDTH))
        return hidden + self.down(F.gelu(self.up(self.norm2(hidden)), approximate="tanh"))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(0.1 * torch.randn(LENGTH, WIDTH))
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied, as in GPT-2

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens) + self.position
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(self.norm(hidden)).reshape(-1, VOCAB)


def make_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    data = []
    for size in (2, 1, 3):
        tokens = torch.randint(0, VOCAB, (size, LENGTH + 1), generator=generator)
        data.append((tokens[:, :-1], tokens[:, 1:].reshape(-1)))
    return data


def embedding_and_final_norm(name: str, _param: Any) -> bool:
    return name.startswith(("embed.", "norm."))


def vectors(size: int) -> torch.Tensor:
    return torch.randn(size, NUM_VECTORS, generator=torch.Generator().manual_seed(2)).double()


# ----------------------------------------------------------------------------- worker side
def worker(rank: int, world: int, out: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    from torch_linop.distributed.fsdp import FSDPGGNOperator, FSDPHessianOperator

    model = make_model()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    own = batches()[rank::world]
    ops = {
        "hessian": FSDPHessianOperator(model, own, LOSS, method="autograd"),
        "ggn": FSDPGGNOperator(model, own, LOSS),
        "hessian_filtered": FSDPHessianOperator(
            model, own, LOSS, method="autograd", param_filter=embedding_and_final_norm
        ),
    }
    results = {
        name: op.full_vector(op @ op.shard_vector(vectors(op.shape[0]))) for name, op in ops.items()
    }
    save_results(results, out, rank)


# ----------------------------------------------------------------------------- parent side
def test_exact_products_through_fsdp_on_a_transformer(tmp_path: Path) -> None:
    processes = start_ranks(__file__, WORLD, tmp_path)  # the truths are computed meanwhile
    model, data = make_model(), batches()
    with one_thread():
        truths = {
            "hessian": dense_hessian(model, data, LOSS),
            "ggn": dense_ggn(model, data, LOSS),
            "hessian_filtered": dense_hessian(
                model, data, LOSS, param_filter=embedding_and_final_norm
            ),
        }
    per_rank = finish_ranks(processes, tmp_path, LAUNCH_TIMEOUT_S, "FSDP ranks")
    tied = sum(p.numel() for p in model.parameters())  # named once: the head shares embed
    assert truths["hessian"].shape[0] == tied
    for rank, results in enumerate(per_rank):
        for name, matrix in truths.items():
            torch.testing.assert_close(
                results[name],
                matrix @ vectors(matrix.shape[0]),
                rtol=0,
                atol=ROUNDING * float(matrix.abs().max()) * NUM_VECTORS,
                msg=f"{name} on rank {rank}",
            )


if __name__ == "__main__":
    run_rank(worker, group_timeout_s=LAUNCH_TIMEOUT_S)
