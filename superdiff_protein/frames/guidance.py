"""Clash guidance for frame models: a steric push on the predicted clean CA trace (opt-in).

The embedded models' most common fault is long-range CA clashes: segments far apart in sequence passing
through each other (models/checkpoints/README.md). :class:`ClashGuide` is a :class:`~superdiff_protein.core.
guidance.Guide` that, at ``t <= t_max``, corrects the clean structure the models predict:

* the predicted clean translations are Tweedie's estimate from the kappa-weighted drift score,
  ``x0 = (x_t + sigma_t^2 s) / alpha_t`` (for FrameDiff's Gaussian translation score this is exactly the
  network's predicted CA trace);
* the correction is ``-weight * grad E(x0)``, with ``E = 1/2 sum (d0 - d_ij)_+^2`` over CA pairs with
  ``|i - j| >= min_sep``. For two overlapping CAs, ``weight = 0.5`` moves them exactly to ``d0`` apart;
* the guide turns that correction of ``x0`` into a score term, ``alpha_t / sigma_t^2 * correction``, i.e. the
  score of the same Gaussian around the corrected prediction. So the drift pulls ``x_t`` towards the corrected
  structure as firmly as the model pulls it towards its own, at every ``t``, and ``weight`` is a fraction of
  the overlap, not a force constant that needs tuning per time.

The final structure of a guided run (``final=prediction``) is the chosen model's prediction, refined
(:meth:`ClashGuide.finalize`, :mod:`~superdiff_protein.frames.refine`): each residue moved rigidly to ideal
trans-peptide links and until no CA pair is closer than ``d0``. Without it the network's last prediction pulls
many of the pairs the guide separated back together; a one-shot correction ``x0 - weight grad E`` (the guided
score's Tweedie estimate) resolves them but moves single CAs off the chain's bond lengths, and moving CAs alone
stretches the peptide C-N bonds.

The network's Jacobian is not used (no backward pass): the push acts on ``x_t`` through the identity. Only the
translations are guided; rotations follow from the models. This changes the sampled distribution
(core/guidance.py), so it is off by default and recorded with each run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..core.spaces import ProductSpace, State
from .clash import clash_energy_grad
from .refine import RefineResult, refine_backbone, refine_backbones

__all__ = ["ClashGuide", "clash_energy_grad"]


@dataclass
class ClashGuide:
    """The clash guide (module docstring). ``weight`` in (0, 4]: fraction of the gradient step on the
    predicted structure per step (0.5 resolves an isolated overlap); ``t_max``: guide only at ``t <= t_max``
    (the topology forms earlier; late guidance keeps the models' global choices); ``d0`` in Angstrom: the
    closest allowed CA distance at ``|i - j| >= min_sep`` (the clash metric counts pairs below 3.0 Angstrom)."""

    space: ProductSpace
    angstrom_per_unit: float             # of the translation component (10 for FrameDiff's nm)
    weight: float = 0.5
    t_max: float = 0.5
    d0: float = 4.0
    min_sep: int = 3
    component: str = "trans"

    def __post_init__(self) -> None:
        comp = self.space.components.get(self.component)
        if comp is None or not hasattr(getattr(comp, "schedule", None), "log_alpha_bar"):
            raise ValueError(f"clash guidance needs a translation component {self.component!r} with a VP "
                             "schedule (frame models)")
        self._ci = list(self.space.names).index(self.component)
        self._scale = float(self.angstrom_per_unit)
        self._sched = comp.schedule

    def correct(self, X: Tensor, mask: Tensor | None = None) -> Tensor:
        """One correction of a clean CA trace: ``X - weight * grad E(X)`` (Angstrom, (B, N, 3))."""
        _, grad = clash_energy_grad(X, mask, self.d0, self.min_sep)
        return X - self.weight * grad

    def finalize(self, rot: Tensor, trans: Tensor, psi: Tensor | None = None) -> RefineResult:
        """The final backbone of a guided run: frames ``rot`` (N, 3, 3), ``trans`` (N, 3) Angstrom and ``psi``
        (N, 2) or None, refined by :func:`~superdiff_protein.frames.refine.refine_backbone` with this guide's
        ``d0`` and ``min_sep``: every residue moved rigidly to ideal trans-peptide links and out of CA clashes."""
        return refine_backbone(rot, trans, psi, d0=self.d0, min_sep=self.min_sep)

    def finalize_many(self, chains: Sequence[tuple[Tensor, Tensor, Tensor | None]]) -> list[RefineResult]:
        """:meth:`finalize` of several chains ``(rot, trans, psi)`` in one batched refinement
        (:func:`~superdiff_protein.frames.refine.refine_backbones`); each result is bitwise its ``finalize``."""
        return refine_backbones(chains, d0=self.d0, min_sep=self.min_sep)

    def __call__(self, x: State, t: Tensor, scores: Mapping[str, Tensor], kappa: Tensor,
                 mask: Tensor | None) -> dict[str, Tensor]:
        on = (t <= self.t_max).to(x[self.component].dtype)[:, None, None]
        if not bool(on.any()):                                              # before t_max: no work on the step
            return {}
        xt = x[self.component]                                              # (B, N, 3) scaled units
        s = scores[self.component]                                          # (B, M, N, 3)
        k = kappa[:, self._ci].to(s.dtype)                                  # (B, M)
        s_mix = (k[:, :, None, None] * s).sum(1)
        lab = self._sched.log_alpha_bar(t).to(xt.dtype)                    # (B,)
        alpha = torch.exp(0.5 * lab)[:, None, None]
        var = (-torch.expm1(lab))[:, None, None]
        x0 = (xt + var * s_mix) / alpha
        X0 = x0 * self._scale
        corr = (self.correct(X0, mask) - X0) / self._scale                 # correction of x0, scaled units
        return {self.component: on * alpha / var * corr}
