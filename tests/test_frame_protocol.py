"""Frame-model protocol adapters (FrameScoreModel) and the official trajectory replay.

Replay: every ``*_small_public_reference.pt`` in $SUPERDIFF_OFFICIAL_FIXTURES stores a short official
trajectory (num_t = 5, min_t = 0.01, noise_scale = 0.1) with every numpy RNG draw recorded. We rebuild
the initial frames from the recorded ``sample_ref`` draws, run the *core* sampler (single model, the
official time grid ``time_grid="framediff"``, ``noise_fn`` injecting the recorded z's) and do the
official final step (model prediction at min_t with the previous step's t) with
``FrameScoreModel.denoise_final``.

* Centring: the official sample_ref is not centred; the official first reverse step recentres, so
  we start from the centred draw (the core translation space is the centred subspace). The networks
  are translation equivariant, so this changes the first model inputs only at rounding level.
* Tolerances (docs/testing.md, tests/tolerances.py): initial frames as stored (float32 eigh quaternions:
  ``rounding_tol(float32, cond=12)``; translations one float32 rounding). Every later state and the final prediction
  are bounded by the same replay with the model in float64 (the rounding reference): ``16 e_k`` for FrameDiff.
* Proteus: the first step (no template) likewise. From step 2 on the template's psi feature is float32
  cancellation noise that differs between CPUs (docs/proteus.md, trap 1; ~1e-3 A per forward pass with the random
  fixture weights), compounded over the steps. Its measured size is the larger of the float64 distance and the
  spread of replays whose template is rigidly moved (the features are invariant to that, so only the noise
  realisation changes); that single cancellation is bounded by 4 x it (two realisations x 2), plus the kernel part
  16 x the first step's float64 distance.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import official_fixtures_dir, official_skip_reason
from models.frame_models import FrameModelState, FramePrediction, FrameScoreModel
from superdiff_protein.frames.geometry import quat_to_rotmat, so3_exp, so3_log
from superdiff_protein.core.kappa import SingleRule
from superdiff_protein.core.protocol import IncompatibleModelsError, ScoreModel, check_compatible
from superdiff_protein.frames.registry import load_model
from superdiff_protein.core.sampler import BiasedEstimatorWarning, SamplerConfig, superpose
from superdiff_protein.frames.se3 import SE3Diffuser
from tolerances import (C, C_MEASURED, close, magnitude, quat_path_tol, rot_score_tol, rounding_tol, shadow_error,
                        trans_score_tol)

FIX = official_fixtures_dir()
SETS = sorted(FIX.glob("*_small_public_reference.pt"))
if not SETS:
    pytest.skip(official_skip_reason("*_small_public_reference.pt"), allow_module_level=True)

F32 = torch.float32


def _ckpt(ref_path: Path) -> Path:
    meta = json.loads(ref_path.with_suffix(".json").read_text())
    return ref_path.parent / meta["checkpoint_file"]


@pytest.fixture(scope="module", params=SETS, ids=lambda p: p.stem)
def fx(request):
    ref = torch.load(request.param, map_location="cpu", weights_only=False)
    model = load_model(_ckpt(request.param))
    return ref, model


class _RigidTemplate(nn.Module):
    """Predictor wrapper applying a rigid motion to the self-conditioning template (Proteus): the template features
    are invariant to it mathematically, so only the float32 rounding (the degenerate psi noise) changes."""

    def __init__(self, inner, rot, shift):
        super().__init__()
        self.inner, self.rot, self.shift = inner, rot, shift

    def forward(self, R, T, t, m, cond=None):
        if cond is not None:
            cond = (cond @ self.rot.T.to(cond) + self.shift.to(cond)) * m[..., None, None].to(cond)
        return self.inner(R, T, t, m, cond)


def _replay(ref, model):
    D = model.diffuser
    keys = sorted(k for k in ref if k.startswith("traj/noise/") and not k.endswith("randint"))
    init, steps = keys[:3], keys[3:]
    assert [k.split("_", 1)[1] for k in init] == ["randn", "rand", "normal_std"]
    N = ref[init[0]].shape[0]
    R0, T0 = D.sample_ref(1, N, noise={"axis": ref[init[0]][None], "angle_uniform": ref[init[1]][None],
                                       "trans": ref[init[2]][None]})
    ns = len(steps) // 2

    def noise_fn(step, t, x):  # official order per step: z_rot then z_trans; trans enters as -z
        return {"rot": ref[steps[2 * step]].reshape(1, N, 3), "trans": -ref[steps[2 * step + 1]].reshape(1, N, 3)}

    cfg = SamplerConfig(num_steps=ns, min_t=0.01, noise_scale=0.1, time_grid="framediff")
    mask = torch.ones(1, N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BiasedEstimatorWarning)
        res = superpose(D.space, [model], SingleRule(), cfg, [0], {"rot": (N,), "trans": (N, 3)}, mask=mask,
                        x_init=D.to_space(R0, T0 - T0.mean(1, keepdim=True)), noise_fn=noise_fn,
                        save_trajectory=True)
    states = [D.from_space(x) for x in res.trajectory]
    final = model.denoise_final(res.x, res.t[-2].expand(1), mask, extras=res.extras[0])
    return (R0, T0), states, final, res


def _official(ref, k):
    r = ref["traj/out/rigid_traj"][k]
    return quat_to_rotmat(r[:, :4].double()), r[:, 4:].double()


def _model64(request):
    """The fixture's model in float64 (the rounding reference)."""
    return load_model(_ckpt(request.node.callspec.params["fx"]), dtype=torch.float64)


def test_official_trajectory_replay(fx, request):
    ref, model = fx
    model64 = _model64(request)
    n_states = ref["traj/out/rigid_traj"].shape[0]  # initial + reverse steps + final prediction
    (R0, T0), states, (Rf, Tf), res = _replay(ref, model)
    _, states64, (Rf64, Tf64), _ = _replay(ref, model64)
    assert len(states) == n_states - 1 and float(res.t[0]) == 1.0 and float(res.t[-1]) == 0.01
    Rr, Tr = _official(ref, n_states - 1)
    close(R0[0], Rr, rounding_tol(F32, cond=12), "initial rotations (float32 eigh quaternions)")
    close(T0[0], Tr, rounding_tol(F32, Tr.abs()), "initial translations")
    ours = [states[k] for k in range(1, len(states))] + [(Rf, Tf)]
    shadow = [states64[k] for k in range(1, len(states64))] + [(Rf64, Tf64)]
    e = [(shadow_error(R, R64), shadow_error(T, T64)) for (R, T), (R64, T64) in zip(ours, shadow)]
    if model.kind == "proteus":  # the noise realisations themselves: replays with rigidly moved templates
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            wrap = _RigidTemplate(model.predictor, so3_exp(torch.randn(3, generator=g) * 2.0),
                                  torch.randn(3, generator=g) * 3)
            _, st2, fin2, _ = _replay(ref, FrameScoreModel(wrap, model.diffuser, kind="proteus"))
            other = [st2[k] for k in range(1, len(st2))] + [fin2]
            e = [(max(er, shadow_error(R, R2)), max(et, shadow_error(T, T2)))
                 for (er, et), (R, T), (R2, T2) in zip(e, ours, other)]
    for k, ((R, T), (er, et)) in enumerate(zip(ours, e)):
        Rr, Tr = _official(ref, n_states - 2 - k)
        if model.kind == "framediff" or k == 0:
            tol_r, tol_t = C_MEASURED * er, C_MEASURED * et
        else:  # Proteus from step 2: the degenerate template psi feature (module docstring)
            tol_r, tol_t = C * er + C_MEASURED * e[0][0], C * et + C_MEASURED * e[0][1]
        close(R[0], Rr, tol_r + rounding_tol(F32), f"{model.kind} state {k + 1} rotations")
        close(T[0], Tr, tol_t + rounding_tol(F32, magnitude(Tr)), f"{model.kind} state {k + 1} translations")


def test_protocol_signature_and_refusal(fx):
    _, model = fx
    assert isinstance(model, ScoreModel)
    assert model.signature() == model.diffuser.space.signature()
    assert model.signature()["trans"]["coordinate_scaling"] == 0.1
    check_compatible(SE3Diffuser.framediff_default().space.signature(), [model])  # FrameDiff & Proteus share it
    other = SE3Diffuser.from_conf({"r3": {"coordinate_scaling": 1.0}})
    with pytest.raises(IncompatibleModelsError, match="coordinate_scaling"):
        check_compatible(other.space.signature(), [model])
    other = SE3Diffuser.from_conf({"so3": {"max_sigma": 2.0}})
    with pytest.raises(IncompatibleModelsError, match="sigma"):
        check_compatible(other.space.signature(), [model])


class _Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.conds = inner, []

    def forward(self, R, T, t, m, cond=None):
        self.conds.append(None if cond is None else cond.clone())
        return self.inner(R, T, t, m, cond)


def _random_state(D, B, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = so3_exp(torch.randn(B, N, 3, generator=g, dtype=torch.float64))
    x = torch.randn(B, N, 3, generator=g, dtype=torch.float64)
    return {"rot": R, "trans": x - x.mean(1, keepdim=True)}


def test_self_conditioning_schedule(fx):
    _, model = fx
    cnt = _Counting(model.predictor)
    m = FrameScoreModel(cnt, model.diffuser, kind=model.kind)
    x = _random_state(model.diffuser, 1, 10)
    t = torch.full((1,), 0.8, dtype=torch.float64)
    mask = torch.ones(1, 10)
    torch.set_grad_enabled(False)
    try:
        _self_cond_checks(model, m, cnt, x, t, mask)
    finally:
        torch.set_grad_enabled(True)


def _self_cond_checks(model, m, cnt, x, t, mask):
    out1 = m(x, t, mask, m.init_state(1, mask))
    if model.kind == "framediff":  # official: an extra pass with zero self-conditioning, then the real pass
        assert len(cnt.conds) == 2 and cnt.conds[0] is None and cnt.conds[1] is not None
    else:  # Proteus: no template on the first step
        assert len(cnt.conds) == 1 and cnt.conds[0] is None
    n = len(cnt.conds)
    out2 = m(x, t, mask, out1.state)
    assert len(cnt.conds) == n + 1 and torch.equal(cnt.conds[-1], out1.state.cond)
    assert out2.state.calls == 2 and torch.equal(out1.extras["self_cond"], out1.state.cond)
    assert set(out1.scores) == {"rot", "trans"} and out1.scores["rot"].dtype == torch.float64
    assert out1.extras["pred_trans"].shape == (1, 10, 3) and out1.extras["pred_rotmats"].shape == (1, 10, 3, 3)
    if model.kind == "framediff":
        assert out1.extras["psi"].shape == (1, 10, 2)
    # final step from the extras == from the state
    a = m.denoise_final(x, t, mask, state=out2.state)
    b = m.denoise_final(x, t, mask, extras=out2.extras)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_padded_batch_matches_per_sample_over_two_steps(fx, request):
    """Lengths 7 and 11 padded to 11 (garbage in the padding) == each sample alone, over two
    self-conditioned calls; scores are 0 in the padding. The per-sample second call gets the batch's
    (sliced) carried state: Proteus's template psi feature would amplify 1e-7 A differences of the
    first predictions into ~1e-3 (official rounding-noise trap, docs/proteus.md)."""
    _, model = fx
    D = model.diffuser
    lens = [7, 11]
    xs = [_random_state(D, 1, n, seed=i) for i, n in enumerate(lens)]
    Nmax = max(lens)
    xb = {"rot": so3_exp(torch.randn(2, Nmax, 3, dtype=torch.float64)), "trans": 5 * torch.randn(2, Nmax, 3, dtype=torch.float64)}
    mask = torch.zeros(2, Nmax)
    for i, n in enumerate(lens):
        xb["rot"][i, :n], xb["trans"][i, :n] = xs[i]["rot"][0], xs[i]["trans"][0]
        mask[i, :n] = 1
    t = torch.tensor([0.7, 0.4], dtype=torch.float64)
    outs = {}
    for tag, mdl in (("32", model), ("64", _model64(request))):
        sb = mdl.init_state(2, mask)
        outs[tag] = []
        with torch.no_grad():
            for _ in range(2):
                o = mdl(xb, t, mask, sb)
                sb = o.state
                outs[tag].append(o)
    outs_b = outs["32"]
    real = mask.bool()

    def tol(step, get):  # kernel rounding of this batch (float64 copy), docs/testing.md
        a, b = get(outs["32"][step]), get(outs["64"][step])
        return C_MEASURED * shadow_error(a[real], b[real]) + rounding_tol(F32, magnitude(b[real]))

    tols = [{"trans": tol(s, lambda o: o.scores["trans"]), "rot": tol(s, lambda o: o.scores["rot"]),
             "pred_trans": tol(s, lambda o: o.extras["pred_trans"])} for s in range(2)]
    if model.kind == "proteus":  # same template in both runs, so the same psi noise: only the kernel rounding of the
        tols[1] = tols[0]        # first step applies (a float64 run would recompute the noise away)
    for i, n in enumerate(lens):
        si = model.init_state(1, None)
        for step in range(2):
            with torch.no_grad():
                o = model(xs[i], t[i:i + 1], None, si)
            si = FrameModelState(outs_b[step].state.cond[i:i + 1, :n], step + 1)
            ob = outs_b[step]
            close(ob.scores["trans"][i, :n], o.scores["trans"][0], tols[step]["trans"], f"s{i} step {step} trans score")
            close(ob.scores["rot"][i, :n], o.scores["rot"][0], tols[step]["rot"], f"s{i} step {step} rot score")
            close(ob.extras["pred_trans"][i, :n], o.extras["pred_trans"][0], tols[step]["pred_trans"],
                  f"s{i} step {step} pred_trans")
            assert ob.scores["rot"][i, n:].abs().sum() == 0 and ob.scores["trans"][i, n:].abs().sum() == 0


def test_scores_are_the_diffusers_from_prediction(fx):
    """The protocol's scores are SE3Diffuser.scores_from_prediction of the predicted frames (float32 t)."""
    _, model = fx
    x = _random_state(model.diffuser, 1, 9, seed=3)
    t = torch.tensor([0.6], dtype=torch.float64)
    mask = torch.ones(1, 9)
    with torch.no_grad():
        out = model(x, t, mask, model.init_state(1, mask))
    R = x["rot"].float()
    T = (x["trans"] / 0.1).float()
    rs, ts = model.diffuser.scores_from_prediction(R, T, out.extras["pred_rotmats"], out.extras["pred_trans"],
                                                   t.float(), mask)
    # quaternion path of the network vs re-derived quaternions: float32 rounding, amplified by the score
    pr = out.extras["pred_rotmats"].double()
    v = so3_log(pr.transpose(-1, -2) @ R.double())
    close(rs, out.scores["rot"], rot_score_tol(model.diffuser, v, t, quat_path_tol(v), F32), "rot score")
    close(ts, out.scores["trans"], trans_score_tol(model.diffuser, T, out.extras["pred_trans"], ts, t), "trans score")


# ------------------------------------------------------------------------ the worked example of the docs
class ToyPredictor(nn.Module):
    """'My own frame model': predicts a fixed ideal helix-like structure for every input (docs example)."""

    def __init__(self, n_max: int = 64):
        super().__init__()
        k = torch.arange(n_max, dtype=torch.float32)
        self.register_buffer("ca", torch.stack([2.3 * torch.cos(1.745 * k), 2.3 * torch.sin(1.745 * k), 1.5 * k], -1))
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, rotmats, trans, t, res_mask, self_cond=None):
        B, N = trans.shape[:2]
        ca = self.ca[:N].expand(B, N, 3) + self.dummy
        rot = torch.eye(3, device=trans.device).expand(B, N, 3, 3)
        return FramePrediction(rotmats=rot, trans=ca - ca.mean(1, keepdim=True), self_cond_state=ca)


def test_docs_worked_example_runs_in_the_sampler():
    model = FrameScoreModel(ToyPredictor(), SE3Diffuser.framediff_default(), name="toy")
    assert model.kind == "generic"
    D = model.diffuser
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BiasedEstimatorWarning)
        res = superpose(D.space, [model], SingleRule(), SamplerConfig(num_steps=20, noise_scale=0.0, sampling="sde"),
                        seeds=[0, 1], shapes={"rot": (12,), "trans": (12, 3)})
    R, T = D.from_space(res.x)
    # with zero noise the sampler moves towards the predicted structure
    target = model.predictor.ca[:12].double()
    target = target - target.mean(0)
    assert ((T - target).norm(dim=-1).mean() < 3.0)
    assert res.logq.shape == (2, 2, 1) and torch.isfinite(res.logq).all()
