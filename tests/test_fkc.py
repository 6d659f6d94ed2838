"""Feynman–Kac correctors (core/fkc.py, core/smc.py) on exact models: the corrected runs hit the target,
the uncorrected ones (the same drift, weights ignored) miss it measurably.

Monte Carlo error: every group of K particles gives one self-normalised estimate; the G group estimates
are independent, so their mean has standard error sd/sqrt(G). A test passes when the corrected estimate
lies within 4 standard errors (+ a stated discretisation allowance) of the exact value, and the uncorrected
one lies more than 4 standard errors away.
"""
import math
import warnings

import pytest
import torch

from models.analytic import frame_mixture_model, gaussian_mixture_model
from superdiff_protein.core.fkc import AnnealRule, GeometricRule, ImproperTargetWarning, ProductRule
from superdiff_protein.core.igso3 import igso3_log_density, sample_uniform_so3
from superdiff_protein.core.kappa import OrRule
from superdiff_protein.core.sampler import SamplerConfig, superpose
from superdiff_protein.core.smc import SMCConfig, ess, resample_indices
from superdiff_protein.core.spaces import LinearVPSchedule
from superdiff_protein.frames.geometry import so3_log

K, G = 64, 32                     # particles per group, groups
SEEDS = list(range(K * G))


def group_estimates(result, fn):
    """(G,) self-normalised weighted mean of fn(x) per group, and the unweighted per-group mean."""
    v = fn(result.x).reshape(G, K)
    w = torch.softmax(result.log_weight.reshape(G, K), -1)
    return (w * v).sum(-1), v.mean(-1)


def uncorrected(models, rule, fn, **kw):
    """(G,) per-group means of fn(x) from the same drift with the weights ignored (no resampling)."""
    return group_estimates(run(models, rule, smc=SMCConfig(group_size=K, resample="none"), **kw), fn)[1]


def check(est, target, allowance=0.0):
    """Corrected estimate within 4 standard errors (+ allowance) of target; returns the standard error."""
    se = float(est.std() / math.sqrt(est.numel()))
    assert abs(float(est.mean()) - target) < 4 * se + allowance, (float(est.mean()), target, se)
    return se


def misses(est, target):
    se = float(est.std() / math.sqrt(est.numel()))
    assert abs(float(est.mean()) - target) > 4 * se, (float(est.mean()), target, se)


def run(models, rule, steps=100, smc=None, **cfg):
    cfg.setdefault("min_t", 1e-3)
    space = models[0].space
    shapes = {k: (1,) for k in space.names}
    return superpose(space, models, rule, SamplerConfig(num_steps=steps, **cfg), SEEDS, shapes,
                     smc=smc or SMCConfig(group_size=K))


X = lambda x: x["x"][:, 0]
X2 = lambda x: x["x"][:, 0] ** 2


# ------------------------------------------------------------------------------------------ Gaussians
def test_product_of_two_gaussians():
    m1 = gaussian_mixture_model([[1.0]], 0.5 ** 2, name="a")
    m2 = gaussian_mixture_model([[-1.5]], 1.0, name="b")
    prec = 1 / 0.25 + 1.0
    mu, var = (1.0 / 0.25 - 1.5) / prec, 1 / prec
    r = run([m1, m2], ProductRule(), steps=200)      # at 100 steps the O(dtau) bias is ~2.5 standard errors
    check(group_estimates(r, X)[0], mu)
    check(group_estimates(r, X2)[0], var + mu * mu)
    misses(uncorrected([m1, m2], ProductRule(), X2), var + mu * mu)


def test_annealed_gaussian_variance():
    m = gaussian_mixture_model([[0.5]], 0.8, name="a")
    beta = 2.0
    r = run([m], AnnealRule(beta=beta))
    fn = lambda x: (x["x"][:, 0] - 0.5) ** 2
    check(group_estimates(r, fn)[0], 0.8 / beta)
    misses(uncorrected([m], AnnealRule(beta=beta), fn), 0.8 / beta)


def test_annealed_separated_mixture_weights_and_widths():
    w, s, mu, beta = (0.3, 0.7), (0.4, 0.6), (-3.0, 3.0), 2.0
    m = gaussian_mixture_model([[mu[0]], [mu[1]]], torch.tensor([s[0] ** 2, s[1] ** 2]), torch.tensor(w))
    a = [wk ** beta * sk ** (1 - beta) for wk, sk in zip(w, s)]       # d = 1
    p_right = a[1] / sum(a)
    r = run([m], AnnealRule(beta=beta))
    fn = lambda x: (x["x"][:, 0] > 0).double()
    check(group_estimates(r, fn)[0], p_right)
    misses(uncorrected([m], AnnealRule(beta=beta), fn), p_right)
    # within-component variance s_k^2 / beta (right component)
    v = ((r.x["x"][:, 0] - mu[1]) ** 2 * (r.x["x"][:, 0] > 0)).reshape(G, K)
    wt = torch.softmax(r.log_weight.reshape(G, K), -1) * (r.x["x"][:, 0] > 0).reshape(G, K)
    keep = wt.sum(-1) > 0
    est = (wt * v).sum(-1)[keep] / wt.sum(-1)[keep]
    check(est, s[1] ** 2 / beta)


def test_geometric_average_precision():
    s1, s2, gamma = 1.0, 0.5, 0.7
    m1 = gaussian_mixture_model([[0.0]], s1 ** 2, name="u")
    m2 = gaussian_mixture_model([[1.0]], s2 ** 2, name="c")
    prec = (1 - gamma) / s1 ** 2 + gamma / s2 ** 2
    mu = gamma * 1.0 / s2 ** 2 / prec
    r = run([m1, m2], GeometricRule(gamma=gamma))
    fn = lambda x: (x["x"][:, 0] - mu) ** 2
    check(group_estimates(r, X)[0], mu)
    check(group_estimates(r, fn)[0], 1 / prec)
    misses(uncorrected([m1, m2], GeometricRule(gamma=gamma), fn), 1 / prec)


def test_normalising_constant_of_a_product():
    """With exact start weights (init_logq='model'), mean w estimates Z = int q_1 q_2 at min_t."""
    m1 = gaussian_mixture_model([[1.0]], 0.5 ** 2, name="a")
    m2 = gaussian_mixture_model([[-1.0]], 0.7 ** 2, name="b")
    min_t = 1e-3
    sch = LinearVPSchedule()
    t = torch.tensor(min_t, dtype=torch.float64)
    a, s2 = float(sch.alpha(t)), float(sch.sigma(t)) ** 2
    v = a * a * (0.25 + 0.49) + 2 * s2
    log_z = -0.5 * (a * 2.0) ** 2 / v - 0.5 * math.log(2 * math.pi * v)
    r = run([m1, m2], ProductRule(), init_logq="model", min_t=min_t)
    z = torch.exp(r.log_z)                       # unbiased for Z per group
    check(z, math.exp(log_z))


def test_errors_shrink_with_particles():
    """The spread of the group estimates of a product's mean falls like 1/sqrt(K)."""
    m1 = gaussian_mixture_model([[1.0]], 0.25, name="a")
    m2 = gaussian_mixture_model([[-1.5]], 1.0, name="b")
    sds = []
    for k in (8, 128):
        seeds = list(range(k * 16))
        r = superpose(m1.space, [m1, m2], ProductRule(), SamplerConfig(num_steps=60, min_t=1e-3), seeds,
                      {"x": (1,)}, smc=SMCConfig(group_size=k))
        v, w = r.x["x"][:, 0].reshape(16, k), torch.softmax(r.log_weight.reshape(16, k), -1)
        sds.append(float((w * v).sum(-1).std()))
    assert sds[1] < 0.5 * sds[0], sds            # 1/sqrt(16) = 0.25 expected; 0.5 leaves room for noise


def test_eta_below_one_collapses_under_resampling():
    """The tempered-noise choice eta = 1/sqrt(beta) at beta = 3 settles at a wrong variance; eta = 1 does not."""
    m = gaussian_mixture_model([[0.0]], 1.0, name="a")
    beta = 3.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        good = run([m], AnnealRule(beta=beta), steps=200)
        bad = run([m], AnnealRule(beta=beta), steps=200, noise_scale=1 / math.sqrt(beta))
    e_good = group_estimates(good, X2)[0]
    e_bad = group_estimates(bad, X2)[0]
    assert abs(float(e_good.mean()) - 1 / beta) < abs(float(e_bad.mean()) - 1 / beta)
    misses(e_bad, 1 / beta)


# ------------------------------------------------------------------------------------------ SO(3)
def _omega(x):
    return so3_log(x["rot"][:, 0]).norm(dim=-1)


def test_annealed_igso3_angle_law():
    """Annealed IGSO(3) at min_t: the angle law is ∝ f_sigma(w)^beta (1 - cos w) (exact start weights)."""
    from models.analytic import AnalyticModel, SO3PointMixture
    from superdiff_protein.core.spaces import LogLinearSigmaSchedule, ProductSpace, SO3Space
    sch = LogLinearSigmaSchedule()
    space = ProductSpace({"rot": SO3Space(sch)})
    m = AnalyticModel(space, {"rot": SO3PointMixture(torch.eye(3, dtype=torch.float64)[None, None], None, sch)})
    beta, min_t = 2.0, 0.3
    sigma = sch.sigma(torch.tensor(min_t, dtype=torch.float64))
    w = torch.linspace(1e-4, math.pi, 20001, dtype=torch.float64)
    dens = torch.exp(beta * igso3_log_density(w, sigma)) * (1 - torch.cos(w))
    exact = float((w * dens).sum() / dens.sum())
    r = superpose(space, [m], AnnealRule(beta=beta), SamplerConfig(num_steps=100, min_t=min_t, init_logq="model"),
                  SEEDS, {"rot": (1,)}, smc=SMCConfig(group_size=K))
    check(group_estimates(r, _omega)[0], exact)
    r_u = superpose(space, [m], AnnealRule(beta=beta), SamplerConfig(num_steps=100, min_t=min_t), SEEDS,
                    {"rot": (1,)}, smc=SMCConfig(group_size=K, resample="none"))
    misses(group_estimates(r_u, _omega)[1], exact)


def _frames(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return frame_mixture_model(sample_uniform_so3((2, n), generator=g),
                               torch.randn(2, n, 3, generator=g, dtype=torch.float64), 0.05, name=f"f{seed}")


def test_product_of_identical_models_is_anneal():
    """M identical models under product = the model annealed with beta = M (same arithmetic)."""
    f = _frames(0)
    cfg = SamplerConfig(num_steps=30, min_t=0.01)
    seeds = list(range(8))
    a = superpose(f.space, [f, f, f], ProductRule(), cfg, seeds, {"rot": (3,), "trans": (3, 3)},
                  smc=SMCConfig(group_size=4))
    b = superpose(f.space, [f], AnnealRule(beta=3.0), cfg, seeds, {"rot": (3,), "trans": (3, 3)},
                  smc=SMCConfig(group_size=4))
    tol = 64 * torch.finfo(torch.float64).eps * 30
    for k in ("rot", "trans"):
        assert torch.allclose(a.x[k], b.x[k], atol=tol * (1 + float(a.x[k].abs().max())), rtol=0), k
    assert torch.allclose(a.log_weight, b.log_weight, atol=1e-8 * (1 + float(a.log_weight.abs().max())))
    assert torch.equal(a.ancestor, b.ancestor)


def test_frames_product_mean_translation():
    """On exact frame models (two-point translations), product weights move the translation mean to the
    product's: every residue's product mean is a precision-weighted mean of the models' means."""
    f1, f2 = _frames(1, 1), _frames(2, 1)
    r = superpose(f1.space, [f1, f2], ProductRule(), SamplerConfig(num_steps=100, min_t=1e-3), SEEDS,
                  {"rot": (1,), "trans": (1, 3)}, smc=SMCConfig(group_size=K))
    # exact product of two 2-component Gaussian mixtures (equal weights, var 0.05): a 4-component mixture
    m1, m2 = f1.parts["trans"].means[:, 0], f2.parts["trans"].means[:, 0]       # (2, 3)
    comp_w, comp_mu = [], []
    for i in range(2):
        for j in range(2):
            d = m1[i] - m2[j]
            comp_w.append(float(torch.exp(-0.25 * (d * d).sum() / 0.05)))
            comp_mu.append((m1[i] + m2[j]) / 2)
    cw = torch.tensor(comp_w) / sum(comp_w)
    target = (cw[:, None] * torch.stack(comp_mu)).sum(0)
    for c in range(3):
        check(group_estimates(r, lambda x: x["trans"][:, 0, c])[0], float(target[c]))


# ------------------------------------------------------------------------------------------ SMC mechanics
def test_resampling_is_deterministic_and_batch_independent():
    f = _frames(0)
    cfg = SamplerConfig(num_steps=20, min_t=0.01)
    seeds = list(range(16))
    smc = SMCConfig(group_size=4, ess_threshold=1.0)
    sh = {"rot": (3,), "trans": (3, 3)}
    whole = superpose(f.space, [f, _frames(3)], ProductRule(), cfg, seeds, sh, smc=smc)
    again = superpose(f.space, [f, _frames(3)], ProductRule(), cfg, seeds, sh, smc=smc)
    half = superpose(f.space, [f, _frames(3)], ProductRule(), cfg, seeds[8:], sh, smc=smc)
    assert torch.equal(whole.x["trans"], again.x["trans"]) and torch.equal(whole.ancestor, again.ancestor)
    assert torch.equal(whole.x["trans"][8:], half.x["trans"])
    assert torch.equal(whole.ancestor[8:] - 8, half.ancestor)
    assert bool(whole.resampled.all())


def test_systematic_and_multinomial_resampling_follow_the_weights():
    g = torch.Generator().manual_seed(0)
    logw = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    for scheme in ("systematic", "multinomial"):
        counts = torch.zeros(4)
        for _ in range(2000):
            counts += torch.bincount(resample_indices(logw, scheme, g), minlength=4)
        freq = counts / counts.sum()
        assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]).float(), atol=0.02), (scheme, freq)
    # systematic: each index appears floor(K w) or ceil(K w) times
    idx = resample_indices(torch.log(torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)), "systematic", g)
    assert sorted(torch.bincount(idx, minlength=3).tolist()) in ([0, 1, 2], [1, 1, 1], [1, 2, 0], [0, 1, 2])
    assert float(ess(torch.zeros(5))) == pytest.approx(5.0)


def test_anneal_of_or_mixture_reweights_components():
    """Annealing the OR mixture of two separated models by beta = 2: the odds become (w_1/w_2)^2 for
    equal widths, e^{2 l} with a bias l."""
    m1 = gaussian_mixture_model([[-3.0]], 0.25, name="a")
    m2 = gaussian_mixture_model([[3.0]], 0.25, name="b")
    l = math.log(2.0)                   # mixture weights 1/3, 2/3
    p_right = 4.0 / 5.0                 # (2/3)^2 / ((1/3)^2 + (2/3)^2)
    r = run([m1, m2], AnnealRule(beta=2.0, of="or", bias=[0.0, l]))
    fn = lambda x: (x["x"][:, 0] > 0).double()
    check(group_estimates(r, fn)[0], p_right)
    # the split alone is nearly right without weights (it is decided early); the widths are not: 0.25 / 2
    width = lambda x: (x["x"][:, 0].abs() - 3.0) ** 2
    check(group_estimates(r, width)[0], 0.125)
    misses(uncorrected([m1, m2], AnnealRule(beta=2.0, of="or", bias=[0.0, l]), width), 0.125)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        AnnealRule(beta=beta)


def test_geometric_outside_unit_interval_warns():
    with pytest.warns(ImproperTargetWarning):
        GeometricRule(gamma=1.5)


def test_group_size_must_divide_batch_and_lengths_must_match():
    m = gaussian_mixture_model([[0.0]], 1.0)
    with pytest.raises(ValueError, match="does not divide"):
        superpose(m.space, [m], AnnealRule(beta=2.0), SamplerConfig(num_steps=2), list(range(6)), {"x": (1,)},
                  smc=SMCConfig(group_size=4))
    from superdiff_protein.core.smc import SMCTracker
    mask = torch.ones(4, 5)
    mask[1, 4] = 0
    with pytest.raises(ValueError, match="same length"):
        SMCTracker(SMCConfig(group_size=4), list(range(4)), mask)


def test_smc_needs_weights_and_rules_check_model_count():
    m = gaussian_mixture_model([[0.0]], 1.0)
    with pytest.raises(ValueError, match="importance weights"):
        superpose(m.space, [m, m], OrRule(), SamplerConfig(num_steps=2), [0, 1], {"x": (1,)},
                  smc=SMCConfig(group_size=2))
    with pytest.raises(ValueError, match="exactly 2 models"):
        superpose(m.space, [m, m, m], GeometricRule(0.5), SamplerConfig(num_steps=2), [0], {"x": (1,)})
    with pytest.raises(ValueError, match="index="):
        superpose(m.space, [m, m], AnnealRule(beta=2.0), SamplerConfig(num_steps=2), [0], {"x": (1,)})
