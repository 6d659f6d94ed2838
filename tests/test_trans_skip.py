"""``model.ipa.trans_skip_t``: the output rule that shrinks the CA update of nearly clean inputs (off by default)."""
from __future__ import annotations

import copy

import pytest
import torch

from models.framediff.config import FrameDiffConfig
from models.framediff.network import FrameDiffScoreNetwork


def _tiny(skip: float = 0.0) -> FrameDiffConfig:
    cfg = FrameDiffConfig.from_dict({"node_embed_size": 16, "edge_embed_size": 8,
                                     "ipa": {"c_hidden": 8, "c_skip": 4, "no_heads": 2, "no_qk_points": 2,
                                             "no_v_points": 2, "num_blocks": 2, "trans_skip_t": skip}})
    return cfg


def _net(skip: float, seed: int) -> FrameDiffScoreNetwork:
    """A float64 network with every weight perturbed (the backbone update starts at zero, as official)."""
    torch.manual_seed(seed)
    net = FrameDiffScoreNetwork(_tiny(skip)).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def _inputs(b=3, n=10, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, 4, generator=g, dtype=dtype)
    q = q / q.norm(dim=-1, keepdim=True)
    trans = 5 * torch.randn(b, n, 3, generator=g, dtype=dtype)
    return q, trans


def test_official_dicts_leave_it_off_and_it_round_trips():
    assert FrameDiffConfig.from_dict({}).ipa.trans_skip_t == 0.0
    cfg = _tiny(0.03)
    assert cfg.ipa.trans_skip_t == 0.03
    assert FrameDiffConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("skip", [0.03, 0.5])
def test_update_scaled_by_sqrt_t_over_skip_below_it_and_unchanged_above(skip):
    off = _net(0.0, 0)
    on = FrameDiffScoreNetwork(_tiny(skip)).double().eval()
    on.load_state_dict(copy.deepcopy(off.state_dict()))
    q, trans = _inputs()
    t = torch.tensor([skip / 100, skip / 4, 2 * skip], dtype=torch.float64).clamp(max=1.0)
    mask = torch.ones(3, 10, dtype=torch.float64)
    with torch.no_grad():
        a, b = off(q, trans, t, mask), on(q, trans, t, mask)
    c = torch.clamp(t / skip, max=1.0).sqrt()[:, None, None]
    want = trans + c * (a["trans"] - trans)
    # the same float64 arithmetic plus one multiply-add: rounding of |trans| ~ 10 A
    assert torch.allclose(b["trans"], want, rtol=0, atol=1e-12)
    assert torch.equal(b["trans"][2], a["trans"][2])         # t >= skip: the official output
    assert torch.equal(b["quats"], a["quats"]) and torch.equal(b["psi"], a["psi"])   # rotations, psi untouched
    # the update really shrinks: at t = skip / 100 it is a tenth of the trunk's
    d_off, d_on = (a["trans"][0] - trans[0]).norm(), (b["trans"][0] - trans[0]).norm()
    assert d_off > 0 and torch.isclose(d_on / d_off, torch.tensor(0.1, dtype=torch.float64), rtol=1e-9)


def test_fixed_residues_stay_fixed():
    net = _net(0.05, 1)
    q, trans = _inputs(b=2, n=8)
    fixed = torch.zeros(2, 8, dtype=torch.float64)
    fixed[:, :3] = 1
    with torch.no_grad():
        out = net(q, trans, torch.tensor([0.01, 0.02], dtype=torch.float64), torch.ones(2, 8, dtype=torch.float64),
                  fixed_mask=fixed)
    assert torch.allclose(out["trans"][:, :3], trans[:, :3], rtol=0, atol=1e-12)
    assert not torch.allclose(out["trans"][:, 3:], trans[:, 3:])
