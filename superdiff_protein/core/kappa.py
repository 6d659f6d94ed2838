"""Kappa rules: how the superposed score ``sum_i kappa_i s_i`` weights the models.

Every rule maps, per sample, the current log-density estimates ``logq`` (B, M) and the linear
model of this step's log-density increments ``dlogq = A @ kappa + b`` ((B, M, M) and (B, M), see
``docs/superposition.md``) to weights ``kappa`` (B, M).

* ``or``: kappa = softmax(T * logq + l) -- samples the (tempered, biased) mixture. This is the
  paper's Algorithm 1 (``bias_convention="algorithm1"``, the default: the bias shifts the odds of
  two models by ``e^l``). ``bias_convention="official"`` is the official protein code's
  ``softmax(T * (logq + l))`` (``kappa_OR`` in ``applications/proteins/superdiff/composition.py`` of
  necludov/super-diffusion @ e3afac2): the bias sits inside the temperature and shifts the odds by
  ``e^{T l}``. The two agree at T = 1.
* ``and``: kappa solves ``dlogq_i - dlogq_1 = (l_i - l_1) * frac`` for i >= 2 with ``sum kappa = 1``
  (Prop. 6 of Skreta et al. 2025 as a linear system for any M). With ``l = 0`` all log-densities
  change equally at every step; a bias ``l`` makes log q_i - log q_j drift to ``l_i - l_j`` over the
  run (``frac`` is this step's share of the total time).
* ``average``: fixed weights (Liu et al. 2022), default uniform.
* ``single``: one-hot on one model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["KappaRule", "OrRule", "AndRule", "AverageRule", "SingleRule", "make_rule", "BIAS_CONVENTIONS"]

#: where OR's bias ``l`` enters: ``algorithm1`` softmax(T log q + l) (the paper's Algorithm 1),
#: ``official`` softmax(T (log q + l)) (the official protein code)
BIAS_CONVENTIONS = ("algorithm1", "official")


class KappaRule:
    name = "rule"

    def __call__(self, logq: Tensor, A: Tensor, b: Tensor, frac: float) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:
        return {"rule": self.name}


def _as_bias(bias, m: int, like: Tensor) -> Tensor:
    if bias is None:
        return torch.zeros(m, dtype=like.dtype, device=like.device)
    l = torch.as_tensor(bias, dtype=like.dtype, device=like.device).flatten()
    if l.numel() == 1 and m > 1:
        raise ValueError(f"bias needs one value per model ({m}), got a scalar")
    if l.numel() != m:
        raise ValueError(f"bias has {l.numel()} values but there are {m} models")
    return l


@dataclass
class OrRule(KappaRule):
    temperature: float = 1.0
    bias: list[float] | None = None
    bias_convention: str = "algorithm1"
    name: str = field(default="or", init=False)

    def __post_init__(self):
        if not (self.temperature > 0) or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a positive finite number, got {self.temperature}")
        if self.bias_convention not in BIAS_CONVENTIONS:
            raise ValueError(f"bias_convention must be one of {', '.join(BIAS_CONVENTIONS)}, "
                             f"got {self.bias_convention!r}")

    def __call__(self, logq, A, b, frac):
        l = _as_bias(self.bias, logq.shape[-1], logq)
        if self.bias_convention == "official":
            return torch.softmax(self.temperature * (logq + l), dim=-1)
        return torch.softmax(self.temperature * logq + l, dim=-1)

    def describe(self):
        d = {"rule": "or", "temperature": self.temperature, "bias": self.bias}
        if self.bias_convention != "algorithm1":      # default runs describe themselves as before
            d["bias_convention"] = self.bias_convention
        return d


@dataclass
class AndRule(KappaRule):
    bias: list[float] | None = None
    ridge: float = 1e-10
    name: str = field(default="and", init=False)
    cancels_noise: bool = field(default=True, init=False)   # kappa depends on this step's noise

    def __call__(self, logq, A, b, frac):
        bsz, m = logq.shape
        if m == 1:
            return torch.ones_like(logq)
        l = _as_bias(self.bias, m, logq)
        # rows i = 2..M: (A_i - A_1) kappa = (l_i - l_1) frac - (b_i - b_1)
        E = A[:, 1:, :] - A[:, :1, :]                                   # (B, M-1, M)
        r = (l[1:] - l[0]) * frac - (b[:, 1:] - b[:, :1])                # (B, M-1)
        # kappa = 1/M + P u with P an orthonormal basis of {sum = 0}; solve the (M-1)x(M-1) system
        P = _sum_zero_basis(m, logq)                                     # (M, M-1)
        k0 = torch.full((m,), 1.0 / m, dtype=logq.dtype, device=logq.device)
        H = E @ P                                                        # (B, M-1, M-1)
        rhs = r - E @ k0
        # tiny Tikhonov term: AND is ill-posed when two scores coincide (then any kappa works)
        HtH = H.transpose(-1, -2) @ H
        scale = torch.diagonal(HtH, dim1=-2, dim2=-1).mean(-1)
        reg = torch.where(scale > 0, self.ridge * scale, torch.ones_like(scale))  # H = 0: u = 0, kappa = 1/M
        eye = torch.eye(m - 1, dtype=logq.dtype, device=logq.device)
        # solve_ex without its host-side error check (the matrix is SPD plus a ridge): no device sync, so the
        # step stays capturable as a CUDA graph (core/step_graph.py); same factorisation as linalg.solve
        u = torch.linalg.solve_ex(HtH + reg[:, None, None] * eye, (H.transpose(-1, -2) @ rhs[..., None]),
                                  check_errors=False)[0]
        return k0 + (P @ u).squeeze(-1)

    def describe(self):
        return {"rule": "and", "bias": self.bias}


def _sum_zero_basis(m: int, like: Tensor) -> Tensor:
    q, _ = torch.linalg.qr(torch.eye(m, dtype=like.dtype, device=like.device) - 1.0 / m)
    return q[:, : m - 1]


@dataclass
class AverageRule(KappaRule):
    weights: list[float] | None = None
    name: str = field(default="average", init=False)

    def __call__(self, logq, A, b, frac):
        m = logq.shape[-1]
        w = torch.full((m,), 1.0 / m, dtype=logq.dtype, device=logq.device) if self.weights is None else \
            _as_bias(self.weights, m, logq)
        return w.expand_as(logq).clone()

    def describe(self):
        return {"rule": "average", "weights": self.weights}


@dataclass
class SingleRule(KappaRule):
    index: int = 0
    name: str = field(default="single", init=False)

    def __call__(self, logq, A, b, frac):
        m = logq.shape[-1]
        if not 0 <= self.index < m:
            raise ValueError(f"single: model index {self.index} out of range for {m} models")
        k = torch.zeros_like(logq)
        k[:, self.index] = 1.0
        return k

    def describe(self):
        return {"rule": "single", "index": self.index}


def make_rule(rule: str, temperature: float = 1.0, bias=None, weights=None, index: int = 0,
              bias_convention: str = "algorithm1") -> KappaRule:
    """Build a rule from its name: ``or``, ``and``, ``average``, ``single``. ``bias_convention`` applies
    to ``or`` only (see :data:`BIAS_CONVENTIONS`)."""
    r = str(rule).lower()
    if r == "or":
        return OrRule(temperature=temperature, bias=bias, bias_convention=bias_convention)
    if r == "and":
        return AndRule(bias=bias)
    if r in ("average", "avg", "mean"):
        return AverageRule(weights=weights)
    if r == "single":
        return SingleRule(index=index)
    raise ValueError(f"unknown rule {rule!r}; choose one of or, and, average, single")
