"""Image adapters: schedules, prediction types, exact Gaussian checks through the adapter interface,
Itô vs Hutchinson, one batched UNet call per step, VJP routing of the prompt group."""
import math
import types
import warnings

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

from models.image.adapters import (ImageModelError, PromptGroup, UNetScoreModel, model_output_to_eps,  # noqa: E402
                                   schedule_from_scheduler, t_to_timestep)
from models.image.tiny import tiny_ddpm_components, tiny_sd_components  # noqa: E402
from superdiff_protein.core.kappa import AndRule, OrRule, SingleRule  # noqa: E402
from superdiff_protein.core.protocol import IncompatibleModelsError  # noqa: E402
from superdiff_protein.core.sampler import BiasedEstimatorWarning, SamplerConfig, make_generators, superpose  # noqa: E402
from superdiff_protein.core.spaces import DiscreteVPSchedule  # noqa: E402

SCHEDULERS = [
    DDPMScheduler(beta_schedule="linear"),
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    DDIMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500),
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
                  prediction_type="v_prediction"),
]


# ------------------------------------------------------------------------------------- exact Gaussian "UNet"
class GaussianEpsUNet(torch.nn.Module):
    """A diffusers-like UNet stand-in whose output is the EXACT network output for Gaussian data
    x_0 ~ N(mean, var I) under the discrete schedule (it reads alpha/sigma from the fractional diffusers
    timestep the adapter passes, via DiscreteVPSchedule.timestep_to_t). With ``means`` (K, C, H, W) and
    ``encoder_hidden_states`` it is text-conditional: the embedding's [0, 0] entry selects the mean."""

    def __init__(self, means, var, schedule: DiscreteVPSchedule, prediction_type="epsilon"):
        super().__init__()
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float64))
        self.var, self.schedule, self.pred = float(var), schedule, prediction_type
        c, h = self.means.shape[1], self.means.shape[2]
        self.config = types.SimpleNamespace(in_channels=c, sample_size=h)
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))   # dtype/device probe

    def exact(self, x, t, k=None):
        a, s = self.schedule.alpha(t).reshape(-1, 1, 1, 1), self.schedule.sigma(t).reshape(-1, 1, 1, 1)
        mu = self.means[0 if k is None else k]
        var_t = a * a * self.var + s * s
        return a, s, mu, var_t

    def log_prob(self, x, t, k=None):
        a, s, mu, var_t = self.exact(x, t, k)
        d = x - a * mu
        return (-0.5 * d * d / var_t - 0.5 * torch.log(2 * math.pi * var_t)).flatten(1).sum(1)

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=False):
        t = self.schedule.timestep_to_t(timestep.double())
        k = None if encoder_hidden_states is None else encoder_hidden_states[:, 0, 0].round().long()
        x = sample.double()
        a, s, mu, var_t = self.exact(x, t, k)
        eps = s * (x - a * mu) / var_t
        out = {"epsilon": eps, "v_prediction": (eps - s * x) / a, "sample": (x - s * eps) / a}[self.pred]
        return (out.to(sample.dtype),)


def _sd_sched():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


# ------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("sched", SCHEDULERS, ids=lambda s: s.config.beta_schedule + str(s.config.rescale_betas_zero_snr))
def test_schedule_matches_alphas_cumprod(sched):
    vp, pred = schedule_from_scheduler(sched)
    n = sched.config.num_train_timesteps
    assert vp.n == n and pred == sched.config.prediction_type
    i = torch.arange(n)
    t = vp.timestep_to_t(i)
    ac = sched.alphas_cumprod.double().clamp(min=1e-12)
    assert torch.allclose(vp.alpha(t) ** 2, ac, rtol=1e-10, atol=0)
    assert torch.allclose(vp.sigma(t) ** 2, 1 - ac, rtol=1e-8, atol=1e-14)
    assert torch.allclose(t_to_timestep(t, vp), i.double(), atol=1e-9)          # exact inverse on the grid
    # config dicts (as stored in scheduler_config.json) give the same schedule
    vp2, _ = schedule_from_scheduler(dict(sched.config))
    assert vp2.signature() == vp.signature()


def test_flow_matching_and_bad_prediction_refused():
    with pytest.raises(ImageModelError, match="flow-matching"):
        schedule_from_scheduler(FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ImageModelError, match="flow"):
        schedule_from_scheduler({"_class_name": "DDPMScheduler", "prediction_type": "flow_prediction"})
    with pytest.raises(ImageModelError, match="unsupported prediction_type"):
        schedule_from_scheduler({"_class_name": "DDPMScheduler", "prediction_type": "x_start"})
    with pytest.raises(ImageModelError):
        schedule_from_scheduler(None)


def test_prediction_type_conversions_roundtrip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    ab = torch.rand(5, 1, 1, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01
    a, s = ab.sqrt(), (1 - ab).sqrt()
    xt = a * x0 + s * eps
    v = a * eps - s * x0                                    # diffusers' velocity definition
    sched = DDPMScheduler()
    ts = torch.randint(0, 1000, (5,), generator=g)
    # our v definition is diffusers' get_velocity
    abt = sched.alphas_cumprod[ts].double().reshape(-1, 1, 1, 1)
    assert torch.allclose(sched.get_velocity(x0, eps, ts).double(), abt.sqrt() * eps - (1 - abt).sqrt() * x0, atol=1e-5)
    for pred, out in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
        assert torch.allclose(model_output_to_eps(out, xt, a, s, pred), eps, atol=1e-10), pred
    with pytest.raises(ImageModelError):
        model_output_to_eps(eps, xt, a, s, "bogus")


# ------------------------------------------------------------------------------------- exact Gaussian proofs
def _gauss_models(pred, sched=None, k=2, var=0.05, seed=0):
    sched = sched or _sd_sched()
    vp, _ = schedule_from_scheduler(sched)
    g = torch.Generator().manual_seed(seed)
    nets = [GaussianEpsUNet(torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64), var, vp, pred) for _ in range(k)]
    models = [UNetScoreModel(n, sched, prediction_type=pred, name=f"g{i}") for i, n in enumerate(nets)]
    return nets, models


def _exact_increment(nets, space, res, seeds, shapes, min_t):
    b = len(seeds)
    x0 = space.sample_prior(b, shapes, make_generators(seeds))
    one, tend = torch.ones(b, dtype=torch.float64), torch.full((b,), min_t, dtype=torch.float64)
    prior = space.prior_log_prob(x0)["x"]
    exact = torch.stack([n.log_prob(res.x["x"], tend) - n.log_prob(x0["x"], one) for n in nets], -1)
    est = res.logq[:, 0] - prior[:, None]
    return exact, est


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_exact_gaussian_log_densities_through_adapter(pred):
    """The core's pathwise Itô exactness reproduced through eps/v/x0 -> score and the discrete schedule:
    the estimate converges to the exact log q_t of every model as the step count grows."""
    nets, models = _gauss_models(pred)
    space = models[0].space
    seeds, shapes, min_t = list(range(24)), {"x": (3, 4, 4)}, 0.05
    errs = []
    for steps in (50, 200, 800):
        cfg = SamplerConfig(num_steps=steps, min_t=min_t, time_grid="quadratic")
        res = superpose(space, models, OrRule(), cfg, seeds, shapes)
        exact, est = _exact_increment(nets, space, res, seeds, shapes, min_t)
        errs.append((est - exact).abs().mean().item())
        scale = exact.abs().mean().item()
    assert errs[2] < 0.6 * errs[0], errs
    assert errs[2] < 0.03 * scale, (errs, scale)


def test_timestep_mapping_off_by_one_would_be_detected():
    """Control for the test above: a stand-in that reads the timestep one step off gives clearly worse
    densities, so the adapter's t <-> timestep map is actually checked."""
    nets, models = _gauss_models("epsilon")
    seeds, shapes, min_t = list(range(24)), {"x": (3, 4, 4)}, 0.05
    cfg = SamplerConfig(num_steps=400, min_t=min_t, time_grid="quadratic")
    good = superpose(models[0].space, models, OrRule(), cfg, seeds, shapes)
    e_good, est_good = _exact_increment(nets, models[0].space, good, seeds, shapes, min_t)
    for n in nets:
        f = n.forward
        n.forward = lambda sample, timestep, f=f, **kw: f(sample, (timestep + 25).clamp(max=999), **kw)
    bad = superpose(models[0].space, models, OrRule(), cfg, seeds, shapes)
    e_bad, est_bad = _exact_increment(nets, models[0].space, bad, seeds, shapes, min_t)
    assert (est_bad - e_bad).abs().mean() > 3 * (est_good - e_good).abs().mean()


def test_ito_and_hutchinson_agree_in_expectation_on_image_model():
    """Itô (SDE), Hutchinson (probability-flow ODE) and Hutchinson at noise_scale 0.5 all agree with the
    exact log density, and hence with each other, in expectation; the plain Itô estimate at
    noise_scale 0.5 is biased."""
    nets, models = _gauss_models("v_prediction", k=1, var=0.1)
    space, seeds, shapes, min_t = models[0].space, list(range(96)), {"x": (3, 4, 4)}, 0.02

    scale = []

    def err(**kw):
        cfg = SamplerConfig(num_steps=1000, min_t=min_t, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BiasedEstimatorWarning)
            res = superpose(space, models, SingleRule(0), cfg, seeds, shapes)
        exact, est = _exact_increment(nets, space, res, seeds, shapes, min_t)
        e = (est - exact).flatten()
        scale.append(exact.abs().mean().item())
        return e.mean().item(), e.std().item() / math.sqrt(len(e))

    ito = err()
    ode_h = err(sampling="ode", estimator="hutchinson")
    half_h = err(noise_scale=0.5, estimator="hutchinson", num_probes=2)
    biased = err(noise_scale=0.5)
    # tolerance: 4 standard errors + the O(d dtau) discretisation bias of the Itô estimator (d = 48 here:
    # ~1% of the log-density change at 1000 steps; it shrinks ~1/steps, see the exactness test above)
    tol = 0.02 * max(scale)
    for m, se in (ito, ode_h, half_h):
        assert abs(m) < 4 * se + tol, (ito, ode_h, half_h, tol)
    assert abs(ito[0] - ode_h[0]) < 4 * math.hypot(ito[1], ode_h[1]) + tol
    assert abs(biased[0]) > 10 * biased[1] + 3 * tol, (biased, tol)


def test_prompt_group_exact_per_prompt_and_cfg():
    """A conditional exact stand-in in a PromptGroup: with guidance 1 every view is the exact score of
    its prompt's Gaussian (so the log densities are exact); with guidance w the view's score is
    s_u + w (s_c - s_u) with ONE shared unconditional branch."""
    sched = _sd_sched()
    vp, _ = schedule_from_scheduler(sched)
    g = torch.Generator().manual_seed(3)
    means = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)     # index 0 = unconditional
    net = GaussianEpsUNet(means, 0.05, vp)
    emb = lambda k: torch.full((1, 2, 3), float(k), dtype=torch.float64)
    cond = torch.cat([emb(1), emb(2)])
    grp = PromptGroup(net, cond, emb(0), 1.0, sched)
    assert not grp.use_uncond
    seeds, shapes, min_t = list(range(16)), {"x": (4, 4, 4)}, 0.05
    cfg = SamplerConfig(num_steps=300, min_t=min_t, time_grid="quadratic")
    res = superpose(grp.space, grp.views, OrRule(), cfg, seeds, shapes)
    assert grp.num_unet_calls == cfg.num_steps                          # one batched call per step
    b = len(seeds)
    x0 = grp.space.sample_prior(b, shapes, make_generators(seeds))
    one, tend = torch.ones(b, dtype=torch.float64), torch.full((b,), min_t, dtype=torch.float64)
    kk = lambda k: torch.full((b,), k, dtype=torch.long)
    exact = torch.stack([net.log_prob(res.x["x"], tend, kk(k)) - net.log_prob(x0["x"], one, kk(k)) for k in (1, 2)], -1)
    est = res.logq[:, 0] - grp.space.prior_log_prob(x0)["x"][:, None]
    assert (est - exact).abs().mean() < 0.03 * exact.abs().mean()

    w = 4.0
    grp_w = PromptGroup(net, cond, emb(0), w, sched)
    x = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)
    with torch.no_grad():
        scores = [v({"x": x}, t, None, None).scores["x"] for v in grp_w.views]
    a, s = vp.alpha(t).reshape(-1, 1, 1, 1), vp.sigma(t).reshape(-1, 1, 1, 1)
    exact_score = lambda k: -(x - a * means[k]) / (a * a * 0.05 + s * s)
    for i, k in enumerate((1, 2)):
        ref = exact_score(0) + w * (exact_score(k) - exact_score(0))
        assert torch.allclose(scores[i], ref, atol=1e-8)
    assert grp_w.num_unet_calls == 1


# ------------------------------------------------------------------------------------- tiny real UNets
@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    c = tiny_sd_components(tmp_path_factory.mktemp("sd"), seed=0)
    c["unet"].double()
    return c


def _group(c, prompts=("a cat", "a dog", "a red car"), w=5.0):
    from models.image.adapters import encode_prompts

    cond = encode_prompts(c["tokenizer"], c["text_encoder"], list(prompts)).double()
    unc = encode_prompts(c["tokenizer"], c["text_encoder"], [""]).double()
    return PromptGroup(c["unet"], cond, unc, w, c["scheduler"]), cond, unc


def test_one_batched_unet_call_per_step(tiny_sd):
    grp, _, _ = _group(tiny_sd)
    batches = []
    h = tiny_sd["unet"].register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))
    try:
        for rule in (AndRule(), OrRule()):
            batches.clear()
            n0 = grp.num_unet_calls
            superpose(grp.space, grp.views, rule, SamplerConfig(num_steps=4, and_correction=False), [0, 1], {"x": (4, 8, 8)})
            assert grp.num_unet_calls - n0 == 4
            assert batches == [(3 + 1) * 2] * 4          # 3 prompts + shared uncond, batch 2, one call per step
    finally:
        h.remove()


def test_group_views_equal_separate_guided_models(tiny_sd):
    """Grouped evaluation (shared uncond, one call) gives the same scores as one group per prompt."""
    grp, cond, unc = _group(tiny_sd)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0.7, 0.3], dtype=torch.float64)
    with torch.no_grad():
        together = [v({"x": x}, t, None, None).scores["x"] for v in grp.views]
        alone = [PromptGroup(tiny_sd["unet"], cond[i:i + 1], unc, 5.0, tiny_sd["scheduler"]).views[0]({"x": x}, t, None, None).scores["x"]
                 for i in range(3)]
    for a, b in zip(together, alone):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-7)


def test_vjp_routing_matches_direct_autograd(tiny_sd):
    """The grouped views' VJPs (routed into the one batched graph) equal VJPs of a directly
    differentiated single-prompt evaluation -- so Hutchinson / AND-correction terms are exact."""
    grp, cond, unc = _group(tiny_sd)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.6, 0.2], dtype=torch.float64)
    v = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    for i in range(3):
        u = torch.zeros_like(x, requires_grad=True)
        s = grp.views[i]({"x": x + u}, t, None, None).scores["x"]
        (gi,) = torch.autograd.grad((s * v).sum(), u)
        ref_grp = PromptGroup(tiny_sd["unet"], cond[i:i + 1], unc, 5.0, tiny_sd["scheduler"])
        xr = x.clone().requires_grad_(True)
        (gr,) = torch.autograd.grad((-ref_grp.guided_eps(xr, t)[0] / ref_grp.schedule.sigma(t).reshape(-1, 1, 1, 1) * v).sum(), xr)
        assert torch.allclose(gi, gr, atol=1e-9, rtol=1e-6), i
    assert grp.num_unet_calls == 1          # all three views' VJPs used the one cached batched graph


def test_hutchinson_trace_matches_exact_jacobian_trace(tiny_sd):
    """Hutchinson (Rademacher probes through the grouped VJP path) agrees in expectation with the exact
    trace of the tiny SD UNet's guided-score Jacobian (the Laplacian of log q the estimator needs)."""
    grp, _, _ = _group(tiny_sd, prompts=("a cat", "a dog"))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.5], dtype=torch.float64)
    view = grp.views[1]
    f = lambda z: view({"x": z}, t, None, None).scores["x"]
    jac = torch.autograd.functional.jacobian(f, x).reshape(x.numel(), x.numel())
    exact = torch.trace(jac).item()
    u = torch.zeros_like(x, requires_grad=True)
    s = f(x + u)
    qs = []
    for _ in range(300):
        z = torch.randint(0, 2, x.shape, generator=g).double() * 2 - 1
        (gz,) = torch.autograd.grad((s * z).sum(), u, retain_graph=True)
        qs.append((gz * z).sum().item())
    qs = torch.tensor(qs)
    se = qs.std().item() / math.sqrt(len(qs))
    assert abs(qs.mean().item() - exact) < 4 * se + 1e-6 * abs(exact), (qs.mean().item(), exact, se)


def test_pixel_unet_and_incompatible_models_refused(tmp_path):
    a = tiny_ddpm_components(seed=0)
    b = tiny_ddpm_components(seed=1)
    ma, mb = UNetScoreModel(a["unet"], a["scheduler"], name="a"), UNetScoreModel(b["unet"], b["scheduler"], name="b")
    res = superpose(ma.space, [ma, mb], OrRule(), SamplerConfig(num_steps=3), [0, 1], {"x": (3, 8, 8)})
    assert res.x["x"].shape == (2, 3, 8, 8) and torch.isfinite(res.logq).all()
    other = UNetScoreModel(b["unet"], DDPMScheduler(beta_schedule="scaled_linear"), name="c")
    with pytest.raises(IncompatibleModelsError, match="alphas_cumprod"):
        superpose(ma.space, [ma, other], OrRule(), SamplerConfig(num_steps=2), [0], {"x": (3, 8, 8)})
    # pixel vs latent representation differ -> refused even with equal schedules
    sd = tiny_sd_components(tmp_path, seed=0)
    grp = PromptGroup(sd["unet"], torch.zeros(1, 16, 16), None, 1.0, a["scheduler"],
                      representation={"kind": "vae_latent", "channels": 4})
    with pytest.raises(IncompatibleModelsError, match="representation"):
        superpose(ma.space, [ma, grp.views[0]], OrRule(), SamplerConfig(num_steps=2), [0], {"x": (3, 8, 8)})
    with pytest.raises(ImageModelError, match="mask"):
        ma({"x": torch.zeros(1, 3, 8, 8)}, torch.ones(1), torch.ones(1, 3), None)
