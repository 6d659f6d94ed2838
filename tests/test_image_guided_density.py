"""Classifier-free guidance and density tracking (docs/images.md, "What the log-densities are").

Analytic case: Gaussian class-conditionals N(mu_k, var_k I) under an SD-style VP schedule, the
unconditional model their equal mixture, all scores exact, guidance w = 3. The guided field
s_u + w (s_k - s_u) is not the score of any forward-process marginal. With ``density="unguided"``
(default) the sampler moves along the guided drift and tracks each prompt's unguided conditional: the
estimate matches the exact change of log q_t(x_t | k) along the sampled path. With ``density="guided"``
it does not (and the pipeline warns).
"""
import math
import types
import warnings

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDPMScheduler  # noqa: E402

from models.image.adapters import (GuidedDensityWarning, ImageModelError, PromptGroup,  # noqa: E402
                                   schedule_from_scheduler)
from superdiff_protein.core.kappa import AndRule, OrRule  # noqa: E402
from superdiff_protein.core.sampler import (BiasedEstimatorWarning, SamplerConfig, _bilinear_forms,  # noqa: E402
                                       _noise_cancelling_directions, _oblique_and_corrections, _quadratic_forms,
                                       make_generators, superpose)

W = 3.0


class GaussianClassesUNet(torch.nn.Module):
    """Diffusers-like text-conditional UNet stand-in returning the EXACT noise prediction of
    class-conditional Gaussian data x_0 | k ~ N(mu_k, var_k I), k = 1..K; the embedding's [0, 0] entry
    selects k, and 0 is the unconditional model: the equal mixture of the K classes."""

    def __init__(self, means, variances, schedule):
        super().__init__()
        self.register_buffer("means", torch.as_tensor(means, dtype=torch.float64))          # (K, C, H, W)
        self.var = torch.as_tensor(variances, dtype=torch.float64).reshape(-1, 1, 1, 1)
        self.schedule = schedule
        self.config = types.SimpleNamespace(in_channels=self.means.shape[1], sample_size=self.means.shape[2])
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))             # dtype/device probe

    def _classes(self, x, t):
        a = self.schedule.alpha(t).reshape(-1, 1, 1, 1, 1)
        s = self.schedule.sigma(t).reshape(-1, 1, 1, 1, 1)
        v = a * a * self.var[None] + s * s                                                # (B, K, 1, 1, 1)
        d = x[:, None] - a * self.means[None]
        lp = (-0.5 * d * d / v - 0.5 * torch.log(2 * math.pi * v)).flatten(2).sum(2)      # (B, K)
        return -d / v, lp

    def log_prob(self, x, t, k):
        """Exact log q_t(x | k); k = 0 the unconditional mixture."""
        _, lp = self._classes(x, t)
        return torch.logsumexp(lp, 1) - math.log(lp.shape[1]) if k == 0 else lp[:, k - 1]

    def score(self, x, t, k):
        sc, lp = self._classes(x, t)
        if k == 0:
            return (torch.softmax(lp, 1)[..., None, None, None] * sc).sum(1)
        return sc[:, k - 1]

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=False):
        t = self.schedule.timestep_to_t(timestep.double())
        k = encoder_hidden_states[:, 0, 0].round().long()
        x = sample.double()
        sc, lp = self._classes(x, t)
        mix = (torch.softmax(lp, 1)[..., None, None, None] * sc).sum(1)
        cls = sc[torch.arange(x.shape[0]), (k - 1).clamp(min=0)]
        score = torch.where((k == 0).reshape(-1, 1, 1, 1), mix, cls)
        return ((-self.schedule.sigma(t).reshape(-1, 1, 1, 1) * score).to(sample.dtype),)


def _sched():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _emb(k):
    return torch.full((1, 2, 3), float(k), dtype=torch.float64)


def _group(net, density, w=W):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GuidedDensityWarning)
        return PromptGroup(net, torch.cat([_emb(1), _emb(2)]), _emb(0), w, _sched(), density=density)


def _run(net, density, rule, seeds, shapes, min_t, w=W, **kw):
    """(estimated, exact) change of log q_t(x_t | k) along the sampled path and the exact end values, (B, 2)."""
    grp = _group(net, density, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BiasedEstimatorWarning)
        cfg = SamplerConfig(min_t=min_t, time_grid="quadratic", **kw)
        res = superpose(grp.space, grp.views, rule, cfg, seeds, shapes)
    b = len(seeds)
    x0 = grp.space.sample_prior(b, shapes, make_generators(seeds))
    one, tend = torch.ones(b, dtype=torch.float64), torch.full((b,), min_t, dtype=torch.float64)
    end = torch.stack([net.log_prob(res.x["x"], tend, k) for k in (1, 2)], -1)
    exact = end - torch.stack([net.log_prob(x0["x"], one, k) for k in (1, 2)], -1)
    est = res.logq[:, 0] - grp.space.prior_log_prob(x0)["x"][:, None]
    return est, exact, end


def test_guided_prompts_track_exact_conditional_densities_image_shaped():
    """OR of two guided prompts (w = 3) on 3x4x4 "latents": the unguided tracking converges to the exact
    log q_t(x_t | k) change as the step size shrinks (the Itô estimator's O(d dtau) discretisation bias,
    ~1.6 % at 400 steps); the guided tracking is off by thousands of nats and does not converge."""
    vp, _ = schedule_from_scheduler(_sched())
    g = torch.Generator().manual_seed(0)
    net = GaussianClassesUNet(torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), [0.05, 0.05], vp)
    seeds, shapes, min_t = list(range(24)), {"x": (3, 4, 4)}, 0.05
    err = {}
    for density in ("unguided", "guided"):
        for steps in (100, 400):
            est, exact, _ = _run(net, density, OrRule(), seeds, shapes, min_t, num_steps=steps)
            err[density, steps] = (est - exact).abs().mean().item()
            scale = exact.abs().mean().item()
    # unguided: the error shrinks with the step size (~1/steps) and is small against the change itself
    assert err["unguided", 400] < 0.6 * err["unguided", 100], err
    assert err["unguided", 400] < 0.03 * scale, (err, scale)
    # guided: not the log of any density -- larger than the change itself, and no convergence
    assert err["guided", 400] > 0.5 * scale, (err, scale)
    assert err["guided", 400] > 0.8 * err["guided", 100], err
    assert err["guided", 400] > 20 * err["unguided", 400], err


def _net2d():
    """Three classes in 2-D, prompts for classes 1 and 2: the unconditional mixture (all three) is not in
    the affine span of the two prompts' scores, so unequal guidance scales tilt span{d_2 - d_1} away from
    span{s_2 - s_1} (the oblique case of the AND correction). Unequal widths: the Hessians differ."""
    vp, _ = schedule_from_scheduler(_sched())
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.5]], dtype=torch.float64).reshape(3, 1, 1, 2)
    return GaussianClassesUNet(means, [0.2, 1.0, 0.5], vp)


SEEDS2, SHAPES2, MIN_T2 = list(range(300)), {"x": (1, 1, 2)}, 0.01


def _mean_se(est, exact):
    e = est - exact
    return e.mean(0), e.std(0) / math.sqrt(e.shape[0])


@pytest.mark.parametrize("w", [W, [W, 1.5]], ids=["w3", "w3_1.5"])
def test_and_with_guidance_tracks_conditionals_with_oblique_correction(w):
    """AND of two guided prompts in 2-D, 300 samples: with the unguided densities and the AND correction
    (the oblique noise cancellation: AND fixes the noise along the density-score differences by moving
    along the guided-score differences) every model's estimate is unbiased within 4 standard errors plus
    the O(dtau) discretisation allowance; without the correction it is biased by O(1) nats, and so are the
    guided estimates. The true conditional log-densities end up equal (AND) only with the correction."""
    net = _net2d()
    est, exact, end = _run(net, "unguided", AndRule(), SEEDS2, SHAPES2, MIN_T2, num_steps=300, and_correction=True, w=w)
    assert torch.allclose(est[:, 0], est[:, 1], atol=1e-6)              # AND: equal estimates by construction
    m, se = _mean_se(est, exact)
    assert (m.abs() < 4 * se + 0.05).all(), (m, se)
    gap = (end[:, 0] - end[:, 1]).abs().median().item()

    est_p, exact_p, end_p = _run(net, "unguided", AndRule(), SEEDS2, SHAPES2, MIN_T2, num_steps=300,
                                 and_correction=False, w=w)
    mp, sep = _mean_se(est_p, exact_p)
    assert (mp.abs() > 10 * sep + 1.0).all(), (mp, sep)
    gap_p = (end_p[:, 0] - end_p[:, 1]).abs().median().item()
    assert gap < 0.3 * gap_p, (gap, gap_p)

    est_g, exact_g, _ = _run(net, "guided", AndRule(), SEEDS2, SHAPES2, MIN_T2, num_steps=300, and_correction=True, w=w)
    mg, seg = _mean_se(est_g, exact_g)
    assert (mg.abs() > 10 * seg + 0.5).all(), (mg, seg)


def test_hutchinson_tracks_conditionals_under_guidance():
    """The divergence estimator uses the Jacobian of the density score (routed through the group's
    graph): probability-flow ODE + Hutchinson and noise_scale 0.5 + Hutchinson along the guided drift are
    unbiased for the conditional densities; the guided ODE estimate is not."""
    net = _net2d()
    for kw in (dict(sampling="ode", estimator="hutchinson"), dict(noise_scale=0.5, estimator="hutchinson")):
        est, exact, _ = _run(net, "unguided", OrRule(), SEEDS2, SHAPES2, MIN_T2, num_steps=300, **kw)
        m, se = _mean_se(est, exact)
        assert (m.abs() < 4 * se + 0.05).all(), (kw, m, se)
    est, exact, _ = _run(net, "guided", OrRule(), SEEDS2, SHAPES2, MIN_T2, num_steps=300, sampling="ode",
                         estimator="hutchinson")
    m, se = _mean_se(est, exact)
    assert (m.abs() > 10 * se + 1.0).any(), (m, se)


def test_oblique_and_correction_matches_dense_formula():
    """_oblique_and_corrections against tr(G J_i G (P P^T - I)), P = I - V (U^T V)^-1 U^T computed with
    dense matrices (U = G(s_i - s_1), V = G(d_j - d_1), non-symmetric J_i); with D = S it equals the
    orthogonal correction -sum_a v_a^T J_i v_a of the unguided path."""
    vp, _ = schedule_from_scheduler(_sched())
    grp = _group(GaussianClassesUNet(torch.zeros(2, 1, 2, 3, dtype=torch.float64), [1.0, 1.0], vp), "unguided")
    space, B, M, shape = grp.space, 3, 3, (1, 2, 3)
    n = math.prod(shape)
    gen = torch.Generator().manual_seed(11)
    S = torch.randn(B, M, *shape, generator=gen, dtype=torch.float64)
    D = torch.randn(B, M, *shape, generator=gen, dtype=torch.float64)
    J = torch.randn(M, B, n, n, generator=gen, dtype=torch.float64)
    gval = torch.tensor([0.7, 1.3, 2.0], dtype=torch.float64)
    graphs = []
    for i in range(M):
        u = {"x": torch.zeros(B, *shape, dtype=torch.float64, requires_grad=True)}
        sc = S[:, i] + (J[i] @ u["x"].reshape(B, n, 1)).reshape(B, *shape)   # d score / d u = J_i
        graphs.append((u, {"x": sc}))
    g = {"x": gval}
    corr = _oblique_and_corrections({"x": S}, {"x": D}, g, graphs, space, None, "joint")
    for b in range(B):
        G = gval[b]
        U = torch.stack([G * (S[b, i] - S[b, 0]).flatten() for i in range(1, M)], 1)
        V = torch.stack([G * (D[b, i] - D[b, 0]).flatten() for i in range(1, M)], 1)
        P = torch.eye(n, dtype=torch.float64) - V @ torch.linalg.solve(U.T @ V, U.T)
        for i in range(M):
            K = G * J[i, b] * G
            ref = torch.trace(K @ (P @ P.T - torch.eye(n, dtype=torch.float64)))
            assert torch.allclose(corr[i]["x"][b], ref, rtol=1e-9, atol=1e-9), (b, i, corr[i]["x"][b], ref)
    same = _oblique_and_corrections({"x": S}, {"x": S}, g, graphs, space, None, "joint")
    dirs = _noise_cancelling_directions({"x": S}, g, space, None, "joint")
    for i in range(M):
        q = _quadratic_forms(graphs[i], dirs, space, None)["x"]
        assert torch.allclose(same[i]["x"], -q, rtol=1e-9, atol=1e-9)
    bil = _bilinear_forms(graphs[0], dirs, dirs, space, None)["x"]
    q0 = _quadratic_forms(graphs[0], dirs, space, None)["x"]
    assert torch.allclose(torch.diagonal(bil, dim1=-2, dim2=-1).sum(-1), q0)


def test_density_option_scores_warning_and_vjp():
    """Views return the guided score as the drift and the exact unguided conditional score as the
    density score; VJPs of the density score route through the one batched graph; "guided" warns and
    hands no density score; with w = 1 both modes are identical; bad values are refused."""
    vp, _ = schedule_from_scheduler(_sched())
    gen = torch.Generator().manual_seed(4)
    net = GaussianClassesUNet(torch.randn(2, 2, 2, 2, generator=gen, dtype=torch.float64), [0.1, 0.3], vp)
    x = torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.9, 0.4, 0.05], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuidedDensityWarning)
        grp = PromptGroup(net, torch.cat([_emb(1), _emb(2)]), _emb(0), W, _sched())      # default: unguided
    assert grp.density == "unguided"
    for i, k in enumerate((1, 2)):
        out = grp.views[i]({"x": x}, t, None, None)
        su, sk = net.score(x, t, 0), net.score(x, t, k)
        assert torch.allclose(out.scores["x"], su + W * (sk - su), atol=1e-10)
        assert torch.allclose(out.density_scores["x"], sk, atol=1e-10)
    # VJPs: drift and density scores through the cached graph == direct autograd of the exact scores
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    for i, k in enumerate((1, 2)):
        u = torch.zeros_like(x, requires_grad=True)
        out = grp.views[i]({"x": x + u}, t, None, None)
        (gd,) = torch.autograd.grad((out.density_scores["x"] * v).sum(), u, retain_graph=True)
        (gs,) = torch.autograd.grad((out.scores["x"] * v).sum(), u)
        xr = x.clone().requires_grad_(True)
        (rd,) = torch.autograd.grad((net.score(xr, t, k) * v).sum(), xr, retain_graph=True)
        (ru,) = torch.autograd.grad((net.score(xr, t, 0) * v).sum(), xr)
        assert torch.allclose(gd, rd, atol=1e-8) and torch.allclose(gs, ru + W * (rd - ru), atol=1e-8)

    with pytest.warns(GuidedDensityWarning, match="not the score of any"):
        gg = PromptGroup(net, torch.cat([_emb(1), _emb(2)]), _emb(0), W, _sched(), density="guided")
    assert gg.views[0]({"x": x}, t, None, None).density_scores is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuidedDensityWarning)       # no guidance: nothing to warn about
        g1 = [PromptGroup(net, torch.cat([_emb(1), _emb(2)]), None, 1.0, _sched(), density=d)
              for d in ("unguided", "guided")]
    for a, b in zip(g1[0].views, g1[1].views):
        oa, ob = a({"x": x}, t, None, None), b({"x": x}, t, None, None)
        assert oa.density_scores is None and ob.density_scores is None and torch.equal(oa.scores["x"], ob.scores["x"])
    with pytest.raises(ImageModelError, match="density"):
        PromptGroup(net, _emb(1), _emb(0), W, _sched(), density="conditional")


def test_pipeline_and_cli_density_option(tmp_path):
    """The pipeline's ``density`` option: same guided path (average rule), different tracked densities;
    recorded in the output; "guided" warns; the CLI config and its YAML carry the key."""
    from omegaconf import OmegaConf

    from models.image.pipeline import SuperDiffPipeline
    from models.image.tiny import tiny_sd_components
    from superdiff_protein.cli.images import _CONFIG_DIR, GenerateConfig

    c = tiny_sd_components(tmp_path, seed=0)
    pipe = SuperDiffPipeline(c["unet"], c["scheduler"], vae=c["vae"], text_encoder=c["text_encoder"],
                             tokenizer=c["tokenizer"])
    kw = dict(rule="average", num_inference_steps=3, guidance_scale=W, seeds=[1], output_type="np")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuidedDensityWarning)
        un = pipe(["a cat", "a dog"], **kw)
    with pytest.warns(GuidedDensityWarning):
        gu = pipe(["a cat", "a dog"], density="guided", **kw)
    assert un.density == "unguided" and gu.density == "guided"
    assert torch.allclose(un.latents, gu.latents, atol=1e-6)             # the sampled (guided) path is the same
    assert not torch.allclose(un.logq[-1], gu.logq[-1], atol=1e-3)       # what is tracked is not
    with pytest.raises(ImageModelError, match="density"):
        pipe(["a cat"], density="bogus", **{k: v for k, v in kw.items() if k != "rule"})
    assert GenerateConfig().density == "unguided"
    assert OmegaConf.load(_CONFIG_DIR / "generate_images.yaml").density == "unguided"
