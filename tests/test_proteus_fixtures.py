"""Proteus re-implementation vs the official golden fixtures (every ``proteus_*_reference.pt`` set).

Everything is discovered from the fixture file: every ``t{k}`` group, every sample of ``meta/lengths``, both
passes, every stored activation group.

Tolerances: the rule of docs/testing.md (tests/tolerances.py), measured with a float64 copy of the network on the
same inputs (the network runs float32 as official; the copy is the rounding reference):

* pass 1 (no self-conditioning): ``16 e + 4 eps32 |x|``, ``e`` = our float32-vs-float64 distance (16: another
  kernel family x 2 evaluations x 2).
* pass 2 (template self-conditioning): the official template angle feature contains the psi torsion of an O atom
  that the official sampler places exactly on the CA->C line (zero input torsions), so its sin/cos are float32
  cancellation noise (values like +-0.0048, 0.0095; exactly 0 in float64) that the network amplifies; it differs
  between CPUs (our port reproduces the official function bit-for-bit on the same machine). That single cancellation
  is set by eps32 and the atoms' magnitude on every CPU, so its part of the bound is ``4 e2``, two realisations x 2,
  with ``e2`` the larger of the pass-2 float32-vs-float64 distance and the spread over rigid motions of the template
  (to which the features are invariant, so only the noise realisation changes); plus the kernel part ``16 e1`` of
  the same pass-1 inputs. With
  the random-weight fixture model this allows ~0.3 A, so pass 2 is also pinned down exactly: for the case with
  stored activations the official psi noise is recovered from the angle-embedder activation and injected (in both the
  float32 and the float64 run), after which every activation and the predicted frames match at the kernel rounding
  bound.
* scores: as the official score functions (tests/tolerances.py ``rot_score_tol`` / ``trans_score_tol``): the score's
  Jacobian times the rotation-vector rounding of the float32 quaternion path, plus the IGSO(3) series with float32
  trigonometry (rounding noise at small t and large angles: the bound grows to the value there).
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import official_fixtures_dir, official_params
from models.proteus import ProteusNetwork
from models.proteus.adapter import official_scores_from_frames as official_scores
from superdiff_protein.frames.checkpoints import load_proteus_checkpoint, load_state_dict_checked
from superdiff_protein.frames.geometry import quat_multiply, quat_to_rotvec, so3_exp
from superdiff_protein.frames.se3 import SE3Diffuser
from tolerances import (C, C_MEASURED, close, magnitude, quat_path_tol, rot_score_tol, rounding_tol, shadow_error,
                        trans_score_tol)

BB37 = [0, 1, 2, 4]  # atom37 indices of N, CA, C, O
F32, F64 = torch.float32, torch.float64


def _sets() -> list[Path]:
    """Network fixture sets: ``proteus_*_reference.pt`` whose JSON twin names a checkpoint
    (``proteus_diffuser_reference.pt`` holds diffuser data only)."""
    out = []
    for p in sorted(official_fixtures_dir().glob("proteus_*_reference.pt")):
        twin = p.with_suffix(".json")
        if twin.is_file() and json.loads(twin.read_text()).get("checkpoint_file"):
            out.append(p)
    return out


SETS = _sets()


def _ckpt_path(ref: Path) -> Path:
    twin = ref.with_suffix(".json")
    if twin.is_file():
        name = json.loads(twin.read_text()).get("checkpoint_file")
        if name:
            return ref.parent / name
    return ref.parent / ref.name.replace("_reference.pt", ".pth")


@pytest.fixture(scope="module", params=official_params(SETS, "proteus_*_reference.pt fixtures", ids=lambda p: p.stem))
def case(request):
    ref_path: Path = request.param
    ck = load_proteus_checkpoint(_ckpt_path(ref_path))
    net = ProteusNetwork(ck.model_conf)
    load_state_dict_checked(net, ck.state_dict, strict=True, source=str(ref_path))
    net.eval()
    R = torch.load(ref_path, map_location="cpu", weights_only=True)
    diff = SE3Diffuser.from_conf(ck.conf, center_rule="proteus")
    return {"net": net, "net64": copy.deepcopy(net).double(), "R": R, "ck": ck, "diff": diff}


def _ts(R) -> list[int]:
    return sorted({int(m.group(1)) for k in R for m in [re.match(r"t(\d+)/in/", k)] if m})


def _lengths(R) -> list[int]:
    return [int(n) for n in R["meta/lengths"].tolist()]


def _inputs(R, k: int, i: int | None = None, dtype=F32):
    """Padded batch inputs of group t{k} (or sample i unpadded)."""
    r7, t, m = R[f"t{k}/in/rigids_t"], R[f"t{k}/in/t"], R[f"t{k}/in/res_mask"]
    if i is not None:
        n = int(R["meta/lengths"][i])
        r7, t, m = r7[i : i + 1, :n], t[i : i + 1], m[i : i + 1, :n]
    r7 = r7.to(dtype)
    return r7[..., :4], r7[..., 4:], t, m


def _run(net, q, x, t, m, atoms=None, aux=False):
    with torch.no_grad():
        return net(q, x, t, m, template_atoms=atoms, aux_heads=aux)


def _both(case, q, x, t, m, atoms=None):
    """Our float32 outputs and those of the float64 copy on the same inputs."""
    o = _run(case["net"], q, x, t, m, atoms)
    o64 = _run(case["net64"], q.double(), x.double(), t, m, None if atoms is None else atoms.double())
    return o, o64


def _err(o, o64, key, mask=None):
    a, b = o[key], o64[key]
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return shadow_error(a, b)


def _consumed_atoms(R, k, i):
    return R[f"t{k}/per_sample/s{i}/pass2/self_condition_as_consumed/final_atom_positions"][..., BB37, :]


def test_checkpoint_loads_exactly(case):
    net, ck = case["net"], case["ck"]
    sd = net.state_dict()
    assert set(sd) == set(ck.state_dict)
    for k, v in ck.state_dict.items():
        assert torch.equal(sd[k], v), k


def test_pass1_per_sample(case):
    R = case["R"]
    for k in _ts(R):
        for i in range(len(_lengths(R))):
            o, o64 = _both(case, *_inputs(R, k, i))
            e = f"t{k}/per_sample/s{i}/pass1/out/"
            ref_tr = R[e + "pred_trans"]
            close(o["pred_rotmats"], R[e + "pred_rotmats"], C_MEASURED * _err(o, o64, "pred_rotmats")
                  + rounding_tol(F32), f"t{k} s{i} pass1 rotmats")
            tol_tr = C_MEASURED * _err(o, o64, "pred_trans") + rounding_tol(F32, magnitude(ref_tr))
            close(o["pred_trans"], ref_tr, tol_tr, f"t{k} s{i} pass1 trans")
            # the next step's template = official final_atom_positions (N, CA, C, O)
            ref_bb = R[e + "final_atom_positions"][..., BB37, :]
            close(o["backbone_atoms"], ref_bb, C_MEASURED * _err(o, o64, "backbone_atoms")
                  + rounding_tol(F32, magnitude(ref_bb)), f"t{k} s{i} pass1 backbone atoms")


def test_pass1_padded_batch_matches_unpadded_official(case):
    R = case["R"]
    for k in _ts(R):
        q, x, t, m = _inputs(R, k)
        o, o64 = _both(case, q, x, t, m)
        er, et = _err(o, o64, "pred_rotmats", m), _err(o, o64, "pred_trans", m)
        for i, n in enumerate(_lengths(R)):
            e = f"t{k}/per_sample/s{i}/pass1/out/"
            ref_tr = R[e + "pred_trans"]
            close(o["pred_rotmats"][i : i + 1, :n], R[e + "pred_rotmats"], C_MEASURED * er + rounding_tol(F32),
                  f"t{k} s{i} padded pass1 rotmats")
            close(o["pred_trans"][i : i + 1, :n], ref_tr, C_MEASURED * et + rounding_tol(F32, magnitude(ref_tr)),
                  f"t{k} s{i} padded pass1 trans")


def _noise_spread(case, q, x, t, m, atoms, out, key, reps: int = 3) -> float:
    """Spread of ``out[key]`` over rigid motions of the template: the template features are invariant to them
    mathematically, so only the float32 noise realisation of the degenerate psi feature changes."""
    g = torch.Generator().manual_seed(0)
    spread = 0.0
    for _ in range(reps):
        rot = so3_exp(torch.randn(3, generator=g) * 2.0)
        shift = torch.randn(3, generator=g) * 3.0
        o = _run(case["net"], q, x, t, m, (atoms @ rot.T + shift) * m[..., None, None])
        spread = max(spread, shadow_error(o[key][m.bool()], out[key][m.bool()]))
    return spread


def _pass2_tol(case, R, k, i, key, o2, o2_64, inputs, atoms, mask=None):
    """Pass-2 bound (module docstring): 4 x the measured size of the degenerate psi feature's noise (the larger of
    the pass-2 float32-vs-float64 distance and the spread of noise realisations) + 16 x the pass-1 float64 distance
    of the same inputs (kernel rounding) + the float32 floor."""
    o1, o1_64 = _both(case, *_inputs(R, k, i))
    ref = R[f"t{k}/per_sample/s{i}/pass2/out/{key}"]
    noise = max(_err(o2, o2_64, key, mask), _noise_spread(case, *inputs, atoms, o2, key))
    return C * noise + C_MEASURED * _err(o1, o1_64, key) + rounding_tol(F32, magnitude(ref))


def test_pass2_per_sample(case):
    R = case["R"]
    for k in _ts(R):
        for i in range(len(_lengths(R))):
            q, x, t, m = _inputs(R, k, i)
            atoms = _consumed_atoms(R, k, i)
            o, o64 = _both(case, q, x, t, m, atoms)
            e = f"t{k}/per_sample/s{i}/pass2/out/"
            for key in ("pred_trans", "pred_rotmats"):
                close(o[key], R[e + key], _pass2_tol(case, R, k, i, key, o, o64, (q, x, t, m), atoms),
                      f"t{k} s{i} pass2 {key}")


def test_pass2_padded_batch(case):
    """Padded pass 2 (template = per-sample official pass-1 atoms, zero-padded) equals our unpadded runs at the
    kernel rounding bound (the template features are per residue, so the degenerate psi noise is the same in both)
    and the official unpadded runs within the pass-2 bound."""
    R = case["R"]
    L = _lengths(R)
    for k in _ts(R):
        q, x, t, m = _inputs(R, k)
        atoms = torch.zeros(q.shape[:2] + (4, 3))
        for i, n in enumerate(L):
            atoms[i, :n] = _consumed_atoms(R, k, i)[0]
        o, o64 = _both(case, q, x, t, m, atoms)
        o1, o1_64 = _both(case, q, x, t, m)
        for i, n in enumerate(L):
            qi, xi, ti, mi = _inputs(R, k, i)
            oi = _run(case["net"], qi, xi, ti, mi, atoms[i : i + 1, :n])
            for key in ("pred_trans", "pred_rotmats"):
                close(o[key][i : i + 1, :n], oi[key], C_MEASURED * _err(o1, o1_64, key, m)
                      + rounding_tol(F32, magnitude(oi[key])), f"t{k} s{i} padded vs unpadded pass2 {key}")
            e = f"t{k}/per_sample/s{i}/pass2/out/"
            close(o["pred_trans"][i : i + 1, :n], R[e + "pred_trans"],
                  _pass2_tol(case, R, k, i, "pred_trans", o, o64, (q, x, t, m), atoms, m),
                  f"t{k} s{i} padded pass2 trans vs official")


PSI_CH = (26, 27, 40, 41)  # psi (sin, cos) in the torsion and alt-torsion blocks of the 57-wide feature


def _recover_official_psi(emb, feat: torch.Tensor, ref_out: torch.Tensor) -> torch.Tensor:
    """Recover the official (rounding-noise) psi sin/cos of every residue from the stored output of
    ``template_angle_embedder``: grid search + LBFGS on the 2 unknowns per residue (same value in
    the torsion and alt-torsion block); all other channels are ours (verified bit-equal)."""
    g = torch.linspace(-0.03, 0.03, 121)
    cand = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    best = torch.zeros(feat.shape[0], 2)
    with torch.no_grad():
        for r in range(feat.shape[0]):
            x = feat[r].expand(len(cand), -1).clone()
            x[:, [26, 40]] = cand[:, :1]
            x[:, [27, 41]] = cand[:, 1:]
            best[r] = cand[(emb(x) - ref_out[r]).abs().amax(-1).argmin()]
    par = best.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([par], max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16)

    def build(pp):
        x = feat.clone()
        x[:, [26, 40]] = pp[:, :1]
        x[:, [27, 41]] = pp[:, 1:]
        return x

    def closure():
        opt.zero_grad()
        loss = ((emb(build(par)) - ref_out) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return build(par.detach())


def test_activations_and_pass2_exact(case):
    """Forward-hook activations of every stored case, each bounded by our float32-vs-float64 distance of it.

    For a pass-2 case the official psi noise is first recovered from the stored angle-embedder output and injected
    into both runs (everything else is computed by us); then every downstream activation and the predicted frames
    must match at the kernel rounding bound - this pins pass 2 down exactly, independent of the noise.
    """
    from models.proteus.template import template_features

    net, R = case["net"], case["R"]
    prefixes = sorted({k.split("/")[1] for k in R if k.startswith("activations/")})
    assert prefixes, "fixture set has no activations"
    for pre in prefixes:
        tk, s, _ = pre.split("_", 2)  # e.g. t1_s0_pass2
        k, i = int(tk[1:]), int(s[1:])
        q, x, t, m = _inputs(R, k, i)
        atoms = _consumed_atoms(R, k, i) if pre.endswith("pass2") else None
        fixed = None
        if atoms is not None:
            emb = net.embedding_layer.template_embedder.template_angle_embedder
            tconf = net.conf["embed"]["template"]
            feat, _ = template_features(atoms, torch.ones(atoms.shape[:-1]), tconf["distogram"]["min_bin"],
                                        tconf["distogram"]["max_bin"], tconf["distogram"]["no_bins"],
                                        tconf["eps"], tconf["inf"])
            ref_out = R[f"activations/{pre}/embedding_layer.template_embedder.template_angle_embedder"].reshape(
                feat.shape[1], -1)
            fixed = _recover_official_psi(emb, feat[0], ref_out)
            nonpsi = [c for c in range(feat.shape[-1]) if c not in PSI_CH]
            assert torch.equal(fixed[:, nonpsi], feat[0][:, nonpsi])
            assert fixed[:, list(PSI_CH)].abs().max() < 0.05  # it is noise around the exact value 0
        runs = {}
        for tag, model, dt in (("32", net, F32), ("64", case["net64"], F64)):
            hooks = []
            if fixed is not None:
                f = fixed[None, None].to(dt)
                hooks.append(model.embedding_layer.template_embedder.template_angle_embedder.register_forward_pre_hook(
                    lambda mod, inp, f=f: (f,)))
            acts = {}
            hooks += [mod.register_forward_hook(lambda mod, inp, out, name=name, acts=acts: acts.__setitem__(name, out))
                      for name, mod in model.named_modules() if name]
            try:
                o = _run(model, q.to(dt), x.to(dt), t, m, None if atoms is None else atoms.to(dt), aux=True)
            finally:
                for h in hooks:
                    h.remove()
            runs[tag] = (o, acts)

        def pick(tag, name):
            o, acts = runs[tag]
            if name.startswith("auxiliary_heads/"):
                return o["aux"][name.split("/")[1]]
            if "/" in name:
                mod, idx = name.rsplit("/", 1)
                return acts[mod][int(idx)]
            return acts[name]

        checked = 0
        for key in [kk for kk in R if kk.startswith(f"activations/{pre}/")]:
            name = key.split("/", 2)[2]
            ref = R[key]
            mine, mine64 = pick("32", name).reshape(ref.shape), pick("64", name).reshape(ref.shape)
            close(mine, ref, C_MEASURED * shadow_error(mine, mine64) + rounding_tol(F32, magnitude(ref)), name)
            checked += 1
        assert checked > 0
        e = f"t{k}/per_sample/s{i}/{pre.split('_', 2)[2]}/out/"
        (o, _), (o64, _) = runs["32"], runs["64"]
        for key in ("pred_trans", "pred_rotmats"):
            close(o[key], R[e + key], C_MEASURED * _err(o, o64, key) + rounding_tol(F32, magnitude(R[e + key])),
                  f"{pre} {key}")


def _relative_rotvec(quats_t, quats_pred):
    """float64 rotation vector of ``q_pred^-1 q_t`` (where the official rotation score is evaluated)."""
    qp = quats_pred.double()
    inv = torch.cat([qp[..., :1], -qp[..., 1:]], -1) / (qp * qp).sum(-1, keepdim=True)
    return quat_to_rotvec(quat_multiply(inv, quats_t.double()))


def test_official_scores(case):
    """Given the official predicted frames, the official score functions (our port) reproduce the stored scores for
    every t group, sample and pass: the same float32 inputs, so only libm / summation-order rounding differs (the
    rotation vector from the same float32 quaternion ops, 4 eps32 (1 + omega/2); the series with float32 trig)."""
    R, ck, diff = case["R"], case["ck"], case["diff"]
    for k in _ts(R):
        for i in range(len(_lengths(R))):
            q, x, t, m = _inputs(R, k, i)
            for p in ("pass1", "pass2"):
                e = f"t{k}/per_sample/s{i}/{p}/out/"
                pq, pt = R[e + "pred_rotquat"], R[e + "pred_trans"]
                rs, ts = official_scores(q, x, pq, pt, t, m, ck.conf)
                v = _relative_rotvec(q, pq)
                ref = R[e + "rot_score"]
                tol = rot_score_tol(diff, v, t, quat_path_tol(v, k=4), F32)
                close(rs, ref, tol, f"t{k} s{i} {p} rot_score")
                assert (tol < 1e-3 * (1 + ref.abs())).float().mean() > 0.5  # informative for most residues
                close(ts, R[e + "trans_score"], trans_score_tol(diff, x, pt, ts, t), f"t{k} s{i} {p} trans_score")
