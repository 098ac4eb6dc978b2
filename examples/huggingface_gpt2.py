"""Hessian and GGN of a tiny GPT-2 built from ``GPT2Config`` (random weights, nothing
downloaded), then the attention parameters alone with ``param_filter``.

Run: ``python examples/huggingface_gpt2.py`` (needs ``pip install "torch-linop[transformers]"``).
"""

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as transformers_logging

from torch_linop import GGNOperator, HessianOperator, hf_lm_loss, lanczos, match_names, trace

transformers_logging.set_verbosity_error()
torch.manual_seed(0)
config = GPT2Config(
    vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
    eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
)  # fmt: skip
model = GPT2LMHeadModel(config).to(torch.float64).eval()

# Token batches as a tokenizer returns them; hf_lm_loss shifts the labels like HF does.
generator = torch.Generator().manual_seed(0)
tokens = torch.randint(0, config.vocab_size, (8, 24), generator=generator)
data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in tokens.split(4)]
loss = hf_lm_loss()
with torch.no_grad():  # the same number as HF's own loss (which it computes in float32)
    hf_loss = model(**data[0], labels=data[0]["input_ids"]).loss
    assert abs(float(loss(model, data[0])) - float(hf_loss)) < 1e-5

H = HessianOperator(model, data, loss)
G = GGNOperator(model, data, loss)  # cross-entropy: J^T (diag(p) - p p^T) J, PSD
print(f"{H}")
hessian_top = lanczos(H, k=3, which="LA", seed=0)
ggn_top = lanczos(G, k=3, which="LA", seed=0)
print("Hessian top-3:", np.array2string(hessian_top.eigenvalues, precision=5))
print("GGN top-3:    ", np.array2string(ggn_top.eigenvalues, precision=5))
assert hessian_top.converged.all() and ggn_top.converged.all()

# The attention sub-block: every attention parameter of every layer, and nothing else.
attention = match_names("transformer.h.*.attn.*")
H_attn = HessianOperator(model, data, loss, param_filter=attention)
print(f"attention block: {list(H_attn.params)}")
attn_top = lanczos(H_attn, k=3, which="LA", seed=0)
attn_trace = trace(H_attn, num_matvecs=60, seed=0)
print("attention Hessian top-3:", np.array2string(attn_top.eigenvalues, precision=5))
print(f"attention Hessian trace: {attn_trace.estimate:.4f} +/- {attn_trace.stderr:.1e}")

# The sub-block operator is a scipy LinearOperator too: ARPACK agrees.
arpack = np.sort(eigsh(H_attn, k=3, which="LA", return_eigenvectors=False))[::-1]
np.testing.assert_allclose(attn_top.eigenvalues, arpack, rtol=1e-7)
# A principal sub-matrix's largest eigenvalue cannot exceed the full matrix's (Cauchy interlacing).
assert attn_top.eigenvalues[0] <= hessian_top.eigenvalues[0] * (1 + 1e-8)
print("Lanczos and ARPACK agree on the attention block.")
