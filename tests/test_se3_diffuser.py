"""SE3Diffuser vs every official diffuser fixture (``*_diffuser_reference.pt`` in $SUPERDIFF_OFFICIAL_FIXTURES).

Every tolerance follows the rule of docs/testing.md (tests/tolerances.py): ``C * eps(dtype) * scale * cond *
sqrt(n_ops)`` with the condition number of each formula, so that the bounds hold for any t, sigma grid, omega or
CPU, not only for the values of one fixture file:

* schedules (float64): sigma(t) = log(y) turns y's relative rounding into an absolute error (scale 1); the
  VP variance ``1 - exp(-B)`` has condition ``exp(-B) / (1 - exp(-B))`` (~ 1/B: 500 at t = 0.01); its
  ``1/sqrt`` half of that;
* the IGSO(3) series (tables, scores): ``igso3_series_bounds``, the rounding of each series term from its
  operands (the trigonometric factors in omega's dtype), i.e. the series' own conditioning: where the terms cancel
  (small sigma, large omega) the bound reaches the value itself, and there the official value is noise too;
* frames the official code stores as float32: one float32 rounding of values computed in float64
  (``rounding_tol(float32, |x|)``), or the float32 ``eigh`` quaternion path (condition 12: eigenvector error
  ``n eps |K| / gap`` = 3 eps for the 4x4 quaternion matrix, times 4 for the quadratic map to a rotation matrix);
* ``calc_rot_score`` from float32 rotation matrices: the official quaternion path perturbs the relative rotation
  vector by ``20 eps32 (1 + omega/2)`` (two eigh quaternions, a float32 product, the angle), which the
  score amplifies by its Jacobian ``|dS/dv|`` (computed here by autograd), plus the float32-trig series bound.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import official_fixtures_dir, official_params
from superdiff_protein.frames.geometry import quat_to_rotmat, so3_exp
from superdiff_protein.core.kappa import SingleRule
from superdiff_protein.core.protocol import ModelOutput
from superdiff_protein.core.sampler import SamplerConfig, superpose
from superdiff_protein.frames.se3 import DiffuserConfigError, SE3Diffuser, SE3DiffuserConfig
from tolerances import (close, igso3_score_vec_bounds, igso3_series_bounds, magnitude, quat_path_tol,
                        rot_score_tol, rounding_tol, trans_score_tol, vp_var_tol)

FIXTURES = sorted(official_fixtures_dir().glob("*_diffuser_reference.pt"))
F64, F32 = torch.float64, torch.float32
EIGH_COND = 12.0  # float32 eigh quaternion -> rotation matrix (module docstring)


@pytest.fixture(scope="module", params=official_params(FIXTURES, "*_diffuser_reference.pt", ids=lambda p: p.stem))
def case(request):
    path: Path = request.param
    ref = torch.load(path, map_location="cpu", weights_only=False)
    meta = json.loads(path.with_suffix(".json").read_text())
    has_center = bool(ref["meta/has_center_argument"])
    conf = {"diffuser": meta.get("config", {})}
    diff = SE3Diffuser.from_conf(conf, center_rule="framediff" if has_center else "proteus")
    return ref, meta, diff


# -- tolerances of the schedule formulas (float64, a few operations each)
def _tol_sigma(n_ops: int = 6) -> float:
    """log(t e^max + (1-t) e^min): the log turns the argument's relative error into an absolute one."""
    return rounding_tol(F64, 1.0, n_ops)


def _tol_var(d: SE3Diffuser, t, dtype=F64) -> torch.Tensor:
    return vp_var_tol(d.marginal_b_t(t), dtype)


def _frame_tols(x_ref: torch.Tensor, operands: torch.Tensor | float = 0.0) -> torch.Tensor:
    """float32-stored results of float64 maths: one float32 rounding of the operands' magnitude (elementwise)."""
    return rounding_tol(F32, x_ref.double().abs() + operands)


def test_config_from_json_matches_defaults(case):
    ref, meta, diff = case
    c = diff.cfg
    assert c.coordinate_scaling == pytest.approx(float(ref["r3/coordinate_scaling"]))
    assert (c.min_b, c.max_b) == (pytest.approx(float(ref["r3/min_b"])), pytest.approx(float(ref["r3/max_b"])))
    assert diff.space.components["trans"].coordinate_scaling == c.coordinate_scaling


def test_schedules_are_the_core_space(case):
    """sigma(t), tabulated sigma, g(t), beta(t), B(t) - through the core space objects too."""
    ref, _, d = case
    t = ref["t"]
    rot, tr = d.space.components["rot"], d.space.components["trans"]
    c = d.cfg
    ts = _tol_sigma()
    close(d.sigma(t), ref["so3/sigma_continuous"], ts, "sigma(t)")
    close(rot.schedule.sigma(t), ref["so3/sigma_continuous"], ts, "space sigma(t)")
    close(d.discrete_sigma, ref["so3/discrete_sigma"], _tol_sigma(8), "discrete sigma")  # + linspace
    close(d.discrete_omega, ref["so3/discrete_omega"], rounding_tol(F64, math.pi, 2), "discrete omega")
    # the table row: digitize(sigma(t)); a different row only where sigma(t) is within rounding of a grid value
    idx, ridx = d.t_to_idx(t), ref["so3/t_to_idx"]
    grid = d.discrete_sigma
    for i in (idx != ridx).nonzero().flatten().tolist():
        edge = grid[max(int(idx[i]), int(ridx[i]))]
        assert abs(int(idx[i]) - int(ridx[i])) == 1 and abs(float(d.sigma(t[i])) - float(edge)) <= 2 * ts, i
    same = idx == ridx
    close(d.tabulated_sigma(t)[same], ref["so3/sigma_discrete_used"][same], _tol_sigma(8), "tabulated sigma")
    # g(t) = sqrt(2 (e^M - e^m) sigma e^-sigma): relative error (1/sigma + 1) |d sigma| / 2 + its own rounding
    g = ref["so3/diffusion_coef"]
    sig = ref["so3/sigma_continuous"]
    tol_g = g * (ts * (1 / sig + 1) / 2 + rounding_tol(F64, 1.0, 6))
    close(d.rot_diffusion_coef(t), g, tol_g, "rot g(t)")
    close(rot.diffusion(t), g, tol_g, "space rot g(t)")
    tol_b = rounding_tol(F64, c.max_b, 3)
    close(d.trans_b_t(t), ref["r3/b_t"], tol_b, "b(t)")
    close(tr.schedule.beta(t), ref["r3/b_t"], tol_b, "space beta(t)")
    close(tr.diffusion(t), ref["r3/diffusion_coef"], ref["r3/diffusion_coef"] * (tol_b / ref["r3/b_t"] / 2
                                                                                + rounding_tol(F64)), "trans g(t)")
    tol_B = rounding_tol(F64, t * c.min_b + t**2 * c.max_b, 5)
    close(d.marginal_b_t(t), ref["r3/marginal_b_t"], tol_B, "B(t)")
    close(-tr.schedule.log_alpha_bar(t), ref["r3/marginal_b_t"], tol_B, "space B(t)")
    var = ref["r3/conditional_var"]
    tol_var = _tol_var(d, t)
    close(d.trans_conditional_var(t), var, tol_var, "1 - exp(-B)")
    sc = ref["r3/score_scaling"]
    close(d.trans_score_scaling(t), sc, sc * (tol_var / var / 2 + rounding_tol(F64, 1.0, 2)), "trans score scaling")
    drift = -0.5 * d.trans_b_t(t)[:, None, None] * ref["r3/drift_x"][None]
    x = ref["r3/drift_x"].abs()[None]
    close(drift, ref["r3/drift_coef"], rounding_tol(F64, 0.5 * ref["r3/b_t"][:, None, None] * x, 2)
          + 0.5 * tol_b * x, "drift")


def _table_rows(d: SE3Diffuser, ref) -> torch.Tensor:
    """The sigma rows the fixture stores (its t values), plus every 50th row of the full table."""
    return torch.unique(torch.cat([ref["so3/t_to_idx"], torch.arange(0, d.cfg.num_sigma, 50)]))


def _scaling_tol(d: SE3Diffuser, rows: torch.Tensor) -> torch.Tensor:
    """Bound of ``sqrt(sum sn^2 pdf / sum pdf) / sqrt(3)`` per sigma row: first-order propagation of the series
    bounds of the score norms and the pdf, plus the rounding of the two sums over the omega grid."""
    om = d.discrete_omega
    b = igso3_series_bounds(om[None], d.discrete_sigma[rows][:, None])
    tab = d.igso3_tables(rows)
    sn, p = tab["score_norms"], tab["pdf"]
    ep = b["e_exp"] * (1 - torch.cos(om)) / math.pi
    A, Bs = (sn**2 * p).sum(-1), p.sum(-1)
    dA = (2 * sn.abs() * b["e_score"] * p + sn**2 * ep).sum(-1) + rounding_tol(F64, A, om.numel())
    dB = ep.sum(-1) + rounding_tol(F64, Bs, om.numel())
    S = tab["score_scaling"]
    return S / 2 * (dA / A + dB / Bs) + rounding_tol(F64, S, 4)


def test_igso3_tables_and_score_scaling(case):
    ref, _, d = case
    idx = ref["so3/t_to_idx"]
    tab = d.igso3_tables(idx)
    om = d.discrete_omega
    b = igso3_series_bounds(om[None], d.discrete_sigma[idx][:, None])
    n_om = om.numel()
    pdf, rpdf = tab["pdf"], ref["so3/pdf_rows"]
    e_pdf = b["e_exp"] * (1 - torch.cos(om)) / math.pi + rounding_tol(F64, rpdf.abs(), 3)
    close(pdf, rpdf, e_pdf, "pdf rows")
    e_cdf = torch.cumsum(e_pdf, -1) * math.pi / n_om + rounding_tol(F64, ref["so3/cdf_rows"].abs(), n_om)
    close(tab["cdf"], ref["so3/cdf_rows"], e_cdf, "cdf rows")
    e_sn = b["e_score"] + rounding_tol(F64, b["score"].abs(), 2)
    close(tab["score_norms"], ref["so3/score_norms_rows"], e_sn, "score norm rows")
    assert torch.isfinite(tab["score_norms"]).all()
    # the bound is tight where the series is resolved: at most rows it is far below the values themselves
    assert (e_sn < 1e-6 * (1 + ref["so3/score_norms_rows"].abs())).float().mean() > 0.5
    # score scaling: the stored t rows and every 50th row of the full table
    rows = _table_rows(d, ref)
    tol_S = _scaling_tol(d, rows)
    close(d.igso3_tables(rows)["score_scaling"], ref["so3/score_scaling_table"][rows], tol_S, "score scaling table")
    close(d.rot_score_scaling(ref["t"]), ref["so3/score_scaling"], _scaling_tol(d, idx), "score scaling(t)")
    rs, ts = d.score_scaling(ref["t"])
    assert torch.equal(rs, d.rot_score_scaling(ref["t"])) and torch.equal(ts, d.trans_score_scaling(ref["t"]))


def test_torch_score_queries(case):
    """Every stored query (all t, all rotation vectors) within the series' rounding bound."""
    ref, _, d = case
    t, q = ref["t"], ref["so3/query_rotvec"]
    tight = []
    for i in range(t.numel()):
        s = d.rot_score_from_rotvec(q[None], t[i:i + 1])[0]
        r = ref["so3/torch_score_at_query"][i]
        tol = igso3_score_vec_bounds(q, ref["so3/sigma_discrete_used"][i])
        close(s, r, tol, f"torch_score t={float(t[i]):.3g}")
        assert torch.isfinite(s).all()
        tight.append(tol < 1e-9 * (1 + r.abs()))
    assert torch.stack(tight).float().mean() > 0.5  # the bound is not vacuous
    bv, bt = ref["so3/batched_vec"], ref["so3/batched_t"]
    s = d.rot_score_from_rotvec(bv, bt)
    tol = igso3_score_vec_bounds(bv, d.tabulated_sigma(bt)[:, None])
    close(s, ref["so3/batched_torch_score"], tol, "batched torch_score")


def _fwd_noise(ref, p):
    return {"axis": ref[p + "noise_axis_randn"][None], "angle_uniform": ref[p + "noise_angle_uniform"][None],
            "trans": ref[p + "noise_trans_std_normal"][None]}


def test_forward_marginal_with_injected_noise(case):
    ref, _, d = case
    R0 = ref["fwd_det/rigids_0_rotmats"][None]
    T0 = ref["fwd_det/rigids_0"][None, :, 4:]
    ks = sorted({k.split("/")[1] for k in ref if k.startswith("fwd_det/t")})
    assert ks
    for k in ks:
        p = f"fwd_det/{k}/"
        t = ref[p + "t"]
        out = d.forward_marginal(R0, T0, t, noise=_fwd_noise(ref, p))
        assert out.rotmats_t.dtype == torch.float32 and out.rot_score.dtype == torch.float64
        close(out.rotmats_t[0], ref[p + "rigids_t_rotmats"], rounding_tol(F32), f"{k} rotmats_t")
        T = ref[p + "rigids_t"][:, 4:]
        close(out.trans_t[0], T, _frame_tols(T, T0[0].abs()), f"{k} trans_t")
        # rotation score from the float64 noise rotation vector: the series bound, plus the noise angle's own
        # rounding (inverse-CDF interpolation, a few float64 ops on omega) through the score's slope
        vec = out.rotvec_noise[0]
        sig = d.tabulated_sigma(torch.as_tensor(t).reshape(1))[0]
        om = torch.linalg.norm(vec, dim=-1)
        h = 1e-6
        slope = (igso3_series_bounds(om + h, sig)["score"] - igso3_series_bounds(om - h, sig)["score"]).abs() / (2 * h)
        tol_rs = igso3_score_vec_bounds(vec, sig) + (slope * rounding_tol(F64, math.pi, 4))[:, None]
        close(out.rot_score[0], ref[p + "rot_score"], tol_rs, f"{k} rot_score")
        # translation score, float64 maths (the official stores x_t only as float32 afterwards)
        rts = ref[p + "trans_score"]
        close(out.trans_score[0], rts, trans_score_tol(d, T[None], T0, rts[None], t, F64)[0], f"{k} trans_score")
        var = d.trans_conditional_var(torch.as_tensor(t).reshape(1))
        # the scalings, as in test_igso3_tables_and_score_scaling / the schedules
        close(out.trans_score_scaling, ref[p + "trans_score_scaling"].reshape(1),
              rounding_tol(F64, ref[p + "trans_score_scaling"], 2, cond=1 / float(var)), f"{k} trans scaling")
        close(out.rot_score_scaling, ref[p + "rot_score_scaling"].reshape(1),
              _scaling_tol(d, d.t_to_idx(torch.as_tensor(t).reshape(1))), f"{k} rot scaling")
        # quaternions of the official tensor_7 (float32 eigh) - the same rotations
        close(quat_to_rotmat(ref[p + "rigids_t"][:, :4].double()), out.rotmats_t[0],
              rounding_tol(F32, cond=EIGH_COND), f"{k} eigh quaternions")


def test_forward_marginal_batched_masked_and_generator(case):
    ref, _, d = case
    p = "fwd_det/t0/"
    R0 = ref["fwd_det/rigids_0_rotmats"][None].double()
    T0 = ref["fwd_det/rigids_0"][None, :, 4:].double()
    noise = _fwd_noise(ref, p)
    single = d.forward_marginal(R0, T0, ref[p + "t"], noise=noise)
    # batch of 2 with different t and a padded residue in the second sample
    t1 = float(ref["fwd_det/t1/t"]) if "fwd_det/t1/t" in ref else 0.3
    R = R0.expand(2, -1, -1, -1).clone()
    T = T0.expand(2, -1, -1).clone()
    mask = torch.ones(2, R.shape[1])
    mask[1, -1] = 0
    nb = {k: torch.cat([v, v]) for k, v in noise.items()}
    out = d.forward_marginal(R, T, torch.tensor([float(ref[p + "t"]), t1]), mask, noise=nb)
    assert torch.equal(out.rotmats_t[0], single.rotmats_t[0]) and torch.equal(out.trans_t[0], single.trans_t[0])
    assert torch.equal(out.rot_score[0], single.rot_score[0])
    assert torch.equal(out.rotmats_t[1, -1], R0[0, -1]) and torch.equal(out.trans_t[1, -1], T0[0, -1])
    assert out.rot_score[1, -1].abs().sum() == 0 and out.trans_score[1, -1].abs().sum() == 0
    # generator path is reproducible and batch-shaped
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = d.forward_marginal(R, T, torch.tensor([0.2, 0.8]), mask, g1)
    b = d.forward_marginal(R, T, torch.tensor([0.2, 0.8]), mask, g2)
    assert torch.equal(a.trans_t, b.trans_t) and a.rot_score_scaling.shape == (2,)
    with pytest.raises(ValueError):
        d.forward_marginal(R, T, torch.tensor([0.2, 1.5]))


def test_forward_marginal_statistics(case):
    """Our sampler's IGSO(3) angles / VP translations vs the official theory rows (4 standard errors)."""
    ref, _, d = case
    n = 4000
    x0 = ref["fwd_stats/x0_angstrom"].double()
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(ref["t"].tolist()):
        R0 = torch.eye(3, dtype=torch.float64).expand(1, n, 3, 3)
        out = d.forward_marginal(R0, x0.expand(1, n, 3), t, generator=g)
        ang = out.rotvec_noise.norm(dim=-1)[0]
        se = float(ref["fwd_stats/rot_angle_std"][i]) / math.sqrt(n)
        assert abs(ang.mean().item() - float(ref["fwd_stats/rot_angle_theory_mean"][i])) < 4 * se + 2e-3
        xs = out.trans_t[0] * d.coordinate_scaling
        th_m, th_s = ref["fwd_stats/theory_mean"][i], ref["fwd_stats/theory_std"][i]
        assert ((xs.mean(0) - th_m).abs() < 4 * th_s / math.sqrt(n)).all()
        assert ((xs.std(0) / th_s - 1).abs() < 0.1).all()


def test_sample_ref(case):
    ref, _, d = case
    R, T = d.sample_ref(1, ref["sample_ref/noise_axis_randn"].shape[0], noise=_fwd_noise(ref, "sample_ref/"))
    r7 = ref["sample_ref/rigids_t"]
    close(R[0], quat_to_rotmat(r7[:, :4].double()), rounding_tol(F32, cond=EIGH_COND), "sample_ref rotations")
    close(T[0], r7[:, 4:], _frame_tols(r7[:, 4:]), "sample_ref translations")


def test_calc_scores_from_prediction(case):
    """Scores from float32 predicted frames: the official path goes through float32 eigh quaternions, so the
    relative rotation vector carries ``20 eps32 (1 + omega/2)`` (module docstring); the bound is that
    times the score's Jacobian, plus the series bound with float32 trigonometry."""
    from superdiff_protein.frames.geometry import so3_log

    ref, _, d = case
    Rt, R0 = ref["calc_scores/rots_t_rotmats"], ref["calc_scores/rots_0_rotmats"]
    Tt, T0, t = ref["calc_scores/trans_t"], ref["calc_scores/trans_0"], ref["calc_scores/t"]
    rot, tr = d.scores_from_prediction(Rt, Tt, R0, T0, t)
    assert tr.dtype == torch.float32 and rot.dtype == torch.float64
    # translation score: the same float32 formula
    close(tr, ref["calc_scores/trans_score"],
          trans_score_tol(d, Tt, T0, ref["calc_scores/trans_score"], t, F32), "calc_scores trans_score")
    v = so3_log(R0.double().transpose(-1, -2) @ Rt.double())  # the relative rotation vector, float64
    close(rot, ref["calc_scores/rot_score"], rot_score_tol(d, v, t, quat_path_tol(v), F32), "calc_scores rot_score")
    # with padding mask
    m = torch.ones(1, Rt.shape[1])
    m[0, 0] = 0
    rot_m, tr_m = d.scores_from_prediction(Rt, Tt, R0, T0, t, m)
    assert rot_m[0, 0].abs().sum() == 0 and tr_m[0, 0].abs().sum() == 0
    assert torch.equal(rot_m[0, 1:], rot[0, 1:])


def _reverse_cases(ref):
    return sorted({k.split("/")[1] for k in ref if k.startswith("reverse/case")})


def test_reverse_steps_all_cases(case):
    """Every stored reverse case: float64 maths on float32 frames, stored as float32 (one float32 rounding of the
    operands: the rotation entries, and the positions, the perturbation and the centre of mass)."""
    ref, meta, d = case
    Rt, Tt = ref["reverse/rigids_t_rotmats"], ref["reverse/rigids_t"][..., 4:]
    cases = _reverse_cases(ref)
    assert len(cases) == len(meta["reverse_cases"])
    for c in cases:
        p = f"reverse/{c}/"
        dm = None if bool(ref[p + "diffuse_mask_is_none"]) else ref[p + "diffuse_mask"]
        center = bool(ref[p + "center_arg"]) if d.cfg.center_rule == "framediff" else None
        R1, T1 = d.reverse(Rt, Tt, ref["reverse/rot_score"], ref["reverse/trans_score"], float(ref[p + "t"]),
                           float(ref[p + "dt"]), diffuse_mask=dm, noise_scale=float(ref[p + "noise_scale"]),
                           center=center, noise={"z_rot": ref[p + "z_rot"], "z_trans": ref[p + "z_trans"]})
        close(R1, ref[p + "rigids_t_1_rotmats"], rounding_tol(F32), f"{c} rotations")
        T_ref = ref[p + "rigids_t_1"][..., 4:]
        close(T1, T_ref, _frame_tols(T_ref, magnitude(Tt, T_ref)), f"{c} translations")


def test_reverse_padding_is_inert(case):
    """A padded batch: the real part equals the unpadded step (float64; only the centre-of-mass sum differs, by
    rounding over N residues), padding does not move or shift the COM."""
    ref, _, d = case
    p = "reverse/case0/"
    Rt, Tt = ref["reverse/rigids_t_rotmats"].double(), ref["reverse/rigids_t"][..., 4:].double()
    args = dict(noise_scale=float(ref[p + "noise_scale"]))
    R1, T1 = d.reverse(Rt, Tt, ref["reverse/rot_score"], ref["reverse/trans_score"], float(ref[p + "t"]),
                       float(ref[p + "dt"]), noise={"z_rot": ref[p + "z_rot"], "z_trans": ref[p + "z_trans"]}, **args)
    pad = lambda x, v: torch.cat([x, v.expand(1, 2, *x.shape[2:])], 1)
    mask = torch.cat([torch.ones(1, Rt.shape[1]), torch.zeros(1, 2)], 1)
    z = {"z_rot": pad(ref[p + "z_rot"], torch.ones(3)), "z_trans": pad(ref[p + "z_trans"], torch.ones(3))}
    R1p, T1p = d.reverse(pad(Rt, torch.eye(3, dtype=torch.float64)), pad(Tt, torch.full((3,), 50.0, dtype=torch.float64)),
                         pad(ref["reverse/rot_score"], torch.ones(3)), pad(ref["reverse/trans_score"], torch.ones(3)),
                         float(ref[p + "t"]), float(ref[p + "dt"]), res_mask=mask, noise=z, **args)
    close(R1p[:, :-2], R1, rounding_tol(F64), "padded rotations")
    close(T1p[:, :-2], T1, rounding_tol(F64, magnitude(Tt, T1), Tt.shape[1]), "padded translations")
    assert torch.equal(T1p[0, -2:], torch.full((2, 3), 50.0, dtype=torch.float64))


class _ConstScore:
    """Single model returning fixed scores (to drive one step of the core sampler)."""

    name = "const"

    def __init__(self, d, rot, trans):
        self.d, self.rot, self.trans = d, rot, trans

    def signature(self):
        return self.d.space.signature()

    def init_state(self, batch, mask):
        return None

    def __call__(self, x, t, mask, state):
        return ModelOutput({"rot": self.rot, "trans": self.trans})


@pytest.mark.filterwarnings("ignore::superdiff_protein.core.sampler.BiasedEstimatorWarning")
@pytest.mark.parametrize("noise_scale", [1.0, 0.1])
def test_core_sampler_step_is_the_official_reverse_step(case, noise_scale):
    """One step of the core sampler (single model, same noise, FrameDiff time grid) == SE3Diffuser.reverse
    (itself == official): the diffuser and the superposition core are the same object. Rotation scores are
    body-frame tangents in both (``R exp(.)``); the translation noise enters with the opposite sign."""
    ref, _, d = case
    Rt = ref["reverse/rigids_t_rotmats"].double()
    Tt = ref["reverse/rigids_t"][..., 4:].double()
    Tt = Tt - Tt.mean(1, keepdim=True)  # the core state lives in the centred subspace
    rs, ts = ref["reverse/rot_score"], ref["reverse/trans_score"]
    ts = ts - ts.mean(1, keepdim=True)
    zr, zt = ref["reverse/case0/z_rot"], ref["reverse/case0/z_trans"]
    for num_steps in (1, 4):
        cfg = SamplerConfig(num_steps=num_steps, min_t=0.01, noise_scale=noise_scale, time_grid="framediff")
        model = _ConstScore(d, rs, ts)
        noise_fn = lambda step, t, x: {"rot": zr, "trans": -zt}
        n = Rt.shape[1]
        res = superpose(d.space, [model], SingleRule(), cfg, [0], {"rot": (n,), "trans": (n, 3)},
                        x_init=d.to_space(Rt, Tt), noise_fn=noise_fn, save_trajectory=True)
        x1 = res.trajectory[1]
        assert float(res.t[0]) == 1.0
        R1, T1 = d.reverse(Rt, Tt, rs, ts, 1.0, 1.0 / (num_steps + 1), noise_scale=noise_scale, center=True,
                           noise={"z_rot": zr, "z_trans": zt})
        # both float64; the operation order differs (Rodrigues + a matrix product: ~25 roundings of O(1) values;
        # translations: drift, score and noise terms of the positions' magnitude, and the centring sum over n)
        close(x1["rot"], R1, rounding_tol(F64, 1.0, 25), f"core step rotations ({num_steps} steps)")
        close(x1["trans"] / d.coordinate_scaling, T1, rounding_tol(F64, magnitude(Tt, T1), 10 + n),
              f"core step translations ({num_steps} steps)")


def test_signature_and_config_errors():
    a, b = SE3Diffuser.framediff_default(), SE3Diffuser.proteus_default()
    assert a.signature() == b.signature()  # same SDE: FrameDiff and Proteus can be superposed
    c = SE3Diffuser.from_conf({"diffuser": {"r3": {"coordinate_scaling": 1.0}}})
    assert c.signature() != a.signature()
    assert c.signature()["trans"]["coordinate_scaling"] == 1.0
    with pytest.raises(DiffuserConfigError, match="schedule"):
        SE3DiffuserConfig.from_conf({"so3": {"schedule": "linear"}})
    with pytest.raises(DiffuserConfigError):
        SE3Diffuser.from_conf(42)
    # unresolved interpolation strings are ignored (official configs use ${...})
    assert SE3DiffuserConfig.from_conf({"r3": {"coordinate_scaling": "${x}"}}).coordinate_scaling == 0.1


@pytest.mark.gpu
def test_forward_marginal_on_cuda_uses_the_same_table_rows():
    """On CUDA the IGSO(3) rows come from the cached device tables (no host read-back): same values as the CPU
    path for the same draws (injected), bit for bit for the gathered rows and scalings."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    d_cpu, d_gpu = SE3Diffuser.framediff_default(), SE3Diffuser.framediff_default()
    g = torch.Generator().manual_seed(0)
    B, N = 6, 50
    R0 = so3_exp(torch.randn(B, N, 3, generator=g, dtype=torch.float64))
    T0 = torch.randn(B, N, 3, generator=g, dtype=torch.float64) * 10
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.99 + 0.01
    noise = {"axis": torch.randn(B, N, 3, generator=g, dtype=torch.float64),
             "angle_uniform": torch.rand(B, N, generator=g, dtype=torch.float64),
             "trans": torch.randn(B, N, 3, generator=g, dtype=torch.float64)}
    a = d_cpu.forward_marginal(R0, T0, t, noise=noise)
    b = d_gpu.forward_marginal(R0.cuda(), T0.cuda(), t.cuda(), noise={k: v.cuda() for k, v in noise.items()})
    assert torch.equal(a.rot_score_scaling, b.rot_score_scaling.cpu())
    assert torch.equal(d_cpu.tabulated_sigma(t), d_gpu.tabulated_sigma(t.cuda()).cpu())
    # the angle: the same rows and uniforms through np_interp's few float64 operations on either device
    close(b.rotvec_noise.cpu(), a.rotvec_noise, rounding_tol(F64, math.pi, 8), "noise rotation vectors")
