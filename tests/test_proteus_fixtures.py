"""Proteus re-implementation vs the official golden fixtures (every ``proteus_*_reference.pt`` set).

Tolerances (float32 network, outputs in Angstrom):
* pass 1 (no self-conditioning): pure float32 rounding -> rotmats 5e-6, translations 2e-5 A.
* pass 2 (template self-conditioning): the official template angle feature contains the psi torsion
  of an O atom that the official sampler places exactly on the CA->C line (zero input torsions), so
  its sin/cos are float32 cancellation noise amplified 1e4x (values like +-0.0048, 0.0095).  That
  noise differs between CPUs (our port reproduces the official function bit-for-bit on the same
  machine).  The tolerance is therefore calibrated per case: 3x the spread of our own outputs over
  random rigid motions of the template (to which the features are mathematically invariant, so
  only the rounding noise changes), plus the float32 floor.  This bound is loose (~0.2-0.7 A for
  the random-weight fixture model), so pass 2 is also pinned down exactly: for the case with stored
  activations the official psi noise is recovered from the angle-embedder activation and injected,
  after which every activation and the predicted frames match at float32 rounding.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import official_fixtures_dir
from models.proteus import ProteusNetwork
from models.proteus.official_scores import official_scores
from superdiff_protein.geometry import so3_exp
from superdiff_protein.checkpoints import load_proteus_checkpoint, load_state_dict_checked

BB37 = [0, 1, 2, 4]  # atom37 indices of N, CA, C, O


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
pytestmark = pytest.mark.skipif(not SETS, reason="no proteus_*_reference.pt fixtures found")


def _ckpt_path(ref: Path) -> Path:
    twin = ref.with_suffix(".json")
    if twin.is_file():
        name = json.loads(twin.read_text()).get("checkpoint_file")
        if name:
            return ref.parent / name
    return ref.parent / ref.name.replace("_reference.pt", ".pth")


@pytest.fixture(scope="module", params=SETS, ids=[p.stem for p in SETS])
def case(request):
    ref_path: Path = request.param
    ck = load_proteus_checkpoint(_ckpt_path(ref_path))
    net = ProteusNetwork(ck.model_conf)
    load_state_dict_checked(net, ck.state_dict, strict=True, source=str(ref_path))
    net.eval()
    R = torch.load(ref_path, map_location="cpu", weights_only=True)
    return {"net": net, "R": R, "ck": ck}


def _n_t(R) -> int:
    return len(R["meta/t_values"])


def _inputs(R, k: int, i: int | None = None):
    """Padded batch inputs of group t{k} (or sample i unpadded)."""
    r7, t, m = R[f"t{k}/in/rigids_t"], R[f"t{k}/in/t"], R[f"t{k}/in/res_mask"]
    if i is not None:
        n = int(R["meta/lengths"][i])
        r7, t, m = r7[i : i + 1, :n], t[i : i + 1], m[i : i + 1, :n]
    return r7[..., :4], r7[..., 4:], t, m


def _run(net, q, x, t, m, atoms=None, aux=False):
    with torch.no_grad():
        return net(q, x, t, m, template_atoms=atoms, aux_heads=aux)


def _maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


def _noise_tol(net, q, x, t, m, atoms, out, key, reps: int = 4) -> float:
    """3x the spread of ``out[key]`` over rigid motions of the template.

    The template features are mathematically invariant to a global rotation/translation of the
    template atoms; only the float32 rounding (amplified in the degenerate psi feature) changes.
    So the spread over a few random rigid motions samples exactly the official rounding noise.
    """
    g = torch.Generator().manual_seed(0)
    spread = 0.0
    for _ in range(reps):
        rot = so3_exp(torch.randn(3, generator=g) * 2.0)
        shift = torch.randn(3, generator=g) * 3.0
        o = _run(net, q, x, t, m, (atoms @ rot.T + shift) * m[..., None, None])
        spread = max(spread, _maxdiff(o[key], out[key]))
    return 3 * spread


def test_checkpoint_loads_exactly(case):
    net, ck = case["net"], case["ck"]
    sd = net.state_dict()
    assert set(sd) == set(ck.state_dict)
    for k, v in ck.state_dict.items():
        assert torch.equal(sd[k], v), k


def test_pass1_per_sample(case):
    net, R = case["net"], case["R"]
    for k in range(_n_t(R)):
        for i in range(len(R["meta/lengths"])):
            o = _run(net, *_inputs(R, k, i))
            e = f"t{k}/per_sample/s{i}/pass1/out/"
            assert _maxdiff(o["pred_rotmats"], R[e + "pred_rotmats"]) < 5e-6, (k, i)
            assert _maxdiff(o["pred_trans"], R[e + "pred_trans"]) < 2e-5, (k, i)
            # the next step's template = official final_atom_positions (N, CA, C, O)
            assert _maxdiff(o["backbone_atoms"], R[e + "final_atom_positions"][..., BB37, :]) < 2e-5, (k, i)


def test_pass1_padded_batch_matches_unpadded_official(case):
    net, R = case["net"], case["R"]
    for k in range(_n_t(R)):
        o = _run(net, *_inputs(R, k))
        for i, n in enumerate(R["meta/lengths"].tolist()):
            e = f"t{k}/per_sample/s{i}/pass1/out/"
            assert _maxdiff(o["pred_rotmats"][i : i + 1, :n], R[e + "pred_rotmats"]) < 5e-6, (k, i)
            assert _maxdiff(o["pred_trans"][i : i + 1, :n], R[e + "pred_trans"]) < 2e-5, (k, i)


def _consumed_atoms(R, k, i):
    return R[f"t{k}/per_sample/s{i}/pass2/self_condition_as_consumed/final_atom_positions"][..., BB37, :]


def test_pass2_per_sample(case):
    net, R = case["net"], case["R"]
    for k in range(_n_t(R)):
        for i in range(len(R["meta/lengths"])):
            q, x, t, m = _inputs(R, k, i)
            atoms = _consumed_atoms(R, k, i)
            o = _run(net, q, x, t, m, atoms)
            e = f"t{k}/per_sample/s{i}/pass2/out/"
            for key, ekey, floor in (("pred_trans", "pred_trans", 2e-5), ("pred_rotmats", "pred_rotmats", 5e-6)):
                tol = _noise_tol(net, q, x, t, m, atoms, o, key) + floor
                assert _maxdiff(o[key], R[e + ekey]) <= tol, (k, i, key, tol)


def test_pass2_padded_batch(case):
    """Padded pass 2 (template = per-sample official pass-1 atoms, zero-padded) equals our unpadded runs
    tightly and the official unpadded runs within the rounding-noise tolerance."""
    net, R = case["net"], case["R"]
    L = R["meta/lengths"].tolist()
    for k in range(_n_t(R)):
        q, x, t, m = _inputs(R, k)
        atoms = torch.zeros(q.shape[:2] + (4, 3))
        for i, n in enumerate(L):
            atoms[i, :n] = _consumed_atoms(R, k, i)[0]
        o = _run(net, q, x, t, m, atoms)
        for i, n in enumerate(L):
            qi, xi, ti, mi = _inputs(R, k, i)
            oi = _run(net, qi, xi, ti, mi, atoms[i : i + 1, :n])
            assert _maxdiff(o["pred_trans"][i : i + 1, :n], oi["pred_trans"]) < 2e-5, (k, i)
            assert _maxdiff(o["pred_rotmats"][i : i + 1, :n], oi["pred_rotmats"]) < 5e-6, (k, i)
            e = f"t{k}/per_sample/s{i}/pass2/out/"
            tol = _noise_tol(net, qi, xi, ti, mi, atoms[i : i + 1, :n], oi, "pred_trans") + 2e-5
            assert _maxdiff(o["pred_trans"][i : i + 1, :n], R[e + "pred_trans"]) <= tol, (k, i)


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
    """Forward-hook activations of the stored case, all compared at float32 rounding.

    For a pass-2 case the official psi noise is first recovered from the stored angle-embedder
    output and injected (everything else is computed by us); then every downstream activation and
    the predicted frames must match tightly - this pins pass 2 down exactly, independent of the noise.
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
        hooks = []
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
            hooks.append(emb.register_forward_pre_hook(lambda mod, inp: (fixed[None, None],)))
        acts = {}
        hooks += [mod.register_forward_hook(lambda mod, inp, out, name=name: acts.__setitem__(name, out))
                  for name, mod in net.named_modules() if name]
        try:
            o = _run(net, q, x, t, m, atoms, aux=True)
        finally:
            for h in hooks:
                h.remove()
        checked = 0
        for key in [kk for kk in R if kk.startswith(f"activations/{pre}/")]:
            name = key.split("/", 2)[2]
            if name.startswith("auxiliary_heads/"):
                mine = o["aux"][name.split("/")[1]]
            elif "/" in name:
                mod, idx = name.rsplit("/", 1)
                mine = acts[mod][int(idx)]
            else:
                mine = acts[name]
            ref = R[key]
            assert _maxdiff(mine.reshape(ref.shape), ref) < 1e-5 * max(1.0, ref.abs().max().item()), name
            checked += 1
        assert checked > 0
        e = f"t{k}/per_sample/s{i}/{pre.split('_', 2)[2]}/out/"
        assert _maxdiff(o["pred_trans"], R[e + "pred_trans"]) < 2e-5
        assert _maxdiff(o["pred_rotmats"], R[e + "pred_rotmats"]) < 5e-6


def test_official_scores(case):
    net, R, ck = case["net"], case["R"], case["ck"]
    for k in range(_n_t(R)):
        for i in range(len(R["meta/lengths"])):
            q, x, t, m = _inputs(R, k, i)
            for p in ("pass1", "pass2"):
                e = f"t{k}/per_sample/s{i}/{p}/out/"
                rs, ts = official_scores(q, x, R[e + "pred_rotquat"], R[e + "pred_trans"], t, m, ck.conf)
                ref = R[e + "rot_score"]
                scale = ref.abs().amax(-1).clamp_min(1.0)
                ok = R[e + "rot_score_sensitivity"] < 1e-3 * scale  # elsewhere official value is rounding noise
                assert ok.any()
                assert ((rs - ref).abs().amax(-1)[ok] / scale[ok]).max() < 2e-5, (k, i, p)
                assert _maxdiff(ts, R[e + "trans_score"]) < 1e-5, (k, i, p)
