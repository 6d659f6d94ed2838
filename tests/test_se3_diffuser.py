"""SE3Diffuser vs every official diffuser fixture (``*_diffuser_reference.pt`` in $SUPERDIFF_OFFICIAL_FIXTURES).

Tolerances (observed errors are well below them):

* float64 quantities computed by numpy in the official code (schedules, tables, scores from float64
  rotation vectors, score scaling): 1e-12 relative. The official score-norm table and torch_score at
  small sigma / large omega are cancellation noise of the series (``lo dhi - hi dlo``, expansion
  ~1e-200 evaluated as O(1e-14)): the table bound grows like 1e-14 x max(pdf)/pdf, and where the
  density is below 1e-12 of the row maximum (or omega^2 / 2 sigma^2 > 25 for the queries) only
  finiteness is required.
* frames the official code stores as float32 (rotation matrices via scipy, quaternions via eigh):
  rotation matrices 2.5e-7 absolute (1.5e-6 where only the float32 ``eigh`` quaternion is stored),
  translations 4 float32 ulp relative (5e-7 * max(1, |x|)).
* ``calc_rot_score`` from float32 rotation matrices: the official float32 quaternion path is rounding
  noise at the 1e-5 level here; the bound is 3x the spread of our score under 1-ulp-sized rotations of
  the inputs (measured in the test) plus 1e-9.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import official_fixtures_dir
from superdiff_protein.geometry import quat_to_rotmat, so3_exp
from superdiff_protein.kappa import SingleRule
from superdiff_protein.protocol import ModelOutput
from superdiff_protein.sampler import SamplerConfig, superpose
from superdiff_protein.se3 import DiffuserConfigError, SE3Diffuser, SE3DiffuserConfig, igso3_expansion

FIXTURES = sorted(official_fixtures_dir().glob("*_diffuser_reference.pt"))
if not FIXTURES:
    pytest.skip(f"no *_diffuser_reference.pt in {official_fixtures_dir()}", allow_module_level=True)

REL64 = 1e-12
ROT32 = 2.5e-7
QUAT32 = 1.5e-6  # rotations the official code only stores as float32 eigh quaternions


@pytest.fixture(scope="module", params=FIXTURES, ids=lambda p: p.stem)
def case(request):
    path: Path = request.param
    ref = torch.load(path, map_location="cpu", weights_only=False)
    meta = json.loads(path.with_suffix(".json").read_text())
    has_center = bool(ref["meta/has_center_argument"])
    conf = {"diffuser": meta.get("config", {})}
    diff = SE3Diffuser.from_conf(conf, center_rule="framediff" if has_center else "proteus")
    return ref, meta, diff


def _rel(a, b):
    return ((a - b).abs() / (1 + b.abs())).max().item()


def _close32(a, b, rel=5e-7):
    """float32-stored official values: |a - b| <= rel * max(1, |b|)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return bool(((a - b).abs() <= rel * b.abs().clamp_min(1.0)).all())


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
    assert _rel(d.sigma(t), ref["so3/sigma_continuous"]) < REL64
    assert _rel(rot.schedule.sigma(t), ref["so3/sigma_continuous"]) < REL64
    assert torch.equal(d.t_to_idx(t), ref["so3/t_to_idx"])
    assert _rel(d.tabulated_sigma(t), ref["so3/sigma_discrete_used"]) < REL64
    assert _rel(d.discrete_sigma, ref["so3/discrete_sigma"]) < REL64
    assert torch.equal(d.discrete_omega, ref["so3/discrete_omega"])
    assert _rel(d.rot_diffusion_coef(t), ref["so3/diffusion_coef"]) < REL64
    assert _rel(rot.diffusion(t), ref["so3/diffusion_coef"]) < REL64
    assert _rel(d.trans_b_t(t), ref["r3/b_t"]) < REL64
    assert _rel(tr.schedule.beta(t), ref["r3/b_t"]) < REL64
    assert _rel(tr.diffusion(t), ref["r3/diffusion_coef"]) < REL64
    assert _rel(d.marginal_b_t(t), ref["r3/marginal_b_t"]) < REL64
    assert _rel(-tr.schedule.log_alpha_bar(t), ref["r3/marginal_b_t"]) < REL64
    assert _rel(d.trans_conditional_var(t), ref["r3/conditional_var"]) < REL64
    assert _rel(d.trans_score_scaling(t), ref["r3/score_scaling"]) < 1e-10  # 1/sqrt(var) at var ~ 2e-3
    drift = -0.5 * d.trans_b_t(t)[:, None, None] * ref["r3/drift_x"][None]
    assert _rel(drift, ref["r3/drift_coef"]) < REL64


def test_igso3_tables_and_score_scaling(case):
    ref, _, d = case
    idx = ref["so3/t_to_idx"]
    tab = d.igso3_tables(idx)
    assert _rel(tab["pdf"], ref["so3/pdf_rows"]) < 1e-11
    assert _rel(tab["cdf"], ref["so3/cdf_rows"]) < 1e-11
    # score norms: exact where the density is resolved; cancellation noise elsewhere (official too)
    # (float64 cancellation: error ~ 1e-16 x O(1) series terms / expansion, i.e. grows like max(pdf)/pdf)
    pdf = ref["so3/pdf_rows"]
    ratio = pdf.abs().amax(-1, keepdim=True) / pdf.abs().clamp_min(1e-300)
    resolved = ratio < 1e12
    sn, rsn = tab["score_norms"], ref["so3/score_norms_rows"]
    assert resolved.float().mean() > 0.5
    tol = (1e-12 + 1e-14 * ratio) * (1 + rsn.abs())
    assert ((sn - rsn).abs() <= tol)[resolved].all()
    assert torch.isfinite(sn).all()
    full = d.igso3_tables()["score_scaling"]  # all num_sigma rows
    assert _rel(full, ref["so3/score_scaling_table"]) < REL64
    assert _rel(d.rot_score_scaling(ref["t"]), ref["so3/score_scaling"]) < REL64
    rs, ts = d.score_scaling(ref["t"])
    assert torch.equal(rs, d.rot_score_scaling(ref["t"])) and torch.equal(ts, d.trans_score_scaling(ref["t"]))


def test_torch_score_queries(case):
    ref, _, d = case
    t, q = ref["t"], ref["so3/query_rotvec"]
    omega = ref["so3/query_omega"]
    for i in range(t.numel()):
        s = d.rot_score_from_rotvec(q[None], t[i:i + 1])[0]
        r = ref["so3/torch_score_at_query"][i]
        sig = ref["so3/sigma_discrete_used"][i]
        # float64 cancellation noise of the series grows like expansion(0) / expansion(omega)
        ex = igso3_expansion(torch.cat([torch.tensor([1e-6], dtype=torch.float64), omega]), sig).abs()
        ratio = ex[0] / ex[1:].clamp_min(1e-300)
        resolved = ratio < 1e12
        tol = (1e-12 + 1e-14 * ratio)[:, None] * (1 + r.abs())
        assert ((s - r).abs() <= tol).all(-1)[resolved].all(), i
        assert torch.isfinite(s).all()
        assert resolved.sum() >= 10
    s = d.rot_score_from_rotvec(ref["so3/batched_vec"], ref["so3/batched_t"])
    assert _rel(s, ref["so3/batched_torch_score"]) < REL64


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
        out = d.forward_marginal(R0, T0, ref[p + "t"], noise=_fwd_noise(ref, p))
        assert out.rotmats_t.dtype == torch.float32 and out.rot_score.dtype == torch.float64
        assert (out.rotmats_t[0] - ref[p + "rigids_t_rotmats"]).abs().max() < ROT32
        assert _close32(out.trans_t[0], ref[p + "rigids_t"][:, 4:])
        assert _rel(out.rot_score[0], ref[p + "rot_score"]) < 1e-12
        assert _rel(out.trans_score[0], ref[p + "trans_score"]) < 1e-12
        assert _rel(out.rot_score_scaling, ref[p + "rot_score_scaling"].reshape(1)) < REL64
        assert _rel(out.trans_score_scaling, ref[p + "trans_score_scaling"].reshape(1)) < REL64
        # quaternions of the official tensor_7 (float32 eigh: ~6e-7 from its own matrices) - same rotations
        assert (quat_to_rotmat(ref[p + "rigids_t"][:, :4].double()) - out.rotmats_t[0]).abs().max() < QUAT32


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
    assert (R[0] - quat_to_rotmat(r7[:, :4].double())).abs().max() < QUAT32
    assert _close32(T[0], r7[:, 4:])


def test_calc_scores_from_prediction(case):
    ref, _, d = case
    Rt, R0 = ref["calc_scores/rots_t_rotmats"], ref["calc_scores/rots_0_rotmats"]
    Tt, T0, t = ref["calc_scores/trans_t"], ref["calc_scores/trans_0"], ref["calc_scores/t"]
    rot, tr = d.scores_from_prediction(Rt, Tt, R0, T0, t)
    assert tr.dtype == torch.float32 and rot.dtype == torch.float64
    assert torch.equal(tr, ref["calc_scores/trans_score"])  # same float32 formula
    # rounding-noise bound of the official float32 path: spread under 1-ulp-sized input rotations
    g = torch.Generator().manual_seed(0)
    spread = torch.zeros_like(rot)
    for _ in range(16):
        jit = lambda R: (R.double() @ so3_exp(6e-8 * torch.randn(R.shape[:-1], generator=g, dtype=torch.float64))).float()
        s, _ = d.scores_from_prediction(jit(Rt), Tt, jit(R0), T0, t)
        spread = torch.maximum(spread, (s - rot).abs())
    err = (rot - ref["calc_scores/rot_score"]).abs()
    assert (err <= 3 * spread + 1e-9).all(), (err.max(), spread.max())
    # with padding mask
    m = torch.ones(1, Rt.shape[1])
    m[0, 0] = 0
    rot_m, tr_m = d.scores_from_prediction(Rt, Tt, R0, T0, t, m)
    assert rot_m[0, 0].abs().sum() == 0 and tr_m[0, 0].abs().sum() == 0
    assert torch.equal(rot_m[0, 1:], rot[0, 1:])


def _reverse_cases(ref):
    return sorted({k.split("/")[1] for k in ref if k.startswith("reverse/case")})


def test_reverse_steps_all_cases(case):
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
        assert (R1 - ref[p + "rigids_t_1_rotmats"]).abs().max() < ROT32, c
        assert _close32(T1, ref[p + "rigids_t_1"][..., 4:]), (c, (T1 - ref[p + "rigids_t_1"][..., 4:]).abs().max())


def test_reverse_padding_is_inert(case):
    """A padded batch: the real part equals the unpadded step, padding does not move or shift the COM."""
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
    assert (R1p[:, :-2] - R1).abs().max() < 1e-12 and (T1p[:, :-2] - T1).abs().max() < 1e-10
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


@pytest.mark.filterwarnings("ignore::superdiff_protein.sampler.BiasedEstimatorWarning")
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
        res = superpose(d.space, [model], SingleRule(), cfg, [0], {"rot": (6,), "trans": (6, 3)},
                        x_init=d.to_space(Rt, Tt), noise_fn=noise_fn, save_trajectory=True)
        x1 = res.trajectory[1]
        assert float(res.t[0]) == 1.0
        R1, T1 = d.reverse(Rt, Tt, rs, ts, 1.0, 1.0 / (num_steps + 1), noise_scale=noise_scale, center=True,
                           noise={"z_rot": zr, "z_trans": zt})
        assert (x1["rot"] - R1).abs().max() < 1e-12
        assert (x1["trans"] / d.coordinate_scaling - T1).abs().max() < 1e-10


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
