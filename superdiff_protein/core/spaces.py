"""State spaces with their forward SDEs: the manifold-agnostic layer of the superposition core.

A *component space* knows everything the sampler and the density estimators need about one
component of the state (rotations, translations, an image):

* the forward SDE ``dx = f(x, t) dt + g(t) dW`` on ``t in [0, 1]``: :meth:`drift`, :meth:`diffusion`,
  :meth:`div_drift`;
* the geometry: tangent inner product :meth:`inner`, the update :meth:`step` (``x + d`` or
  ``R exp(d)``), tangent noise :meth:`randn_tangent`, and :meth:`project` onto the admissible
  tangent space (identity unless translations are centred);
* the prior (:meth:`sample_prior`, :meth:`prior_log_prob`);
* :meth:`signature`, a dict that identifies the forward process. Two models can only be superposed
  when their signatures are equal: superposition is defined for models that share the forward SDE.

A :class:`ProductSpace` combines named components; states, tangents and scores are
``dict[str, Tensor]`` keyed by component name. Residue masks ``mask`` of shape ``(B, N)`` are
honoured by site-structured components (SO(3) with state ``(B, N, 3, 3)``, Euclidean with event
shape ``(N, 3)``); padded sites carry zero noise, zero drift and contribute nothing to inner products.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import Tensor

from .so3 import so3_exp
from .igso3 import sample_uniform_so3

__all__ = [
    "VPSchedule",
    "LinearVPSchedule",
    "DiscreteVPSchedule",
    "LogLinearSigmaSchedule",
    "ComponentSpace",
    "EuclideanVPSpace",
    "SO3Space",
    "ProductSpace",
    "State",
    "frame_space",
]

State = dict[str, Tensor]
Generators = list[torch.Generator] | None


# ----------------------------------------------------------------------------------- schedules
class VPSchedule:
    """Variance-preserving schedule: ``f = -beta(t) x / 2``, ``g^2 = beta(t)``,
    marginal ``x_t = alpha_t x_0 + sigma_t eps`` with ``alpha_t^2 = alpha_bar(t)``."""

    def beta(self, t: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def log_alpha_bar(self, t: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(0.5 * self.log_alpha_bar(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(self.log_alpha_bar(t)))

    def signature(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class LinearVPSchedule(VPSchedule):
    """``beta(t) = beta_min + t (beta_max - beta_min)`` (FrameDiff's R^3 schedule: 0.1, 20)."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)

    def signature(self) -> dict:
        return {"type": "vp_linear", "beta_min": float(self.beta_min), "beta_max": float(self.beta_max)}


class DiscreteVPSchedule(VPSchedule):
    """Continuous-time view of a discrete DDPM schedule (diffusers' ``alphas_cumprod``).

    Step ``i`` (0-based) of ``N`` sits at ``t_i = (i + 1) / N``; ``log alpha_bar`` is linear between
    grid points (and 0 at ``t = 0``), so ``beta(t)`` is piecewise constant and the continuous SDE
    reproduces ``alphas_cumprod`` exactly at the grid times.
    """

    def __init__(self, alphas_cumprod: Tensor):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2 or not torch.all((ac > 0) & (ac <= 1)):
            raise ValueError("alphas_cumprod must be a 1-D sequence of values in (0, 1]")
        self.log_ab = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(ac)])
        self.n = ac.numel()

    def _interp(self, t: Tensor) -> tuple[Tensor, Tensor]:
        u = (t.to(torch.float64) * self.n).clamp(0, self.n)
        i0 = u.floor().clamp(max=self.n - 1).long()
        w = u - i0
        la = self.log_ab.to(t.device)
        return la[i0] * (1 - w) + la[i0 + 1] * w, (la[i0 + 1] - la[i0]) * self.n

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        return self._interp(t)[0].to(t.dtype)

    def beta(self, t: Tensor) -> Tensor:
        return (-self._interp(t)[1]).to(t.dtype)

    def timestep_to_t(self, timestep: Tensor) -> Tensor:
        """diffusers integer timestep ``i`` -> continuous ``t = (i + 1) / N``."""
        return (timestep.to(torch.float64) + 1) / self.n

    def signature(self) -> dict:
        ac = torch.exp(self.log_ab[1:])
        return {
            "type": "vp_discrete",
            "num_train_timesteps": self.n,
            # a compact fingerprint: equal schedules give equal values, different ones differ
            "alphas_cumprod_fingerprint": [round(float(ac[i]), 10) for i in torch.linspace(0, self.n - 1, 9).long()],
        }


@dataclass(frozen=True)
class LogLinearSigmaSchedule:
    """FrameDiff's SO(3) schedule ``sigma(t) = log(t e^{sigma_max} + (1 - t) e^{sigma_min})``.

    The marginal at time ``t`` is IGSO(3) with parameter ``sigma(t)`` (data are taken to be blurred
    by ``sigma_min`` at ``t = 0``), so ``g(t)^2 = d sigma^2 / dt``.
    """

    sigma_min: float = 0.1
    sigma_max: float = 1.5

    def sigma(self, t: Tensor) -> Tensor:
        return torch.log(t * math.exp(self.sigma_max) + (1 - t) * math.exp(self.sigma_min))

    def g2(self, t: Tensor) -> Tensor:
        s = self.sigma(t)
        ds = (math.exp(self.sigma_max) - math.exp(self.sigma_min)) * torch.exp(-s)
        return 2 * s * ds

    def signature(self) -> dict:
        return {"type": "igso3_loglinear", "sigma_min": float(self.sigma_min), "sigma_max": float(self.sigma_max)}


# ----------------------------------------------------------------------------------- helpers
def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-sample vector (B,) against x (B, ...)."""
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))


def _site_mask(mask: Tensor | None, x: Tensor, n_event: int) -> Tensor | None:
    """Expand a (B, N) residue mask to broadcast with x of shape (B, N, *event[n_event dims])."""
    if mask is None:
        return None
    return mask.to(x.dtype).reshape(mask.shape + (1,) * n_event)


# ----------------------------------------------------------------------------------- spaces
class ComponentSpace:
    """Interface of one component of the state (see module docstring)."""

    name: str = "x"

    def drift(self, x: Tensor, t: Tensor, mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def diffusion(self, t: Tensor) -> Tensor:
        """g(t), shape like t."""
        raise NotImplementedError

    def div_drift(self, x: Tensor, t: Tensor, mask: Tensor | None = None) -> Tensor:
        """Divergence of f per sample, shape (B,)."""
        raise NotImplementedError

    def inner(self, u: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """Per-sample inner product of tangent vectors, shape (B,)."""
        raise NotImplementedError

    def step(self, x: Tensor, delta: Tensor) -> Tensor:
        raise NotImplementedError

    def randn_tangent(self, x: Tensor, generators: Generators = None, mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def project(self, v: Tensor, mask: Tensor | None = None) -> Tensor:
        return v

    def zeros_tangent(self, x: Tensor) -> Tensor:
        """A zero tangent vector at x."""
        return torch.zeros_like(x)

    def sample_prior(self, batch: int, shape: tuple[int, ...], generators: Generators = None,
                     mask: Tensor | None = None, dtype=torch.float64, device="cpu") -> Tensor:
        raise NotImplementedError

    def prior_log_prob(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def dim(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Dimension of the (masked, projected) space per sample, shape (B,)."""
        raise NotImplementedError

    def signature(self) -> dict:
        raise NotImplementedError


def _randn_per_sample(shape: tuple[int, ...], generators: Generators, dtype, device) -> Tensor:
    """Noise of ``shape`` (B, ...) where row b comes from generator b (batch-independent streams)."""
    if generators is None:
        return torch.randn(shape, dtype=dtype, device=device)
    if len(generators) != shape[0]:
        raise ValueError(f"expected {shape[0]} generators, got {len(generators)}")
    rows = [torch.randn(shape[1:], generator=g, dtype=dtype, device=g.device) for g in generators]
    return torch.stack(rows).to(device)


class EuclideanVPSpace(ComponentSpace):
    """R^d with a VP-SDE. ``event_ndim`` trailing dims form one sample; with ``site_ndim = 1`` the
    first event dim indexes residues (event shape (N, 3)) and a residue mask applies.

    ``center=True`` restricts the process to zero centre of mass over (masked) sites, as FrameDiff
    does for translations: noise, drift and scores are projected, and ``div f`` counts ``3 (N - 1)``
    dimensions.
    """

    gaussian_prior = True     # the prior is N(0, I): FKC products start from N(0, I/B) (core/fkc.py)

    def __init__(self, schedule: VPSchedule, event_ndim: int = 1, site_ndim: int = 0,
                 center: bool = False, name: str = "x"):
        if center and site_ndim != 1:
            raise ValueError("center=True needs site-structured states (site_ndim=1, event shape (N, d))")
        self.schedule = schedule
        self.event_ndim = event_ndim
        self.site_ndim = site_ndim
        self.center = center
        self.name = name

    def _mask(self, mask: Tensor | None, x: Tensor) -> Tensor | None:
        if mask is None or self.site_ndim == 0:
            return None
        return _site_mask(mask, x, self.event_ndim - 1)

    def _sum(self, v: Tensor) -> Tensor:
        return v.flatten(1).sum(-1)

    def project(self, v: Tensor, mask: Tensor | None = None) -> Tensor:
        m = self._mask(mask, v)
        if m is not None:
            v = v * m
        if self.center:
            mm = m if m is not None else torch.ones_like(v[..., :1])
            com = (v * mm).sum(1, keepdim=True) / mm.sum(1, keepdim=True).clamp_min(1)
            v = (v - com) * mm
        return v

    def drift(self, x, t, mask=None):
        return self.project(-0.5 * _bcast(self.schedule.beta(t), x) * x, mask)

    def diffusion(self, t):
        return torch.sqrt(self.schedule.beta(t))

    def dim(self, x, mask=None):
        m = self._mask(mask, x)
        per_site = math.prod(x.shape[1 + self.site_ndim:]) if self.site_ndim else math.prod(x.shape[1:])
        if m is None:
            n_sites = torch.full((x.shape[0],), float(x.shape[1] if self.site_ndim else 1), dtype=x.dtype, device=x.device)
        else:
            n_sites = mask.to(x.dtype).sum(-1)
        if self.center:
            n_sites = n_sites - 1
        return n_sites * per_site

    def div_drift(self, x, t, mask=None):
        return -0.5 * self.schedule.beta(t) * self.dim(x, mask)

    def inner(self, u, v, mask=None):
        m = self._mask(mask, u)
        return self._sum(u * v if m is None else u * v * m)

    def step(self, x, delta):
        return x + delta

    def randn_tangent(self, x, generators=None, mask=None):
        return self.project(_randn_per_sample(tuple(x.shape), generators, x.dtype, x.device), mask)

    def sample_prior(self, batch, shape, generators=None, mask=None, dtype=torch.float64, device="cpu"):
        z = _randn_per_sample((batch, *shape), generators, dtype, device)
        return self.project(z, mask)

    def prior_log_prob(self, x, mask=None):
        d = self.dim(x, mask)
        return -0.5 * self.inner(x, x, mask) - 0.5 * d * math.log(2 * math.pi)

    def signature(self):
        return {"space": "euclidean_vp", "schedule": self.schedule.signature(), "center": self.center}


class SO3Space(ComponentSpace):
    """Per-residue rotations (B, N, 3, 3) under Brownian motion with IGSO(3) marginals.

    Tangent vectors (B, N, 3) are body-frame rotation vectors: :meth:`step` is ``R exp(delta)``.
    The drift is zero; the prior is Haar-uniform (log density 0 w.r.t. normalised Haar measure).
    """

    def __init__(self, schedule: LogLinearSigmaSchedule | None = None, name: str = "rot"):
        self.schedule = schedule or LogLinearSigmaSchedule()
        self.name = name

    def drift(self, x, t, mask=None):
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)

    def diffusion(self, t):
        return torch.sqrt(self.schedule.g2(t))

    def dim(self, x, mask=None):
        if mask is None:
            return torch.full((x.shape[0],), 3.0 * x.shape[1], dtype=x.dtype, device=x.device)
        return 3.0 * mask.to(x.dtype).sum(-1)

    def div_drift(self, x, t, mask=None):
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def zeros_tangent(self, x):
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)

    def inner(self, u, v, mask=None):
        p = u * v
        if mask is not None:
            p = p * _site_mask(mask, p, 1)
        return p.flatten(1).sum(-1)

    def project(self, v, mask=None):
        return v if mask is None else v * _site_mask(mask, v, 1)

    def step(self, x, delta):
        return x @ so3_exp(delta)

    def randn_tangent(self, x, generators=None, mask=None):
        return self.project(_randn_per_sample(tuple(x.shape[:-1]), generators, x.dtype, x.device), mask)

    def sample_prior(self, batch, shape, generators=None, mask=None, dtype=torch.float64, device="cpu"):
        (n,) = shape
        if generators is None:
            r = sample_uniform_so3((batch, n), dtype=dtype, device=device)
        else:
            r = torch.stack([sample_uniform_so3((n,), generator=g, dtype=dtype, device=g.device) for g in generators]).to(device)
        if mask is not None:  # padded residues sit at the identity
            eye = torch.eye(3, dtype=dtype, device=device).expand_as(r)
            r = torch.where(_site_mask(mask, r, 2).bool(), r, eye)
        return r

    def prior_log_prob(self, x, mask=None):
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def signature(self):
        return {"space": "so3_igso3", "schedule": self.schedule.signature()}


@dataclass
class ProductSpace:
    """Named product of component spaces; states are ``dict[name, Tensor]``."""

    components: dict[str, ComponentSpace] = field(default_factory=dict)

    def __post_init__(self):
        for name, c in self.components.items():
            c.name = name

    @property
    def names(self) -> list[str]:
        return list(self.components)

    def signature(self) -> dict:
        return {k: c.signature() for k, c in self.components.items()}

    def sample_prior(self, batch: int, shapes: Mapping[str, tuple[int, ...]], generators: Generators = None,
                     mask: Tensor | None = None, dtype=torch.float64, device="cpu") -> State:
        # one component after the other, each sample from its own stream: batch-independent
        return {k: c.sample_prior(batch, tuple(shapes[k]), generators, mask, dtype, device)
                for k, c in self.components.items()}

    def prior_log_prob(self, x: State, mask: Tensor | None = None) -> dict[str, Tensor]:
        return {k: c.prior_log_prob(x[k], mask) for k, c in self.components.items()}

    def map(self, fn: Callable[[str, ComponentSpace], Tensor]) -> State:
        return {k: fn(k, c) for k, c in self.components.items()}


def frame_space(beta_min: float = 0.1, beta_max: float = 20.0, sigma_min: float = 0.1,
                sigma_max: float = 1.5, center: bool = False) -> ProductSpace:
    """SE(3)^N frames as SO(3)^N x R^{3N} with FrameDiff's default schedules.

    Components: ``rot`` (B, N, 3, 3) and ``trans`` (B, N, 3) in the model's internal (scaled) units.
    """
    return ProductSpace({
        "rot": SO3Space(LogLinearSigmaSchedule(sigma_min, sigma_max)),
        "trans": EuclideanVPSpace(LinearVPSchedule(beta_min, beta_max), event_ndim=2, site_ndim=1, center=center),
    })
