"""FrameDiff network: paper-size keys/shapes/params, masking of padded batches, SE(3) equivariance.

Tolerances (docs/testing.md, tests/tolerances.py): float64 comparisons are bounded by the same computation's
float32 rounding scaled by eps64/eps32 (rounding errors scale with the unit roundoff; the conditioning is the same);
float32 comparisons by a float64 copy of the network (``16 e``).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import official_fixtures_dir, official_params
from models.framediff import FrameDiffAdapter, FrameDiffConfig, FrameDiffScoreNetwork
from superdiff_protein.frames.official_numerics import official_rot_score, official_trans_score
from superdiff_protein.frames.geometry import quat_multiply, quat_to_rotmat, quat_to_rotvec, rotmat_to_quat, so3_exp
from superdiff_protein.frames.se3 import SE3Diffuser, SE3DiffuserConfig
from tolerances import C_MEASURED, close, float64_tol, magnitude, rot_score_tol, rounding_tol, shadow_error

F32, F64 = torch.float32, torch.float64


def _f64_tol(net64, run, keys=("rotmats", "trans", "psi")) -> dict:
    """float64 bounds from the float32 rounding of the same computation: ``run(net, dtype)`` -> outputs; the float32
    copy's distance to the float64 run, times eps64/eps32, times C_MEASURED, plus the float64 floor."""
    import copy

    o64 = run(net64, F64)
    o32 = run(copy.deepcopy(net64).float(), F32)
    return {k: float64_tol(o32[k], o64[k]) for k in keys}


def _key_files():
    """Every framediff_*.json in the fixture directory that carries a model config + key list."""
    out = []
    for p in sorted(official_fixtures_dir().glob("framediff_*.json")):
        try:
            spec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(spec, dict) and "model_config" in spec and "state_dict_keys" in spec:
            out.append(p)
    return out


KEY_FILES = _key_files()

SMALL = {
    "node_embed_size": 32, "edge_embed_size": 16,
    "embed": {"index_embed_size": 8, "num_bins": 22},
    "ipa": {"c_hidden": 16, "c_skip": 8, "no_heads": 2, "no_qk_points": 4, "no_v_points": 4,
            "seq_tfmr_num_heads": 2, "seq_tfmr_num_layers": 2, "num_blocks": 2},
}


@pytest.mark.parametrize("path", official_params(KEY_FILES, "framediff_*.json key lists", ids=lambda p: p.name))
def test_architecture_matches_official_key_list(path):
    """Built from the json's model_config: exactly the official keys, shapes and parameter count."""
    spec = json.loads(path.read_text())
    net = FrameDiffScoreNetwork(FrameDiffConfig.from_dict(spec["model_config"]))
    sd = net.state_dict()
    want = [(e["key"], tuple(e["shape"])) for e in spec["state_dict_keys"]]
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == want
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == spec["n_parameters"]
    if "n_state_dict_entries" in spec:
        assert len(sd) == spec["n_state_dict_entries"]
    for prefix, count in spec.get("n_parameters_by_module", {}).items():
        assert sum(v.numel() for k, v in sd.items() if k.startswith(prefix + ".")) == count, prefix


def test_paper_parameter_count_default_config():
    """The default config is the paper configuration (17,446,190 parameters)."""
    net = FrameDiffScoreNetwork(FrameDiffConfig())
    assert sum(p.numel() for p in net.parameters()) == 17_446_190


def _random_net(seed: int = 0, dtype=torch.float64) -> FrameDiffScoreNetwork:
    """Small network with every parameter perturbed (the official init zeroes many layers)."""
    g = torch.Generator().manual_seed(seed)
    net = FrameDiffScoreNetwork(FrameDiffConfig.from_dict(SMALL)).to(dtype)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                std = 0.3 / math.sqrt(p.shape[1])
            else:
                std = 0.1
            if "bb_update" in name:
                std /= 6
            p.add_(torch.randn(p.shape, generator=g, dtype=dtype) * std)
    return net.eval()


def _random_frames(b: int, n: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rot = so3_exp(torch.randn(b, n, 3, generator=g, dtype=dtype) * 1.5)
    trans = torch.randn(b, n, 3, generator=g, dtype=dtype) * 8.0
    return rot, trans


def test_padded_batch_equals_individual_runs_and_ignores_padding_content():
    """Lengths differing within a batch; padding filled with garbage must not matter."""
    net = _random_net()
    lengths = [5, 11, 8]
    n_max = max(lengths)
    rot, trans = _random_frames(len(lengths), n_max, seed=1)
    mask = torch.zeros(len(lengths), n_max, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    t = torch.tensor([0.9, 0.4, 0.05])
    seq_idx = torch.arange(1, n_max + 1)[None].expand(len(lengths), n_max) * mask.long()
    sc = trans + 0.5  # self-conditioning input with garbage in the padding too
    def run(m, dt):
        with torch.no_grad():
            return m(rotmat_to_quat(rot).to(dt), trans.to(dt), t, mask.to(dt), seq_idx=seq_idx, sc_ca=sc.to(dt))

    tol = _f64_tol(net, run)
    with torch.no_grad():
        batch = net(rotmat_to_quat(rot), trans, t, mask, seq_idx=seq_idx, sc_ca=sc)
        for i, n in enumerate(lengths):
            single = net(rotmat_to_quat(rot[i : i + 1, :n]), trans[i : i + 1, :n], t[i : i + 1],
                         mask[i : i + 1, :n], sc_ca=sc[i : i + 1, :n])
            for key in ("rotmats", "trans", "psi"):
                close(batch[key][i, :n], single[key][0], tol[key], f"padded vs single s{i} {key}")


def test_fully_padded_sample_is_finite():
    net = _random_net()
    rot, trans = _random_frames(2, 6, seed=2)
    mask = torch.ones(2, 6, dtype=torch.float64)
    mask[1] = 0
    with torch.no_grad():
        out = net(rotmat_to_quat(rot), trans, torch.tensor([0.5, 0.5]), mask)
    for v in out.values():
        assert torch.isfinite(v).all()


@pytest.mark.parametrize("self_cond", [False, True])
def test_se3_equivariance(self_cond):
    """Global rotation Q and shift s of the input frames: predicted frames transform alike,
    the rotation score (body frame) is invariant and the translation score rotates with Q."""
    net = _random_net(seed=3)
    b, n = 2, 9
    rot, trans = _random_frames(b, n, seed=4)
    mask = torch.ones(b, n, dtype=torch.float64)
    t = torch.tensor([0.7, 0.2])
    q_glob = so3_exp(torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64))
    shift = torch.tensor([5.0, -3.0, 12.0], dtype=torch.float64)
    sc = trans + torch.randn(b, n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) if self_cond else None
    sc2 = (sc @ q_glob.T + shift) if self_cond else None
    dcfg = SE3DiffuserConfig()
    rot2, trans2 = q_glob @ rot, trans @ q_glob.T + shift

    def run(m, dt):  # the moved input (the less favourable rounding: larger coordinates)
        with torch.no_grad():
            sc_in = None if sc2 is None else sc2.to(dt)
            return m(rotmat_to_quat(rot2).to(dt), trans2.to(dt), t, mask.to(dt), sc_ca=sc_in)

    tol = _f64_tol(net, run)
    with torch.no_grad():
        o1 = net(rotmat_to_quat(rot), trans, t, mask, sc_ca=sc)
        o2 = net(rotmat_to_quat(rot2), trans2, t, mask, sc_ca=sc2)
    # two evaluations (original and moved input), each within the bound, plus the float64 rounding of the motion
    close(o2["rotmats"], q_glob @ o1["rotmats"], 2 * tol["rotmats"], "equivariance rotmats")
    close(o2["trans"], o1["trans"] @ q_glob.T + shift, 2 * tol["trans"] + rounding_tol(F64, magnitude(o2["trans"]), 3),
          "equivariance trans")
    close(o2["psi"], o1["psi"], 2 * tol["psi"], "invariance psi")
    # scores (pure rotation so the uncentred translation score is comparable)
    with torch.no_grad():
        o3 = net(rotmat_to_quat(rot2), trans @ q_glob.T, t, mask, sc_ca=None if sc is None else sc @ q_glob.T)
    rs1 = official_rot_score(rotmat_to_quat(rot), o1["quats"], t, dcfg)
    rs3 = official_rot_score(rotmat_to_quat(rot2), o3["quats"], t, dcfg)
    # the score amplifies the rotation error (angle <= 2 max|dR|, two evaluations) by its Jacobian
    diff = SE3Diffuser(dcfg)
    qp = o1["quats"]
    v = quat_to_rotvec(quat_multiply(torch.cat([qp[..., :1], -qp[..., 1:]], -1) / (qp * qp).sum(-1, keepdim=True),
                                     rotmat_to_quat(rot)))
    close(rs3, rs1, rot_score_tol(diff, v, t, 2 * 2 * tol["rotmats"], F64), "rot score invariance")
    ts1 = official_trans_score(trans, o1["trans"], t, dcfg)
    ts3 = official_trans_score(trans @ q_glob.T, o3["trans"], t, dcfg)
    var = 1 - torch.exp(-diff.marginal_b_t(t.double())).min()
    close(ts3, ts1 @ q_glob.T, (2 * tol["trans"] * dcfg.coordinate_scaling + rounding_tol(F64, magnitude(ts1) * var))
          / var, "trans score equivariance")


def test_equivariance_float32_paper_size_smoke():
    """Paper-size network (random weights, float32) runs and is equivariant to float32 precision."""
    torch.manual_seed(0)
    net = FrameDiffScoreNetwork(FrameDiffConfig()).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                p.add_(torch.randn_like(p) * 0.3 / math.sqrt(p.shape[1]) / (6 if "bb_update" in name else 1))
    rot, trans = _random_frames(1, 12, seed=6, dtype=torch.float32)
    mask = torch.ones(1, 12)
    q_glob = so3_exp(torch.tensor([1.0, 0.5, -0.7]))
    import copy

    net64 = copy.deepcopy(net).double()
    with torch.no_grad():
        o1 = net(rotmat_to_quat(rot), trans, torch.tensor([0.5]), mask)
        o2 = net(rotmat_to_quat(q_glob @ rot), trans @ q_glob.T, torch.tensor([0.5]), mask)
        o1_64 = net64(rotmat_to_quat(rot).double(), trans.double(), torch.tensor([0.5]), mask.double())
        o2_64 = net64(rotmat_to_quat(q_glob @ rot).double(), (trans @ q_glob.T).double(), torch.tensor([0.5]),
                      mask.double())
    for key, moved in (("rotmats", lambda o: q_glob @ o), ("trans", lambda o: o @ q_glob.T)):
        # each run within 16 e of exact (docs/testing.md), plus the float32 rounding of the motion itself
        tol = C_MEASURED * (shadow_error(o1[key], o1_64[key]) + shadow_error(o2[key], o2_64[key]))
        close(o2[key], moved(o1[key]), tol + rounding_tol(F32, magnitude(o2[key]), 3), f"paper-size equivariance {key}")


def test_adapter_rotmats_and_quats_agree_and_state():
    net = _random_net(seed=7, dtype=torch.float32)
    model = FrameDiffAdapter(net)
    rot, trans = _random_frames(2, 7, seed=8, dtype=torch.float32)
    mask = torch.ones(2, 7)
    mask[0, 5:] = 0
    with torch.no_grad():
        a = model(rot, trans, 0.5, mask)
        b = model(None, trans, torch.tensor([0.5, 0.5]), mask, quats=rotmat_to_quat(rot))
        c = model(rot, trans, 0.5, mask, a.self_cond_state)
    torch.testing.assert_close(a.rotmats, b.rotmats)
    assert (a.self_cond_state[0, 5:] == 0).all()
    torch.testing.assert_close(a.self_cond_state[1], a.trans[1])
    assert not torch.allclose(c.trans, a.trans)  # self-conditioning changes the prediction
    assert a.backbone().shape == (2, 7, 4, 3)
    torch.testing.assert_close(quat_to_rotmat(a.quats), a.rotmats)
    rs, ts = model.official_scores(a, rot, trans, 0.5, mask)
    assert rs.shape == ts.shape == (2, 7, 3) and (rs[0, 5:] == 0).all()
    with pytest.raises(ValueError):
        model(None, trans, 0.5, mask)


@pytest.mark.parametrize("mode", ["autocast_bf16", "bf16_weights"])
def test_low_precision_runs(mode):
    """bf16 (autocast or bf16 weights): finite outputs; frames stay in float32 as official."""
    net = _random_net(seed=9, dtype=torch.float32)
    rot, trans = _random_frames(2, 10, seed=10, dtype=torch.float32)
    mask = torch.ones(2, 10)
    mask[0, 7:] = 0
    with torch.no_grad():
        if mode == "autocast_bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net(rotmat_to_quat(rot), trans, torch.tensor([0.3, 0.8]), mask, sc_ca=trans)
        else:
            out = net.to(torch.bfloat16)(rotmat_to_quat(rot), trans, torch.tensor([0.3, 0.8]), mask, sc_ca=trans)
    assert out["rotmats"].dtype == torch.float32 and out["trans"].dtype == torch.float32
    for v in out.values():
        assert torch.isfinite(v).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paper_size_batch_16x300_gpu(dtype):
    """Paper-size network, batch 16 x 300 residues, forward on CUDA (random weights)."""
    dev = torch.device("cuda")
    net = FrameDiffScoreNetwork(FrameDiffConfig()).to(dev).eval()
    rot, trans = _random_frames(16, 300, seed=11, dtype=torch.float32)
    rot, trans = rot.to(dev), trans.to(dev)
    mask = torch.ones(16, 300, device=dev)
    torch.backends.cuda.matmul.allow_tf32 = True
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = net(rotmat_to_quat(rot), trans, torch.rand(16, device=dev), mask)
    assert torch.isfinite(out["trans"]).all()
