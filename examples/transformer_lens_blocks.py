"""Per-block curvature of a TransformerLens model built from a config (random weights): the top
Hessian eigenvalues and the GGN trace of each transformer block, side by side.

Works with ``HookedTransformer`` (TransformerLens 2/3) and with the natively built
``TransformerBridge`` of TransformerLens 4, which names its blocks ``layers.*`` instead of
``blocks.*``. Run: ``python examples/transformer_lens_blocks.py`` (needs ``torch-linop[transformer-lens]``).
"""

import numpy as np
import torch

from torch_linop import GGNOperator, HessianOperator, lanczos, match_names, tlens_loss, trace

CONFIG = dict(
    n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=64, n_ctx=32,
    act_fn="gelu", normalization_type="LN", seed=0, device="cpu",
)  # fmt: skip


def build_model() -> torch.nn.Module:
    try:  # TransformerLens 2.x / 3.x
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        return HookedTransformer(HookedTransformerConfig(**CONFIG, dtype=torch.float64)).eval()
    except ImportError:  # TransformerLens 4: the bridge around a natively built model
        from transformer_lens import TransformerBridge, TransformerBridgeConfig
        from transformer_lens.model_bridge.sources import native  # noqa: F401 (boot_native)

        bridge = TransformerBridge.boot_native(
            TransformerBridgeConfig(**CONFIG), dtype=torch.float64
        )
        return bridge.eval()


model = build_model()
names = [name for name, _ in model.named_parameters()]
prefix = "blocks" if any(name.startswith("blocks.") for name in names) else "layers"

generator = torch.Generator().manual_seed(0)
tokens = torch.randint(0, CONFIG["d_vocab"], (8, 16), generator=generator)
data = list(tokens.split(4))  # TransformerLens batches are (batch, seq) token tensors
loss = tlens_loss()

print(f"{type(model).__name__}: {len(names)} parameter tensors, blocks named {prefix}.<i>.*")
print(f"{'block':>6} {'params':>7} {'Hessian top-3 eigenvalues':>36} {'GGN trace':>18}")
for block in range(CONFIG["n_layers"]):
    block_filter = match_names(f"{prefix}.{block}.*")
    H = HessianOperator(model, data, loss, param_filter=block_filter)
    G = GGNOperator(model, data, loss, param_filter=block_filter)
    top = lanczos(H, k=3, which="LA", seed=0)
    ggn_trace = trace(G, num_matvecs=30, seed=0)
    assert top.converged.all()
    assert ggn_trace.estimate > 0  # the GGN of cross-entropy is positive semi-definite
    values = np.array2string(top.eigenvalues, precision=4)
    print(
        f"{block:>6} {H.shape[0]:>7} {values:>36} "
        f"{ggn_trace.estimate:>9.3f} +/- {ggn_trace.stderr:.1e}"
    )

# A block's operator is the principal sub-matrix of a larger one: H_all [v; 0] restricted to
# block 0's coordinates equals H_block0 v.
H_all = HessianOperator(model, data, loss, param_filter=match_names(f"{prefix}.*"))
H_first = HessianOperator(model, data, loss, param_filter=match_names(f"{prefix}.0.*"))
v = torch.randn(H_first.shape[0], dtype=torch.float64, generator=generator)
padded = torch.cat([v, torch.zeros(H_all.shape[0] - v.numel(), dtype=torch.float64)])
assert torch.allclose((H_all @ padded)[: v.numel()], H_first @ v, rtol=1e-8, atol=1e-10)
print(f"block 0 is the leading {v.numel()} x {v.numel()} sub-matrix of all blocks' Hessian")
