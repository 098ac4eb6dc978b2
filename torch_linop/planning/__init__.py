"""Memory planning for exact curvature of large language models: predict, on the meta device,
the per-rank peak of a product and of a solver's basis before loading anything (issue 21)."""

from torch_linop.planning.configs import LLAMA_SIZES, llama_config
from torch_linop.planning.footprint import Footprint, footprint
from torch_linop.planning.live_bytes import LiveBytes
from torch_linop.planning.plan import Plan, plan
from torch_linop.planning.rehearsal import Rehearsal, rehearse

__all__ = [
    "LLAMA_SIZES",
    "Footprint",
    "LiveBytes",
    "Plan",
    "Rehearsal",
    "footprint",
    "llama_config",
    "plan",
    "rehearse",
]
