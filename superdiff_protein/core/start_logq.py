"""Start values of the tracked log-densities from each model's own ``log_density`` at t = 1
(``SamplerConfig(init_logq="model")``, exact models; docs/superposition.md, "Start value")."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .spaces import State

__all__ = ["model_start_logq"]


def model_start_logq(models, x: State, t: Tensor, mask, comps: list[str]) -> Tensor:
    """(B, C, M) start values log q_i(x, t = 1) per component from each model's ``log_density``
    (``SamplerConfig(init_logq="model")``); a model without it is refused with one clear line."""
    B = t.shape[0]
    cols = []
    for m in models:
        name = getattr(m, "name", type(m).__name__)
        fn = getattr(m, "log_density", None)
        if not callable(fn):
            raise ValueError(
                f"init_logq='model' needs each model's log-density at t = 1, but model {name!r} has no "
                "log_density(x, t, mask) method (only exact models provide it); use init_logq='prior'")
        with torch.no_grad():
            lq = fn(x, t, mask)
        if not isinstance(lq, Mapping) or set(lq) != set(comps):
            raise ValueError(f"model {name!r}: log_density must return one (B,) tensor per component "
                             f"{comps}, got {sorted(lq) if isinstance(lq, Mapping) else type(lq).__name__}")
        col = torch.stack([torch.as_tensor(lq[k]).to(device=t.device, dtype=t.dtype).reshape(B) for k in comps], 1)
        if not bool(torch.isfinite(col).all()):
            raise ValueError(f"model {name!r}: log_density at t = 1 is not finite for some samples")
        cols.append(col)
    return torch.stack(cols, -1).clone()
