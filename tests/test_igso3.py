"""IGSO(3): closed form vs series expansion, normalisation, score, sampling.

Tolerances follow docs/testing.md (tests/tolerances.py): every float64 comparison is bounded by the rounding its
formulas can carry, from the magnitudes they handle:

* the series: ``igso3_series_bounds`` (term-by-term rounding; its relative error is the log's absolute error; where
  it reaches 1/2 the series has no correct digit and is not compared);
* the closed form: ``log`` of a sum of wrapped Gaussians taken relative to its largest exponent ``m``, so its
  absolute error is ``eps * (|m| + |log s| + s/8 + |log sin(omega/2)| + 1)`` per operation, over ``2 kmax + 6`` ops;
* the trapezoid normalisation: the integrand is even about 0 and about pi, so every Euler-Maclaurin correction
  vanishes and only the rounding of the 200001-term sum remains.
"""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from superdiff_protein.frames.geometry import so3_exp, so3_log
from superdiff_protein.core.igso3 import (_kmax, igso3_dlog_domega, igso3_log_density, igso3_log_density_series,
                                     igso3_log_prob, igso3_score, sample_igso3, sample_uniform_so3)
from tolerances import close, igso3_series_bounds, rounding_tol

F64 = torch.float64


def _closed_form_tol(omega: torch.Tensor, sigma: float) -> torch.Tensor:
    """Rounding bound of ``igso3_log_density`` (module docstring)."""
    s = sigma * sigma
    omega = omega.clamp(1e-6, math.pi)  # as igso3_log_density
    m = (omega - 2 * math.pi * torch.arange(-1, 2, dtype=F64)[:, None]).square().min(0).values / (2 * s)
    scale = 1 + m + abs(math.log(s)) + s / 8 + torch.log(torch.sin(omega / 2)).abs()
    return rounding_tol(F64, scale, 2 * _kmax(sigma) + 7)

SIGMAS = [0.05, 0.1, 0.3, 0.7, 1.0, 1.5, 2.5]


@pytest.mark.parametrize("sigma", SIGMAS)
def test_closed_form_matches_series(sigma):
    omega = torch.linspace(1e-3, math.pi, 1500, dtype=torch.float64)
    closed = igso3_log_density(omega, sigma)
    series = igso3_log_density_series(omega, sigma)
    b = igso3_series_bounds(omega, torch.tensor(sigma, dtype=F64), num_terms=2000)
    rel = b["e_exp"] / b["exp"].abs()  # the series' relative error = the log's absolute error
    ok = rel < 0.5  # elsewhere the float64 series has no correct digit (catastrophic cancellation in the tail)
    assert ok.sum() > 100
    close(closed[ok], series[ok], (rel + _closed_form_tol(omega, sigma))[ok], f"closed vs series sigma={sigma}")


@pytest.mark.parametrize("sigma", SIGMAS)
def test_normalised_wrt_haar(sigma):
    n = 200001
    omega = torch.linspace(0, math.pi, n, dtype=torch.float64)
    dens = torch.exp(igso3_log_density(omega, sigma)) * (1 - torch.cos(omega)) / math.pi
    # integrand even about 0 and pi: the trapezoid rule's Euler-Maclaurin terms vanish; the closed form's relative
    # error (its log's absolute error) and the sum's rounding remain
    tol = float((_closed_form_tol(omega, sigma) * dens).sum() * math.pi / (n - 1)) + rounding_tol(F64, 1.0, n)
    close(torch.trapezoid(dens, omega), 1.0, tol, f"normalisation sigma={sigma}")


def test_high_precision_reference_values():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    for sigma, om in [(0.1, 0.7), (0.05, 0.38), (1.5, 3.0), (0.3, 2.0)]:
        s = mpmath.mpf(sigma)
        ref = mpmath.log(mpmath.nsum(lambda l: (2 * l + 1) * mpmath.e ** (-l * (l + 1) * s * s / 2)
                                     * mpmath.sin((l + 0.5) * om), [0, mpmath.inf]) / mpmath.sin(mpmath.mpf(om) / 2))
        o = torch.tensor(om, dtype=torch.float64)
        got = igso3_log_density(o, sigma)
        close(got, float(mpmath.re(ref)), _closed_form_tol(o, sigma), f"closed form vs mpmath ({sigma}, {om})")


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.5])
def test_dlog_matches_autograd(sigma):
    omega = torch.linspace(1e-2, math.pi - 1e-2, 500, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(igso3_log_density(omega, sigma).sum(), omega)
    om = omega.detach()
    # both differentiate the same wrapped-Gaussian sum: terms of size |a|/s (a = omega - 2 pi k), the
    # cot(omega/2)/2 of the 1/sin factor, over 2 kmax + 1 images and a handful of ops each
    scale = (om.abs() + 2 * math.pi) / sigma**2 + 0.5 / torch.tan(om / 2).abs() + g.abs()
    close(g, igso3_dlog_domega(om, sigma), rounding_tol(F64, scale, 2 * _kmax(sigma) + 10), f"dlog sigma={sigma}")


@pytest.mark.parametrize("sigma", [0.2, 0.8, 1.5])
def test_score_is_body_frame_gradient(sigma):
    g = torch.Generator().manual_seed(0)
    r = sample_uniform_so3((64,), generator=g)
    mu = sample_uniform_so3((64,), generator=g)
    u = torch.zeros(64, 3, dtype=torch.float64, requires_grad=True)
    lp = igso3_log_prob(r @ so3_exp(u), mu, sigma)
    (grad,) = torch.autograd.grad(lp.sum(), u)
    score = igso3_score(r, mu, sigma)
    # the log map's derivative is conditioned by 1/sin(omega) (axis ill-defined at pi); the rotation products and
    # the log map take ~50 roundings of O(1) values, then the density's slope (|score|, plus 1) multiplies them
    omega = so3_log(mu.transpose(-1, -2) @ r).norm(dim=-1)
    cond = (1 + 1 / torch.sin(omega).abs())[:, None]
    close(grad, score, rounding_tol(F64, score.abs().amax(-1, keepdim=True) + 1, 50, cond), f"score sigma={sigma}")


def test_uniform_so3_is_haar():
    g = torch.Generator().manual_seed(1)
    r = sample_uniform_so3((20000,), generator=g)
    # quaternion -> matrix (~6 roundings per entry), then a 3-term dot product / a determinant (~20 roundings)
    close(r @ r.transpose(-1, -2), torch.eye(3, dtype=F64).expand_as(r), rounding_tol(F64, 1.0, 10), "R R^T")
    close(torch.linalg.det(r), 1.0, rounding_tol(F64, 1.0, 20), "det R")
    omega = so3_log(r).norm(dim=-1).numpy()
    cdf = lambda w: (w - np.sin(w)) / np.pi  # Haar angle law, density (1 - cos w) / pi
    assert stats.kstest(omega, cdf).pvalue > 1e-3


@pytest.mark.parametrize("sigma", [0.2, 1.0])
def test_igso3_sampling_angle_law(sigma):
    g = torch.Generator().manual_seed(2)
    mu = sample_uniform_so3((1,), generator=g).expand(20000, 3, 3)
    r = sample_igso3(mu, sigma, generator=g)
    omega = so3_log(mu.transpose(-1, -2) @ r).norm(dim=-1).numpy()
    grid = np.linspace(0, np.pi, 20001)
    dens = np.exp(igso3_log_density(torch.tensor(grid), sigma).numpy()) * (1 - np.cos(grid)) / np.pi
    c = np.concatenate([[0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(grid))])
    assert stats.kstest(omega, lambda w: np.interp(w, grid, c / c[-1])).pvalue > 1e-3
