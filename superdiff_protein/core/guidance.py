"""Guidance: an extra drift added to the superposition's move (opt-in, manifold-agnostic).

A guide returns, per component, a score-like tangent ``h_c``; the step adds ``c_s g_c^2 dtau h_c`` to the
move, as if ``h`` were one more score term that kappa does not weight. What this does and does not change:

* The tracked log-densities stay what they were: the Itô formula holds along any path ``dx``
  (docs/superposition.md), so each ``log q_i`` gains ``<s_i, dx_guide>`` and stays an estimate of model i's
  density along the guided path. The noise is unchanged, so the Itô estimator's exactness at
  ``noise_scale = 1`` is unchanged too.
* AND's kappa is solved with the guide's move included (the guide is evaluated once with a provisional kappa
  from the unguided step, then its move enters ``b`` before the rule runs), so AND still equalises the densities.
* The **sampled distribution changes**: it is no longer the OR mixture or the AND set of the models alone, but
  that, pushed by the guide. This is why guidance is opt-in and recorded with every sample. The Feynman–Kac
  rules' weights assume their own drift, so guides are refused with them.
"""
from __future__ import annotations

from typing import Mapping, Protocol

import torch
from torch import Tensor

from .spaces import ProductSpace, State

__all__ = ["Guide", "apply_guide"]


class Guide(Protocol):
    """``guide(x, t, scores, kappa, mask)``: per component, a tangent ``h`` (same shape as ``x[c]``) that is added
    to the drift as ``c_s g^2 dtau h``. ``scores[c]`` is (B, M, ...) the models' drift scores, ``kappa`` (B, C, M)
    this step's provisional weights (component order: the space's ``names``), ``t`` (B,) the current time.
    Components the guide leaves out are not guided."""

    def __call__(self, x: State, t: Tensor, scores: Mapping[str, Tensor], kappa: Tensor,
                 mask: Tensor | None) -> Mapping[str, Tensor]: ...


def apply_guide(guide: Guide, space: ProductSpace, x: State, tb: Tensor, dtau, cs: float, g2_c: Mapping[str, Tensor],
                S_c: Mapping[str, Tensor], D_c: Mapping[str, Tensor], kappa: Tensor, fixed_c: dict, b_c: dict,
                mask: Tensor | None) -> tuple[dict, dict]:
    """This step's move and log-density offsets with the guide's drift added: ``fixed_c[c] + dx_c`` and
    ``b_c[c] + <s_i, dx_c>`` per model i (``S_c``: the tracked densities' scores, (B, M, ...))."""
    h = guide(x, tb, D_c, kappa, mask)
    fixed, b = dict(fixed_c), dict(b_c)
    B = tb.shape[0]
    for k, hk in h.items():
        if k not in fixed:
            raise KeyError(f"the guide returned a component {k!r} the space does not have ({list(fixed)})")
        sp = space.components[k]
        hk = sp.project(hk.to(dtype=fixed[k].dtype), mask)
        dx = cs * (g2_c[k] * dtau).reshape((B,) + (1,) * (hk.dim() - 1)) * hk
        fixed[k] = fixed[k] + dx
        M = S_c[k].shape[1]
        b[k] = b[k] + torch.stack([sp.inner(S_c[k][:, i], dx, mask) for i in range(M)], -1)
    return fixed, b
