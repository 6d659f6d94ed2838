"""IGSO(3): closed form vs series expansion, normalisation, score, sampling."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from superdiff_protein.geometry import so3_exp, so3_log
from superdiff_protein.igso3 import (igso3_dlog_domega, igso3_log_density, igso3_log_density_series,
                                     igso3_log_prob, igso3_score, sample_igso3, sample_uniform_so3)

SIGMAS = [0.05, 0.1, 0.3, 0.7, 1.0, 1.5, 2.5]


@pytest.mark.parametrize("sigma", SIGMAS)
def test_closed_form_matches_series(sigma):
    omega = torch.linspace(1e-3, math.pi, 1500, dtype=torch.float64)
    closed = igso3_log_density(omega, sigma)
    series = igso3_log_density_series(omega, sigma)
    # the float64 series cancels catastrophically in the far tail; compare where it is reliable
    ok = closed > -5
    assert ok.sum() > 100
    assert torch.allclose(closed[ok], series[ok], atol=1e-9, rtol=0)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_normalised_wrt_haar(sigma):
    omega = torch.linspace(0, math.pi, 200001, dtype=torch.float64)
    dens = torch.exp(igso3_log_density(omega, sigma)) * (1 - torch.cos(omega)) / math.pi
    assert abs(torch.trapezoid(dens, omega).item() - 1) < 1e-6


def test_high_precision_reference_values():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    for sigma, om in [(0.1, 0.7), (0.05, 0.38), (1.5, 3.0), (0.3, 2.0)]:
        s = mpmath.mpf(sigma)
        ref = mpmath.log(mpmath.nsum(lambda l: (2 * l + 1) * mpmath.e ** (-l * (l + 1) * s * s / 2)
                                     * mpmath.sin((l + 0.5) * om), [0, mpmath.inf]) / mpmath.sin(mpmath.mpf(om) / 2))
        got = igso3_log_density(torch.tensor(om, dtype=torch.float64), sigma).item()
        assert abs(float(mpmath.re(ref)) - got) < 1e-9


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.5])
def test_dlog_matches_autograd(sigma):
    omega = torch.linspace(1e-2, math.pi - 1e-2, 500, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(igso3_log_density(omega, sigma).sum(), omega)
    assert torch.allclose(g, igso3_dlog_domega(omega.detach(), sigma), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("sigma", [0.2, 0.8, 1.5])
def test_score_is_body_frame_gradient(sigma):
    g = torch.Generator().manual_seed(0)
    r = sample_uniform_so3((64,), generator=g)
    mu = sample_uniform_so3((64,), generator=g)
    u = torch.zeros(64, 3, dtype=torch.float64, requires_grad=True)
    lp = igso3_log_prob(r @ so3_exp(u), mu, sigma)
    (grad,) = torch.autograd.grad(lp.sum(), u)
    assert torch.allclose(grad, igso3_score(r, mu, sigma), atol=1e-8)


def test_uniform_so3_is_haar():
    g = torch.Generator().manual_seed(1)
    r = sample_uniform_so3((20000,), generator=g)
    assert torch.allclose(r @ r.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand_as(r), atol=1e-12)
    assert torch.allclose(torch.linalg.det(r), torch.ones(20000, dtype=torch.float64), atol=1e-12)
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
