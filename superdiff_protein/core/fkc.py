"""Feynman–Kac corrector (FKC) rules: sample the product, the annealed density or the geometric average
of the models exactly, with importance weights (Skreta et al., ICML 2025, arXiv 2503.02819).

The target at time t is ``pi_t ∝ prod_i (q_i^t)^{b_i}`` with ``B = sum_i b_i`` and score
``S = sum_i b_i s_i``. With forward drift f and diffusion g, the sampler simulates (reverse time tau)

    dx = [-f + c g^2 S] dtau + eta g sqrt(dtau) z,      c = (1 + eta^2) / 2

and every particle carries a log-weight

    d log w = [(B - 1) div f + g^2/2 (|S|^2 - sum_i b_i |s_i|^2)] dtau     (the same for every eta)

(derivation in docs/fkc.md: the Laplacians cancel exactly when c = (1 + eta^2)/2). Per component, the
increments of rotations and translations add. At t = 1 the translations start from the product of the
priors, N(0, I/B) (the sampler scales Gaussian priors by 1/sqrt(B)); rotations stay Haar-uniform.

Rules, beside OR/AND/average/single (they share the :class:`~.kappa.KappaRule` interface: the call
returns the target weights ``b`` (per sample), which the sampler scales by ``c / c_s``):

* :class:`ProductRule` -- ``prod_i q_i^{b_i}``, default ``b = 1``;
* :class:`AnnealRule` -- ``q^beta`` of one model (``index``), of a product (``weights``), or of the OR
  mixture (``of="or"``: the mixture score ``sum kappa_i s_i`` with OR's kappa, annealed);
* :class:`GeometricRule` -- ``q_1^{1-gamma} q_2^gamma`` (classifier-free guidance when q_1 is the
  unconditional and q_2 the conditional model, ``gamma = w``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .kappa import KappaRule, OrRule, _as_bias

__all__ = ["FKCRule", "ProductRule", "AnnealRule", "GeometricRule", "ImproperTargetWarning", "UnsafeNoiseWarning", "is_fkc",
           "FKC_RULES"]

FKC_RULES = ("product", "anneal", "geometric")


class UnsafeNoiseWarning(UserWarning):
    """FKC with resampling at noise scale eta < 1: valid in theory, collapses in practice (docs/fkc.md)."""


class ImproperTargetWarning(UserWarning):
    """The FKC target may not be a normalisable density (a geometric average with gamma outside [0, 1])."""


def is_fkc(rule) -> bool:
    """True for rules that sample an FKC target (they carry importance weights)."""
    return bool(getattr(rule, "fkc", False))


class FKCRule(KappaRule):
    """Base of the FKC rules. Subclasses define :meth:`target_weights` (the ``b_i`` per sample)."""

    fkc = True
    cancels_noise = False

    def target_weights(self, logq: Tensor) -> Tensor:  # pragma: no cover - interface
        """(B, M) the exponents ``b_i`` of the target ``prod q_i^{b_i}`` (may depend on logq: anneal of OR)."""
        raise NotImplementedError

    def total(self, m: int) -> float:  # pragma: no cover - interface
        """``B = sum_i b_i`` (the same for every sample): sets the prior precision and the div f term."""
        raise NotImplementedError

    def __call__(self, logq: Tensor, A: Tensor, b: Tensor, frac: float) -> Tensor:
        return self.target_weights(logq)

    def self_term(self, gram: Tensor, kappa: Tensor) -> Tensor:
        """``sum_i b_i |s_i|^2`` (B,) from the Gram matrix of the density scores (B, M, M)."""
        return (kappa * torch.diagonal(gram, dim1=-2, dim2=-1)).sum(-1)

    def log_weight_increment(self, gram: Tensor, divf: Tensor, g2: Tensor, dtau: float, kappa: Tensor) -> Tensor:
        """One component's ``d log w`` (B,): ``[(B - 1) div f + g^2/2 (|S|^2 - sum_i b_i |s_i|^2)] dtau``.

        ``gram`` (B, M, M): inner products of the density scores; ``kappa`` (B, M): this step's target
        weights ``b`` (as returned by the call, before the sampler's eta scaling)."""
        m = gram.shape[-1]
        s2 = (kappa[:, :, None] * gram * kappa[:, None, :]).sum((-1, -2))     # |S|^2 = b^T G b
        return ((self.total(m) - 1.0) * divf + 0.5 * g2 * (s2 - self.self_term(gram, kappa))) * dtau

    def target_log_density(self, logq: Tensor) -> Tensor:
        """``log pi~ = sum_i b_i log q_i`` (B,) from per-model log-densities (B, M) (start weights)."""
        return (self.target_weights(logq) * logq).sum(-1)


def _check_weights(weights, name: str) -> list[float] | None:
    if weights is None:
        return None
    w = [float(v) for v in (weights if isinstance(weights, (list, tuple)) else [weights])]
    if not all(math.isfinite(v) for v in w):
        raise ValueError(f"{name} must be finite numbers, got {w}")
    return w


@dataclass
class ProductRule(FKCRule):
    """``pi ∝ prod_i q_i^{b_i}`` with ``b = weights`` (default all 1: the product of the models)."""

    weights: list[float] | None = None
    name: str = field(default="product", init=False)

    def __post_init__(self):
        self.weights = _check_weights(self.weights, "product weights")
        if self.weights is not None and not sum(self.weights) > 0:
            raise ValueError(f"product weights must sum to a positive number, got {self.weights}")

    def _b(self, m: int, like: Tensor) -> Tensor:
        if self.weights is None:
            return torch.ones(m, dtype=like.dtype, device=like.device)
        return _as_bias(self.weights, m, like)

    def total(self, m):
        return float(m) if self.weights is None else float(sum(self.weights))

    def target_weights(self, logq):
        return self._b(logq.shape[-1], logq).expand_as(logq).clone()

    def describe(self):
        return {"rule": "product", "weights": self.weights}


@dataclass
class AnnealRule(FKCRule):
    """``pi ∝ q^beta``: of one model (``index``; with one model, that model), of the product
    ``prod q_i^{w_i}`` (``weights``, default all 1; ``index=None``), or of the OR mixture (``of="or"``,
    with OR's ``temperature``... fixed at 1 and its ``bias``: the mixture ``sum_i e^{l_i} q_i``)."""

    beta: float = 2.0
    index: int | None = None
    weights: list[float] | None = None
    of: str = "model"                 # "model" (index or product) | "or" (the OR mixture)
    bias: list[float] | None = None   # of="or": the mixture's log-weights l
    name: str = field(default="anneal", init=False)

    def __post_init__(self):
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a positive finite number, got {self.beta}")
        if self.of not in ("model", "or"):
            raise ValueError(f"anneal: 'of' must be 'model' or 'or', got {self.of!r}")
        self.weights = _check_weights(self.weights, "anneal weights")
        if self.of == "or" and (self.index is not None or self.weights is not None):
            raise ValueError("anneal of='or' takes no index or weights (the mixture's weights are its bias)")

    def _base(self, logq: Tensor) -> Tensor:
        m = logq.shape[-1]
        if self.of == "or":
            return OrRule(bias=self.bias)(logq, None, None, 0.0)
        if self.index is not None:
            if not 0 <= int(self.index) < m:
                raise ValueError(f"anneal: model index {self.index} out of range for {m} models")
            e = torch.zeros(m, dtype=logq.dtype, device=logq.device)
            e[int(self.index)] = 1.0
            return e.expand_as(logq)
        if self.weights is None:
            if m > 1:
                raise ValueError(f"anneal with {m} models needs index= (one model), weights= (a product) or "
                                 "of='or' (the OR mixture)")
            return torch.ones_like(logq)
        return _as_bias(self.weights, m, logq).expand_as(logq)

    def total(self, m):
        if self.of == "or" or self.index is not None or self.weights is None:
            return float(self.beta)
        return float(self.beta) * float(sum(self.weights))

    def target_weights(self, logq):
        return float(self.beta) * self._base(logq)

    def self_term(self, gram, kappa):
        if self.of == "or":      # one density, the mixture: beta |s_mix|^2 = |S|^2 / beta
            return (kappa[:, :, None] * gram * kappa[:, None, :]).sum((-1, -2)) / float(self.beta)
        return super().self_term(gram, kappa)

    def target_log_density(self, logq):
        if self.of == "or":
            l = _as_bias(self.bias, logq.shape[-1], logq)
            return float(self.beta) * torch.logsumexp(logq + l - torch.logsumexp(l, 0), -1)
        return super().target_log_density(logq)

    def describe(self):
        d = {"rule": "anneal", "beta": self.beta}
        if self.of == "or":
            d.update(of="or", bias=self.bias)
        elif self.index is not None:
            d["index"] = int(self.index)
        elif self.weights is not None:
            d["weights"] = self.weights
        return d


@dataclass
class GeometricRule(FKCRule):
    """``pi ∝ q_1^{1 - gamma} q_2^gamma`` (two models). ``gamma`` in [0, 1] interpolates; ``gamma > 1``
    extrapolates like classifier-free guidance and is only a density where the result is normalisable
    (for Gaussians: precision ``(1 - gamma)/s_1^2 + gamma/s_2^2 > 0``), which cannot be known in general:
    a warning says so."""

    gamma: float = 0.5
    name: str = field(default="geometric", init=False)

    def __post_init__(self):
        if not (isinstance(self.gamma, (int, float)) and math.isfinite(self.gamma)):
            raise ValueError(f"gamma must be a finite number, got {self.gamma}")
        if not 0.0 <= self.gamma <= 1.0:
            warnings.warn(f"geometric average with gamma={self.gamma} outside [0, 1]: the target "
                          "q_1^(1-gamma) q_2^gamma may not be normalisable (for Gaussians it is only when "
                          "(1-gamma)/var_1 + gamma/var_2 > 0); this cannot be checked for learned models",
                          ImproperTargetWarning, stacklevel=3)

    def total(self, m):
        return 1.0

    def target_weights(self, logq):
        if logq.shape[-1] != 2:
            raise ValueError(f"geometric needs exactly 2 models, got {logq.shape[-1]}")
        g = float(self.gamma)
        return torch.tensor([1.0 - g, g], dtype=logq.dtype, device=logq.device).expand_as(logq).clone()

    def describe(self):
        return {"rule": "geometric", "gamma": self.gamma}
