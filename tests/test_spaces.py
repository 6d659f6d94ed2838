"""Forward SDEs of the state spaces."""
import math

import pytest
import torch

from superdiff_protein.core.spaces import (DiscreteVPSchedule, EuclideanVPSpace, LinearVPSchedule, LogLinearSigmaSchedule,
                                      SO3Space, frame_space)


def test_linear_vp_beta_is_minus_dlog_alpha_bar():
    s = LinearVPSchedule(0.1, 20.0)
    t = torch.linspace(0, 1, 101, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(s.log_alpha_bar(t).sum(), t)
    assert torch.allclose(-d, s.beta(t.detach()), atol=1e-12)
    assert torch.allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones_like(t), atol=1e-12)


def test_discrete_vp_reproduces_alphas_cumprod():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    s = DiscreteVPSchedule(ac)
    t = s.timestep_to_t(torch.arange(1000))
    assert torch.allclose(torch.exp(s.log_alpha_bar(t)), ac, rtol=1e-10, atol=0)
    # piecewise-constant beta integrates exactly to -log alpha_bar
    grid = torch.linspace(0, 1, 100001, dtype=torch.float64)
    integral = torch.cumulative_trapezoid(s.beta(grid[:-1] + 0.5e-5), dx=1e-5)
    assert abs(integral[-1].item() + math.log(ac[-1].item())) < 1e-3
    with pytest.raises(ValueError):
        DiscreteVPSchedule(torch.tensor([0.5]))


def test_so3_g2_is_dsigma2_dt():
    s = LogLinearSigmaSchedule(0.1, 1.5)
    t = torch.linspace(0, 1, 101, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad((s.sigma(t) ** 2).sum(), t)
    assert torch.allclose(d, s.g2(t.detach()), atol=1e-12)
    assert abs(s.sigma(torch.tensor(0.0, dtype=torch.float64)).item() - 0.1) < 1e-12
    assert abs(s.sigma(torch.tensor(1.0, dtype=torch.float64)).item() - 1.5) < 1e-12


def test_masked_and_centred_translations():
    sp = EuclideanVPSpace(LinearVPSchedule(), event_ndim=2, site_ndim=1, center=True)
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    x = sp.sample_prior(2, (4, 3), [g, g], mask)
    assert torch.all(x[0, 3] == 0)
    com0 = x[0, :3].mean(0)
    assert torch.allclose(com0, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(x[1].mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert sp.dim(x, mask).tolist() == [6.0, 9.0]
    t = torch.full((2,), 0.5, dtype=torch.float64)
    assert torch.allclose(sp.div_drift(x, t, mask), -0.5 * sp.schedule.beta(t) * torch.tensor([6.0, 9.0], dtype=torch.float64))


def test_signatures_distinguish_schedules():
    assert frame_space().signature() == frame_space().signature()
    assert frame_space().signature() != frame_space(beta_max=10.0).signature()
    assert frame_space().signature() != frame_space(sigma_max=1.0).signature()
    assert frame_space().signature() != frame_space(center=True).signature()


def test_so3_step_and_inner_respect_mask():
    sp = SO3Space()
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    r = sp.sample_prior(1, (2,), [g], mask)
    assert torch.allclose(r[0, 1], torch.eye(3, dtype=torch.float64))
    z = sp.randn_tangent(r, [g], mask)
    assert torch.all(z[0, 1] == 0)
    assert torch.allclose(sp.inner(z, z, mask), (z[0, 0] ** 2).sum()[None])
