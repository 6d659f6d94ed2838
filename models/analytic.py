"""Analytic models with exact marginal log-densities and scores under the core's forward SDEs.

They implement the same :class:`~superdiff_protein.core.protocol.ScoreModel` protocol as neural models,
and additionally expose :meth:`AnalyticModel.log_prob`, the exact ``log q_t`` per component (also as the
protocol's optional ``log_density`` hook, for ``SamplerConfig(init_logq="model")``). They are
how the core is verified (pathwise exactness of the Itô estimator, OR/AND behaviour) and the
models of the ``superdiff_demo`` command.

* :class:`GaussianMixtureVP` -- mixture of diagonal Gaussians in R^d pushed through a VP-SDE:
  ``q_t = sum_k w_k N(alpha_t mu_k, alpha_t^2 Sigma_k + sigma_t^2 I)``.
* :class:`SO3PointMixture` -- mixture of point masses on SO(3)^N (one rotation per residue and
  component), blurred to IGSO(3) with ``sigma(t)`` of the log-linear schedule:
  ``q_t(R) = sum_k w_k prod_n IGSO3(R_n; mu_kn, sigma(t))``.
* Frames: an :class:`AnalyticModel` with an ``SO3PointMixture`` on ``rot`` and a
  ``GaussianMixtureVP`` on ``trans`` (event shape (N, 3)) is an exact model on SE(3)^N.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

from superdiff_protein.core.igso3 import igso3_log_density, igso3_score
from superdiff_protein.frames.geometry import so3_log
from superdiff_protein.core.protocol import ModelOutput
from superdiff_protein.core.spaces import (EuclideanVPSpace, LinearVPSchedule, LogLinearSigmaSchedule, ProductSpace,
                                      SO3Space, VPSchedule)

__all__ = ["GaussianMixtureVP", "SO3PointMixture", "AnalyticModel", "gaussian_mixture_model", "frame_mixture_model"]


def _check_full_mask(mask: Tensor | None) -> None:
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("analytic models do not support padded residues (mask must be all ones)")


class GaussianMixtureVP:
    """Diagonal Gaussian mixture in R^d (any event shape) under a VP schedule."""

    def __init__(self, means: Tensor, variances: Tensor | float, weights: Tensor | None = None,
                 schedule: VPSchedule | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)                       # (K, *event)
        k = self.means.shape[0]
        v = torch.as_tensor(variances, dtype=torch.float64)
        self.variances = v.expand_as(self.means).clone() if v.dim() <= 1 and v.numel() == 1 else \
            (v.reshape((k,) + (1,) * (self.means.dim() - 1)).expand_as(self.means).clone() if v.dim() == 1 else v)
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.log_w = torch.log(w / w.sum())
        self.schedule = schedule or LinearVPSchedule()

    def _params(self, x: Tensor, t: Tensor):
        a = self.schedule.alpha(t).to(x.dtype)              # (B,)
        s2 = self.schedule.sigma(t).to(x.dtype) ** 2
        shape = (x.shape[0], 1) + (1,) * (x.dim() - 1)
        mu = a.reshape(shape) * self.means.to(x)[None]                           # (B, K, *event)
        var = (a * a).reshape(shape) * self.variances.to(x)[None] + s2.reshape(shape)
        return mu, var

    def _log_comp(self, x: Tensor, t: Tensor):
        mu, var = self._params(x, t)
        diff = x[:, None] - mu
        lp = -0.5 * (diff * diff / var + torch.log(2 * math.pi * var))
        return lp.flatten(2).sum(-1) + self.log_w.to(x)[None], diff, var           # (B, K)

    def log_prob(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.logsumexp(self._log_comp(x, t)[0], -1)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        lc, diff, var = self._log_comp(x, t)
        r = torch.softmax(lc, -1)
        return (r.reshape(r.shape + (1,) * (x.dim() - 1)) * (-diff / var)).sum(1)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples of q_0."""
        idx = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        z = torch.randn((n,) + tuple(self.means.shape[1:]), generator=generator, dtype=torch.float64)
        return self.means[idx] + z * self.variances[idx].sqrt()


class SO3PointMixture:
    """Mixture over components k of products over residues n of IGSO(3)(mu_kn, sigma(t))."""

    def __init__(self, mus: Tensor, weights: Tensor | None = None, schedule: LogLinearSigmaSchedule | None = None):
        mus = torch.as_tensor(mus, dtype=torch.float64)
        if mus.dim() == 3:
            mus = mus[:, None]
        self.mus = mus                                                               # (K, N, 3, 3)
        k = mus.shape[0]
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.log_w = torch.log(w / w.sum())
        self.schedule = schedule or LogLinearSigmaSchedule()

    def _omega(self, r: Tensor) -> Tensor:
        # angle of mu_kn^T R_n: (B, K, N)
        rel = self.mus.to(r).transpose(-1, -2)[None] @ r[:, None]
        return so3_log(rel).norm(dim=-1)

    def _log_comp(self, r: Tensor, t: Tensor) -> Tensor:
        sigma = self.schedule.sigma(t).to(r.dtype)[:, None, None]
        return igso3_log_density(self._omega(r), sigma).sum(-1) + self.log_w.to(r)[None]   # (B, K)

    def log_prob(self, r: Tensor, t: Tensor) -> Tensor:
        return torch.logsumexp(self._log_comp(r, t), -1)

    def score(self, r: Tensor, t: Tensor) -> Tensor:
        resp = torch.softmax(self._log_comp(r, t), -1)                                  # (B, K)
        sigma = self.schedule.sigma(t).to(r.dtype)[:, None, None]
        sc = igso3_score(r[:, None], self.mus.to(r)[None], sigma)                      # (B, K, N, 3)
        return (resp[..., None, None] * sc).sum(1)


class AnalyticModel:
    """An exact model on a :class:`ProductSpace`: one analytic part per component (independent)."""

    def __init__(self, space: ProductSpace, parts: Mapping[str, object], name: str = "analytic"):
        missing = set(space.names) ^ set(parts)
        if missing:
            raise ValueError(f"parts must cover exactly the space components; mismatch: {sorted(missing)}")
        self.space = space
        self.parts = dict(parts)
        self.name = name

    def signature(self) -> dict:
        return self.space.signature()

    def init_state(self, batch: int, mask: Tensor | None):
        return None

    def __call__(self, x, t, mask, state) -> ModelOutput:
        _check_full_mask(mask)
        return ModelOutput({k: self.parts[k].score(x[k], t) for k in self.space.names})

    def log_prob(self, x, t, mask=None) -> dict[str, Tensor]:
        """Exact ``log q_t`` per component (w.r.t. Lebesgue / normalised Haar measure)."""
        _check_full_mask(mask)
        return {k: self.parts[k].log_prob(x[k], t) for k in self.space.names}

    def log_density(self, x, t, mask=None) -> dict[str, Tensor]:
        """The optional protocol hook behind ``SamplerConfig(init_logq="model")``: the model's own
        ``log q_t`` per component, w.r.t. the same reference measure as the space's ``prior_log_prob``
        (the sampler calls it at t = 1 to start the tracked log-densities; docs/superposition.md)."""
        return self.log_prob(x, t, mask)


def gaussian_mixture_model(means, variances, weights=None, schedule: VPSchedule | None = None,
                           name: str = "gmm", component: str = "x") -> AnalyticModel:
    """A GMM in R^d as a single-component model (space ``{component: EuclideanVPSpace}``)."""
    schedule = schedule or LinearVPSchedule()
    means = torch.as_tensor(means, dtype=torch.float64)
    space = ProductSpace({component: EuclideanVPSpace(schedule, event_ndim=means.dim() - 1)})
    return AnalyticModel(space, {component: GaussianMixtureVP(means, variances, weights, schedule)}, name=name)


def frame_mixture_model(rot_mus: Tensor, trans_means: Tensor, trans_var: float | Tensor = 0.05,
                        rot_weights=None, trans_weights=None, sigma_min: float = 0.1, sigma_max: float = 1.5,
                        beta_min: float = 0.1, beta_max: float = 20.0, name: str = "frames") -> AnalyticModel:
    """Exact frame model on SE(3)^N: rotations (K, N, 3, 3) and translations (K', N, 3)."""
    rs = LogLinearSigmaSchedule(sigma_min, sigma_max)
    vs = LinearVPSchedule(beta_min, beta_max)
    space = ProductSpace({"rot": SO3Space(rs), "trans": EuclideanVPSpace(vs, event_ndim=2, site_ndim=1)})
    return AnalyticModel(space, {"rot": SO3PointMixture(rot_mus, rot_weights, rs),
                                 "trans": GaussianMixtureVP(trans_means, trans_var, trans_weights, vs)}, name=name)
