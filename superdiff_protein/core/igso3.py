"""Isotropic Gaussian on SO(3) (IGSO(3)): exact density, score and sampling.

IGSO(3)(mu, sigma) is the law of Brownian motion on SO(3) run for "time" ``sigma**2`` from ``mu``
(generator ``(1/2) Laplace-Beltrami`` for the bi-invariant metric in which the rotation angle equals
the length of the rotation vector). Its density with respect to the *normalised* Haar measure
depends only on the angle ``omega`` of ``mu^T R``:

    f(omega; sigma) = sum_{l>=0} (2l+1) exp(-l(l+1) sigma^2 / 2) sin((l+1/2) omega) / sin(omega/2)

(the series expansion). Poisson summation over the odd frequencies ``n = 2l+1`` turns it into a sum
of wrapped Gaussians that converges in a handful of terms for every sigma used in practice and
stays accurate in log space where the series cancels catastrophically (small sigma, large angle):

    f(omega; sigma) = sqrt(2 pi) s^{-3/2} e^{s/8} / sin(omega/2)
                      * sum_{k in Z} (-1)^k (omega - 2 pi k) exp(-(omega - 2 pi k)^2 / (2 s)),   s = sigma^2

Both are implemented; ``tests/test_igso3.py`` checks they agree. The closed form is the default.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .so3 import so3_exp, so3_log

__all__ = [
    "igso3_log_density",
    "igso3_log_density_series",
    "igso3_dlog_domega",
    "igso3_score",
    "igso3_log_prob",
    "sample_igso3",
    "sample_uniform_so3",
]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _image_terms(omega: Tensor, s: Tensor, kmax: int) -> tuple[Tensor, Tensor, Tensor]:
    """Return a_k = omega - 2 pi k, the signs (-1)^k and exponents -a_k^2/(2s), stacked on dim -1."""
    ks = torch.arange(-kmax, kmax + 1, dtype=omega.dtype, device=omega.device)
    a = omega[..., None] - 2 * math.pi * ks
    sign = 1.0 - 2.0 * (ks.abs() % 2)
    expo = -(a * a) / (2 * s[..., None])
    return a, sign.expand_as(a), expo


def _kmax(sigma_max: float) -> int:
    # terms with |2 pi k| - pi > 9 sigma are below 1e-17 relative; at least 2 images each side
    return max(2, int(math.ceil((9.0 * sigma_max + math.pi) / (2 * math.pi))) + 1)


def _prep(omega: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
    omega = torch.as_tensor(omega)
    sigma = torch.as_tensor(sigma, dtype=omega.dtype, device=omega.device)
    omega, sigma = torch.broadcast_tensors(omega, sigma)
    # the density is smooth in omega at 0; clamp to avoid 0/0 in the closed form
    tiny = 1e-6 if omega.dtype == torch.float64 else 1e-3
    return omega.clamp(tiny, math.pi), sigma


def igso3_log_density(omega: Tensor, sigma: Tensor | float) -> Tensor:
    """log f(omega; sigma) w.r.t. the normalised Haar measure (closed form, stable in log space)."""
    omega, sigma = _prep(omega, sigma)
    s = sigma * sigma
    a, sign, expo = _image_terms(omega, s, _kmax(float(sigma.max())) if sigma.numel() else 2)
    # log |a_k| + expo_k, combined with signs relative to the largest term (k=0 or k=1 for omega in [0, pi])
    loga = torch.log(a.abs().clamp_min(torch.finfo(a.dtype).tiny)) + expo
    m = loga.max(-1, keepdim=True).values
    tot = (sign * torch.sign(a) * torch.exp(loga - m)).sum(-1)
    log_sum = m.squeeze(-1) + torch.log(tot)
    return (
        _LOG_SQRT_2PI
        - 1.5 * torch.log(s)
        + s / 8
        + log_sum
        - torch.log(torch.sin(omega / 2))
    )


def igso3_dlog_domega(omega: Tensor, sigma: Tensor | float) -> Tensor:
    """d/d omega of log f(omega; sigma) (closed form)."""
    omega, sigma = _prep(omega, sigma)
    s = sigma * sigma
    a, sign, expo = _image_terms(omega, s, _kmax(float(sigma.max())) if sigma.numel() else 2)
    m = expo.max(-1, keepdim=True).values
    e = sign * torch.exp(expo - m)
    num = (e * (1 - a * a / s[..., None])).sum(-1)
    den = (e * a).sum(-1)
    return num / den - 0.5 / torch.tan(omega / 2)


def igso3_log_density_series(omega: Tensor, sigma: Tensor | float, num_terms: int = 2000) -> Tensor:
    """Reference: log of the truncated series expansion (float64 recommended; inaccurate in the far tail)."""
    omega, sigma = _prep(omega, sigma)
    ls = torch.arange(num_terms, dtype=omega.dtype, device=omega.device)
    terms = (
        (2 * ls + 1)
        * torch.exp(-ls * (ls + 1) * (sigma[..., None] ** 2) / 2)
        * torch.sin((ls + 0.5) * omega[..., None])
    )
    return torch.log(terms.sum(-1)) - torch.log(torch.sin(omega / 2))


def igso3_score(r: Tensor, mu: Tensor, sigma: Tensor | float) -> Tensor:
    """Body-frame score of IGSO(3)(mu, sigma) at rotation ``r``: d/de log f at ``r exp(e)``.

    r, mu: (..., 3, 3); returns (..., 3).
    """
    v = so3_log(mu.transpose(-1, -2) @ r)
    omega = v.norm(dim=-1)
    d = igso3_dlog_domega(omega, sigma)
    tiny = 1e-6 if v.dtype == torch.float64 else 1e-3
    safe = omega.clamp_min(tiny)
    return (d / safe)[..., None] * v


def igso3_log_prob(r: Tensor, mu: Tensor, sigma: Tensor | float) -> Tensor:
    """log density of IGSO(3)(mu, sigma) at ``r`` (..., 3, 3) -> (...)."""
    omega = so3_log(mu.transpose(-1, -2) @ r).norm(dim=-1)
    return igso3_log_density(omega, sigma)


def sample_uniform_so3(shape: tuple[int, ...], generator: torch.Generator | None = None,
                       dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
    """Haar-uniform rotations (shape + (3, 3)) via QR of a Gaussian matrix with sign fixing."""
    a = torch.randn(*shape, 3, 3, generator=generator, dtype=dtype, device=device)
    q, rr = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1))
    d = torch.where(d == 0, torch.ones_like(d), d)
    q = q * d[..., None, :]
    det = torch.linalg.det(q)
    flip = torch.ones_like(q[..., 0, :])
    flip[..., 0] = torch.where(det < 0, -1.0, 1.0).to(q.dtype)
    return q * flip[..., None, :]


def _angle_icdf_table(sigma: float, n: int = 4096, dtype=torch.float64) -> tuple[Tensor, Tensor]:
    omega = torch.linspace(0, math.pi, n, dtype=dtype)
    dens = torch.exp(igso3_log_density(omega, sigma)) * (1 - torch.cos(omega)) / math.pi
    cdf = torch.cat([torch.zeros(1, dtype=dtype), torch.cumsum((dens[1:] + dens[:-1]) / 2 * (omega[1:] - omega[:-1]), 0)])
    return omega, cdf / cdf[-1]


def sample_igso3(mu: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """Sample IGSO(3)(mu, sigma) for a fixed scalar sigma: mu (..., 3, 3) -> (..., 3, 3).

    The angle is drawn by inverse-CDF interpolation on a fine grid, the axis uniformly.
    """
    omega_grid, cdf = _angle_icdf_table(float(sigma))
    shape = mu.shape[:-2]
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device="cpu")
    idx = torch.searchsorted(cdf, u).clamp(1, len(cdf) - 1)
    c0, c1 = cdf[idx - 1], cdf[idx]
    w = (u - c0) / (c1 - c0).clamp_min(1e-300)
    omega = omega_grid[idx - 1] + w * (omega_grid[idx] - omega_grid[idx - 1])
    axis = torch.randn(*shape, 3, generator=generator, dtype=torch.float64, device="cpu")
    axis = axis / axis.norm(dim=-1, keepdim=True)
    v = (axis * omega[..., None]).to(dtype=mu.dtype, device=mu.device)
    return mu @ so3_exp(v)
