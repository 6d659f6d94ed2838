"""Guidance (core/guidance.py) and the clash guide (frames/guidance.py): the energy's gradient, the guide's meaning
as a corrected clean prediction, exact density tracking along a guided path, AND with a guide, and the option in
generate_backbones."""
from __future__ import annotations

import pytest
import torch
import yaml

from eval.io import read_backbone
from eval.metrics import geometry_metrics
from models.analytic import gaussian_mixture_model
from superdiff_protein.core.fkc import ProductRule
from superdiff_protein.core.kappa import AndRule, OrRule
from superdiff_protein.core.sampler import SamplerConfig, make_generators, superpose
from superdiff_protein.core.step_graph import step_graph_unsupported
from superdiff_protein.frames.generate_config import GenerateError
from superdiff_protein.frames.generation import generate
from superdiff_protein.frames.guidance import ClashGuide, clash_energy_grad
from superdiff_protein.frames.se3 import SE3Diffuser
from tolerances import close, magnitude, rounding_tol

F64 = torch.float64


# ------------------------------------------------------------------------------ the energy
def _coords(B=3, N=24, seed=0, spread=4.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, 3, generator=g, dtype=F64) * spread       # Angstrom: many pairs closer than 4


def test_clash_gradient_matches_autograd_and_conserves_momentum():
    X = _coords()
    mask = torch.ones(3, 24, dtype=F64)
    mask[2, 17:] = 0                                                   # a padded sample
    E, grad = clash_energy_grad(X, mask, 4.0, 3)
    Xr = X.clone().requires_grad_(True)
    d = torch.linalg.norm(Xr[:, :, None] - Xr[:, None], dim=-1)
    i, j = torch.triu_indices(24, 24, 3)
    m = mask.bool()
    keep = (m[:, i] & m[:, j]).to(F64)
    E_ref = 0.5 * (torch.clamp(4.0 - d[:, i, j], min=0) ** 2 * keep).sum(1)
    (g_ref,) = torch.autograd.grad(E_ref.sum(), Xr)
    E_ref = E_ref.detach()
    assert float(E_ref.detach().min()) > 0                                      # the case is not empty
    n = 24 * 24
    close(E, E_ref.detach(), rounding_tol(F64, magnitude(E_ref), n), "energy")
    close(grad, g_ref, rounding_tol(F64, magnitude(g_ref) * 4.0, n), "gradient")
    assert float(grad[2, 17:].abs().max()) == 0.0                     # padding is not pushed
    close(grad.sum(1), torch.zeros(3, 3, dtype=F64), rounding_tol(F64, magnitude(grad), n), "net force")


def test_near_neighbours_are_exempt_and_a_half_step_resolves_an_isolated_overlap():
    X = torch.zeros(1, 5, 3, dtype=F64)
    X[0, :, 0] = torch.tensor([0.0, -3.0, 40.0, 80.0, 1.0])          # 0-1 at 3 A (|i-j| = 1), 0-4 at 1 A, 1-4 at 4 A
    E, grad = clash_energy_grad(X, None, 4.0, 3)
    close(E, torch.tensor([0.5 * 3.0**2], dtype=F64), rounding_tol(F64, 9.0), "only the 0-4 pair")
    X1 = X - 0.5 * grad
    d04 = float(torch.linalg.norm(X1[0, 0] - X1[0, 4]))
    assert abs(d04 - 4.0) <= rounding_tol(F64, 4.0)
    assert float(grad[0, 1:4].abs().max()) == 0.0


# ------------------------------------------------------------------------------ the guide as a corrected prediction
def test_guide_score_is_the_score_of_the_corrected_prediction():
    diff = SE3Diffuser()
    space = diff.space
    B, N, M = 2, 30, 2
    g = torch.Generator().manual_seed(1)
    x = {"trans": space.components["trans"].project(torch.randn(B, N, 3, generator=g, dtype=F64) * 0.3)}
    scores = {"trans": torch.randn(B, M, N, 3, generator=g, dtype=F64)}
    kappa = torch.tensor([[[0.3, 0.7], [0.3, 0.7]], [[1.0, 0.0], [1.0, 0.0]]], dtype=F64)   # (B, C=[rot, trans], M)
    unit = 10.0
    guide = ClashGuide(space, unit, weight=0.4, t_max=0.5)
    t = torch.tensor([0.3, 0.7], dtype=F64)
    h = guide(x, t, scores, kappa, None)["trans"]
    lab = space.components["trans"].schedule.log_alpha_bar(t)
    alpha, var = torch.exp(0.5 * lab)[:, None, None], (-torch.expm1(lab))[:, None, None]
    s_mix = (kappa[:, 1, :, None, None] * scores["trans"]).sum(1)
    x0 = (x["trans"] + var * s_mix) / alpha
    _, grad = clash_energy_grad(x0 * unit, None, 4.0, 3)
    assert float(grad[0].abs().max()) > 0                             # sample 0 has overlaps to correct
    x0_guided = (x["trans"] + var * (s_mix + h)) / alpha              # Tweedie with the guided score
    want = x0 - 0.4 * grad / unit
    close(x0_guided[0], want[0], rounding_tol(F64, magnitude(x0, want) / float(alpha[0]), 64), "corrected x0")
    assert float(h[1].abs().max()) == 0.0                             # t = 0.7 > t_max: off


def test_clash_guide_needs_a_vp_translation_component():
    m = gaussian_mixture_model([[1.0, 0.0]], 0.2, name="a")
    with pytest.raises(ValueError, match="translation component"):
        ClashGuide(m.space, 10.0)


# ------------------------------------------------------------------------------ density tracking on a guided path
def _pull(target):
    """A guide pulling every sample towards ``target`` (a kappa-free drift of the size of the scores)."""
    tgt = torch.tensor(target, dtype=F64)

    def guide(x, t, scores, kappa, mask):
        return {"x": -(x["x"] - tgt)}
    return guide


def _increments(models, cfg, seeds, guide):
    r = superpose(models[0].space, models, OrRule(), cfg, seeds, {"x": (2,)}, guide=guide)
    b = len(seeds)
    x0 = models[0].space.sample_prior(b, {"x": (2,)}, make_generators(seeds))
    one, tend = torch.ones(b, dtype=F64), torch.full((b,), cfg.min_t, dtype=F64)
    exact = torch.stack([m.log_prob(r.x, tend)["x"] - m.log_prob(x0, one)["x"] for m in models], -1)
    est = r.logq[:, 0] - models[0].space.prior_log_prob(x0)["x"][:, None]
    return r, exact, est


def test_guided_path_keeps_the_ito_estimates_exact():
    m1 = gaussian_mixture_model([[3.0, 0.0], [0.0, 3.0]], 0.1, name="a")
    m2 = gaussian_mixture_model([[-3.0, 0.0], [0.0, -3.0]], 0.1, name="b")
    seeds = list(range(64))
    errs = []
    for steps in (100, 400, 1600):
        cfg = SamplerConfig(num_steps=steps, min_t=1e-3)
        r, exact, est = _increments([m1, m2], cfg, seeds, _pull([2.0, -2.0]))
        errs.append((est - exact).abs().mean().item())
        scale = exact.abs().mean().item()
    r0 = superpose(m1.space, [m1, m2], OrRule(), SamplerConfig(num_steps=1600, min_t=1e-3), seeds, {"x": (2,)})
    moved = (r.x["x"] - r0.x["x"]).norm(dim=-1).mean().item()
    assert moved > 0.5, moved                                          # the guide changes the samples
    # the estimate converges like sqrt(dtau) along the guided path (as along the unguided one, test 1 of
    # test_sampler_analytic.py); without the guide's <s_i, dx> term in b it would not
    assert errs[1] < 0.65 * errs[0] and errs[2] < 0.65 * errs[1], errs
    assert errs[2] < 0.05 * scale, (errs, scale)


def test_and_with_a_guide_still_equalises_the_densities():
    m1 = gaussian_mixture_model([[-1.0, 0.0]], 0.2, name="a")
    m2 = gaussian_mixture_model([[1.0, 0.0]], 1.0, name="b")
    seeds = list(range(200))
    tend = torch.full((len(seeds),), 1e-3, dtype=F64)
    guide = _pull([0.0, 1.5])

    def gap(rule):
        r = superpose(m1.space, [m1, m2], rule, SamplerConfig(num_steps=400, min_t=1e-3), seeds, {"x": (2,)},
                      guide=guide)
        lq = torch.stack([m.log_prob(r.x, tend)["x"] for m in (m1, m2)], -1)
        return (lq[:, 0] - lq[:, 1]).abs().median().item(), r

    g_and, r = gap(AndRule())
    assert torch.allclose(r.logq[:, 0, 0], r.logq[:, 0, 1], atol=1e-6)
    g_or, _ = gap(OrRule())
    assert g_and < 0.1 * g_or, (g_and, g_or)


def test_guides_are_refused_with_feynman_kac_rules_and_not_graph_captured():
    m1 = gaussian_mixture_model([[-1.0, 0.0]], 0.2, name="a")
    m2 = gaussian_mixture_model([[1.0, 0.0]], 0.2, name="b")
    with pytest.raises(ValueError, match="importance weights"):
        superpose(m1.space, [m1, m2], ProductRule(), SamplerConfig(num_steps=4), [0], {"x": (2,)},
                  guide=_pull([0.0, 0.0]))

    class _Cuda:
        device, fkc, use_lap, and_corr, guide = torch.device("cuda"), False, False, False, _pull([0.0, 0.0])
    assert "guide" in step_graph_unsupported(_Cuda())


# ------------------------------------------------------------------------------ generate_backbones
TINY = dict(models=["exact-helix", "exact-strand"], lengths=[12], samples_per_length=2, num_steps=6, plots=False,
            progress=False)


def _pdbs(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("length_*/sample_*.pdb"))}


def test_generate_records_guidance_and_weight_zero_is_the_unguided_run(tmp_path):
    generate(out_dir=str(tmp_path / "plain"), **TINY)
    generate(out_dir=str(tmp_path / "zero"), clash_guidance={"weight": 0.0}, **TINY)
    assert _pdbs(tmp_path / "plain") == _pdbs(tmp_path / "zero")
    s = generate(out_dir=str(tmp_path / "g"), clash_guidance={"weight": 0.5, "t_max": 1.0}, **TINY)
    assert s.generated == 2
    text = (tmp_path / "g" / "length_12" / "sample_0.pdb").read_text()
    assert "guided: clash_guidance weight=0.5 t_max=1 distance=4" in text
    assert "refined: CA moved" in text and "links ideal, no clashes" in text
    g = geometry_metrics(read_backbone(tmp_path / "g" / "length_12" / "sample_0.pdb").atoms)
    assert g["c_n_valid_frac"] == 1.0 and g["n_ca_clashes"] == 0
    cfg = yaml.safe_load((tmp_path / "g" / "config.yaml").read_text())
    assert cfg["clash_guidance"] == {"weight": 0.5, "t_max": 1.0, "distance": 4.0}
    with pytest.raises(Exception, match="other settings"):            # a resume with another weight is refused
        generate(out_dir=str(tmp_path / "g"), clash_guidance={"weight": 0.25, "t_max": 1.0}, **TINY)


@pytest.mark.parametrize("kw, msg", [
    ({"clash_guidance": {"weight": 5.0}}, "clash_guidance.weight"),
    ({"clash_guidance": {"t_max": 0.0}}, "clash_guidance.t_max"),
    ({"clash_guidance": {"distance": -1}}, "clash_guidance.distance"),
    ({"clash_guidance": {"strength": 1}}, "unknown option"),
    ({"clash_guidance": {"weight": 0.5}, "rule": "product"}, "importance weights"),
])
def test_bad_guidance_options_raise_and_write_nothing(tmp_path, kw, msg):
    out = tmp_path / "never"
    with pytest.raises(GenerateError, match=msg):
        generate(**{**TINY, "out_dir": str(out), **kw})
    assert not out.exists()
