"""FrameDiff against the official golden fixtures (every ``framediff_*_reference.pt`` found).

Fixture directory: env ``SUPERDIFF_OFFICIAL_FIXTURES`` (see ``conftest.official_fixtures_dir``). Each
``framediff_<name>_reference.pt`` is paired with the checkpoint its JSON twin names (``framediff_<name>.pth``).
Everything is discovered from the file: every ``t{k}`` group, every sample length in ``meta/lengths``, both passes,
every stored activation; no value of one fixture set is written here.

Truth = the official *unpadded per-sample* runs (``t{k}/per_sample/s{i}``). We run the whole padded batch at once
(pass 2 with the per-sample self-conditioning inputs) and compare every sample's slice.

Tolerances: the rule of docs/testing.md (tests/tolerances.py). The network has no closed-form condition number,
so each comparison is bounded by the rounding it really has: the same forward pass with a float64 copy of the
network on the same inputs gives our float32 rounding error ``e`` (the maximum over the batch's real residues); the
official float32 run has an error of the same kind, so ``|ours - official| <= 16 e + 4 eps32 |x|`` (16: another
kernel family x 2 evaluations x 2, docs/testing.md). Scores add their own formulas' conditioning: the translation
score's float32 ``1 - exp(-B)`` (condition ~1/B), and for the rotation score the score's Jacobian times the
rotation-vector error (network rotations + the float32 quaternion path), plus the IGSO(3) series with float32
trigonometry, which is rounding noise at small t and large angles (the bound grows to the value itself there).
"""
from __future__ import annotations

import copy
import json
import re
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from conftest import official_fixtures_dir, official_params
from models.framediff import FrameDiffAdapter, FrameDiffConfig, FrameDiffScoreNetwork
from superdiff_protein.frames.official_numerics import official_rot_score, official_trans_score
from superdiff_protein.frames.checkpoints import load_framediff_checkpoint, load_state_dict_checked
from superdiff_protein.frames.geometry import backbone_atoms_from_frames, quat_multiply, quat_to_rotmat, quat_to_rotvec
from superdiff_protein.frames.se3 import SE3Diffuser, SE3DiffuserConfig
from tolerances import (C_MEASURED, close, magnitude, quat_path_tol, rot_score_tol, rounding_tol, shadow_error,
                        shadow_tol, trans_score_tol)

F32, F64 = torch.float32, torch.float64


def _ckpt(ref_path: Path) -> Path:
    twin = ref_path.with_suffix(".json")
    if twin.is_file():
        name = json.loads(twin.read_text()).get("checkpoint_file")
        if name:
            return ref_path.parent / name
    return ref_path.with_name(ref_path.name.replace("_reference.pt", ".pth"))


FIXTURES = [p for p in sorted(official_fixtures_dir().glob("framediff_*_reference.pt")) if _ckpt(p).is_file()]
SETS = official_params(FIXTURES, "FrameDiff golden fixtures (framediff_*_reference.pt + checkpoint)",
                       ids=lambda p: p.stem)


@lru_cache(maxsize=None)
def _load(ref_path: Path):
    ref = torch.load(ref_path, map_location="cpu", weights_only=True)
    ck = load_framediff_checkpoint(_ckpt(ref_path))
    net = FrameDiffScoreNetwork(FrameDiffConfig.from_dict(ck.model_conf))
    load_state_dict_checked(net, ck.state_dict, strict=True)
    net.eval()
    dcfg = SE3DiffuserConfig.from_conf(ck.conf)
    return ref, net, copy.deepcopy(net).double(), dcfg, SE3Diffuser(dcfg)


def _ts(ref) -> list[int]:
    return sorted({int(m.group(1)) for k in ref for m in [re.match(r"t(\d+)/in/", k)] if m})


def _lengths(ref) -> list[int]:
    return [int(n) for n in ref["meta/lengths"].tolist()]


def _inputs(ref, k: int, pas: int, dtype=F32):
    """Padded batch inputs of group t{k}; pass 2 gets the official per-sample self-conditioning inputs."""
    p = f"t{k}/in/"
    r7 = ref[p + "rigids_t"]
    sc = ref[p + "sc_ca_t"].clone()
    if pas == 2:
        for i, n in enumerate(_lengths(ref)):
            sc[i, :n] = ref[f"t{k}/per_sample/s{i}/pass2/in/sc_ca_t"][0]
    d = dict(quats=r7[..., :4], trans=r7[..., 4:], t=ref[p + "t"], res_mask=ref[p + "res_mask"],
             seq_idx=ref[p + "seq_idx"], fixed_mask=ref[p + "fixed_mask"], sc_ca=sc)
    return {kk: (v.to(dtype) if v.is_floating_point() and kk != "t" else v) for kk, v in d.items()}


def _relative_rotvec(quats_t, quats_pred):
    """float64 rotation vector of ``q_pred^-1 q_t`` (where the official rotation score is evaluated)."""
    qp = quats_pred.double()
    inv = torch.cat([qp[..., :1], -qp[..., 1:]], -1) / (qp * qp).sum(-1, keepdim=True)
    return quat_to_rotvec(quat_multiply(inv, quats_t.double()))


def _cases():
    if not FIXTURES:
        return [pytest.param(None, None, None, id="no-fixtures", marks=SETS[0].marks)]
    out = []
    for path in FIXTURES:
        ref = torch.load(path, map_location="cpu", weights_only=True)
        for k in _ts(ref):
            for pas in (1, 2):
                out.append(pytest.param(path, k, pas, id=f"{path.stem}-t{k}-pass{pas}"))
    return out


def _run(net, inp):
    with torch.no_grad():
        return net(**inp)


@pytest.mark.parametrize("path,k,pas", _cases())
def test_padded_batch_matches_per_sample(path, k, pas):
    """One padded batch forward reproduces every official unpadded per-sample run."""
    ref, net, net64, dcfg, diff = _load(path)
    inp, inp64 = _inputs(ref, k, pas), _inputs(ref, k, pas, F64)
    out, out64 = _run(net, inp), _run(net64, inp64)
    with torch.no_grad():
        rot_score = official_rot_score(inp["quats"], out["quats"], inp["t"], dcfg, inp["res_mask"])
        trans_score = official_trans_score(inp["trans"], out["trans"], inp["t"], dcfg, inp["res_mask"])
    lengths = _lengths(ref)
    real = inp["res_mask"].bool()
    # our float32 rounding of each output over the whole batch (real residues): a stabler maximum than one sample's
    err = {key: shadow_error(out[key][real], out64[key][real]) for key in ("rotmats", "trans", "psi")}
    atoms = backbone_atoms_from_frames(out["rotmats"], out["trans"], out["psi"], with_cb=True)
    atoms64 = backbone_atoms_from_frames(out64["rotmats"], out64["trans"], out64["psi"], with_cb=True)
    err["atoms"] = shadow_error(atoms[real], atoms64[real])
    if pas == 2:  # our pass-1 translations, for the official batched-vs-per-sample self-conditioning inputs
        o1, o164 = _run(net, _inputs(ref, k, 1)), _run(net64, _inputs(ref, k, 1, F64))
        err["pass1 trans"] = shadow_error(o1["trans"][real], o164["trans"][real])
    for i, n in enumerate(lengths):
        pre = f"t{k}/per_sample/s{i}/pass{pas}/out/"
        s = (i, slice(0, n))
        tr = ref[pre + "rigids"][0, :, 4:]
        tol_rot = C_MEASURED * err["rotmats"] + rounding_tol(F32)
        tol_tr = C_MEASURED * err["trans"] + rounding_tol(F32, magnitude(tr))
        close(out["rotmats"][s], ref[pre + "rigids_rotmats"][0], tol_rot, f"s{i} rotmats")
        close(out["trans"][s], tr, tol_tr, f"s{i} trans")
        close(out["psi"][s], ref[pre + "psi"][0], C_MEASURED * err["psi"] + rounding_tol(F32), f"s{i} psi")
        a37 = ref[pre + "atom37"][0]
        ref_atoms = torch.stack([a37[:, 0], a37[:, 1], a37[:, 2], a37[:, 4], a37[:, 3]], 1)  # N CA C O CB
        close(atoms[s], ref_atoms, C_MEASURED * err["atoms"] + rounding_tol(F32, magnitude(ref_atoms)),
              f"s{i} backbone atoms")
        assert a37[:, 5:].abs().max() == 0
        # translation score: the network's translation error over the variance, plus the float32 formula
        ts = ref[pre + "trans_score"][0]
        var = 1 - torch.exp(-diff.marginal_b_t(inp["t"][i:i + 1].double()))
        tol_ts = tol_tr * dcfg.coordinate_scaling / var + trans_score_tol(
            diff, inp["trans"][s][None], tr[None], ts[None], inp["t"][i:i + 1], F32)[0]
        close(trans_score[s], ts, tol_ts, f"s{i} trans_score")
        # rotation score: Jacobian x (network rotation error + quaternion path) + float32-trig series bound
        v = _relative_rotvec(inp["quats"][s], out64["quats"][s])[None]
        dv = C_MEASURED * 2 * err["rotmats"] + quat_path_tol(v)  # rotation angle <= 2 max|dR|
        tol_rs = rot_score_tol(diff, v, inp["t"][i:i + 1], dv, F32)[0]
        rs = ref[pre + "rot_score"][0]
        close(rot_score[s], rs, tol_rs, f"s{i} rot_score")
        assert (tol_rs < 1e-2 * (1 + rs.abs())).float().mean() > 0.5  # the bound is informative for most residues
        # padding rows are zero in the scores
        assert (rot_score[i, n:] == 0).all() and (trans_score[i, n:] == 0).all()
        if pas == 2:
            # the official batched run's self-conditioning input (its padded pass 1) equals its per-sample pass 1
            # to float32 rounding: the same bound as our own pass-1 translations
            sc_b, sc_s = ref[f"t{k}/pass2/in/sc_ca_t"][i, :n], ref[f"t{k}/per_sample/s{i}/pass2/in/sc_ca_t"][0]
            close(sc_b, sc_s, C_MEASURED * err["pass1 trans"] + rounding_tol(F32, magnitude(sc_s)),
                  f"s{i} official batched vs per-sample sc input")


@pytest.mark.parametrize("path", SETS)
def test_official_score_function(path):
    """Given the official predicted frames, our port of the official score functions reproduces rot/trans scores,
    for every t group, sample and pass: the same float32 inputs, so only libm / summation-order rounding differs
    (rotation vector from the same float32 quaternion ops: 4 eps32 (1 + omega/2); the series with float32 trig)."""
    ref, _, _, dcfg, diff = _load(path)
    lengths = _lengths(ref)
    for k in _ts(ref):
        t = ref[f"t{k}/in/t"]
        for i, n in enumerate(lengths):
            r7 = ref[f"t{k}/in/rigids_t"][i: i + 1, :n]
            for pas in (1, 2):
                pre = f"t{k}/per_sample/s{i}/pass{pas}/out/"
                pred = ref[pre + "rigids"]
                rs = official_rot_score(r7[..., :4], pred[..., :4], t[i: i + 1], dcfg)
                v = _relative_rotvec(r7[..., :4], pred[..., :4])
                close(rs, ref[pre + "rot_score"], rot_score_tol(diff, v, t[i: i + 1], quat_path_tol(v, k=4), F32),
                      f"t{k} s{i} pass{pas} rot_score")
                ts = official_trans_score(r7[..., 4:], pred[..., 4:], t[i: i + 1], dcfg)
                close(ts, ref[pre + "trans_score"], trans_score_tol(diff, r7[..., 4:], pred[..., 4:], ts, t[i: i + 1]),
                      f"t{k} s{i} pass{pas} trans_score")
                # quaternion -> matrix: ~6 float32 roundings of O(1) products per entry
                close(quat_to_rotmat(pred[..., :4]), ref[pre + "rigids_rotmats"], rounding_tol(F32, 1.0, 6),
                      "quat_to_rotmat")


@pytest.mark.parametrize("path", SETS)
def test_intermediate_activations(path):
    """Forward-hook outputs of every stored submodule (debugging aid for numerical drift), each bounded by our own
    float32-vs-float64 distance of that activation."""
    ref, net, net64, _, _ = _load(path)
    pat = re.compile(r"activations/t(\d+)_s(\d+)_pass(\d+)/")
    groups = sorted({m.group(1, 2, 3) for k in ref for m in [pat.match(k)] if m})
    assert groups, "fixture has no activations"
    for tk, si, pas in groups:
        k, i, pas = int(tk), int(si), int(pas)
        n = int(ref["meta/lengths"][i])
        prefix = f"activations/t{k}_s{i}_pass{pas}/"
        names = sorted({key[len(prefix):].split("/")[0] for key in ref if key.startswith(prefix)})
        captured: dict[str, dict] = {"32": {}, "64": {}}
        for tag, model, dtype in (("32", net, F32), ("64", net64, F64)):
            modules = dict(model.named_modules())
            hooks = []
            for name in names:
                assert name in modules, f"module {name} missing in our network"
                hooks.append(modules[name].register_forward_hook(
                    lambda m, a, o, name=name, tag=tag: captured[tag].__setitem__(name, o)))
            inp = _inputs(ref, k, pas, dtype)
            inp = {kk: (v[i: i + 1, :n] if v.ndim > 1 else v[i: i + 1]) for kk, v in inp.items()}
            try:
                _run(model, inp)
            finally:
                for h in hooks:
                    h.remove()
        for key in (kk for kk in ref if kk.startswith(prefix)):
            rest = key[len(prefix):].split("/")
            got, got64 = captured["32"][rest[0]], captured["64"][rest[0]]
            if len(rest) > 1:
                got, got64 = got[int(rest[1])], got64[int(rest[1])]
            want = ref[key]
            close(got, want, shadow_tol(got, got64, F32, magnitude(want)), key)


@pytest.mark.parametrize("path", SETS)
def test_adapter_from_checkpoint_self_conditioning(path):
    """Adapter (rotation matrices in, Angstrom) reproduces pass 1 and the self-conditioned pass 2 at every t group.
    The adapter derives quaternions from the stored rotation matrices (not the official quaternions): that input
    rounding is part of what the float64 adapter run measures."""
    ref, _, _, _, _ = _load(path)
    model = FrameDiffAdapter.from_checkpoint(_ckpt(path))
    model64 = FrameDiffAdapter.from_checkpoint(_ckpt(path), dtype=F64)
    for k in _ts(ref):
        p = f"t{k}/in/"
        r7 = ref[p + "rigids_t"]
        rot = ref[p + "rigids_t_rotmats"]
        outs = {}
        with torch.no_grad():
            for tag, m, dt in (("32", model, F32), ("64", model64, F64)):
                o1 = m(rot.to(dt), r7[..., 4:].to(dt), ref[p + "t"], ref[p + "res_mask"])
                o2 = m(rot.to(dt), r7[..., 4:].to(dt), ref[p + "t"], ref[p + "res_mask"], o1.self_cond_state)
                outs[tag] = (o1, o2)
        for i, n in enumerate(_lengths(ref)):
            s = (i, slice(0, n))
            for pas in (1, 2):
                o, o64 = outs["32"][pas - 1], outs["64"][pas - 1]
                pre = f"t{k}/per_sample/s{i}/pass{pas}/out/"
                close(o.rotmats[s], ref[pre + "rigids_rotmats"][0], shadow_tol(o.rotmats[s], o64.rotmats[s], F32, 1.0),
                      f"t{k} s{i} pass{pas} adapter rotmats")
                tr = ref[pre + "rigids"][0, :, 4:]
                close(o.trans[s], tr, shadow_tol(o.trans[s], o64.trans[s], F32, magnitude(tr)),
                      f"t{k} s{i} pass{pas} adapter trans")
                close(o.psi[s], ref[pre + "psi"][0], shadow_tol(o.psi[s], o64.psi[s], F32, 1.0),
                      f"t{k} s{i} pass{pas} adapter psi")
            o1, o164 = outs["32"][0], outs["64"][0]
            sc = ref[f"t{k}/per_sample/s{i}/pass2/in/sc_ca_t"][0]
            close(o1.self_cond_state[s], sc, shadow_tol(o1.self_cond_state[s], o164.self_cond_state[s], F32,
                                                        magnitude(sc)), f"t{k} s{i} sc state")
