"""Refined self-state targets (models/framediff/self_state_targets.py) and their use by the loss and the script.

* on a tiny random network's own predictions (clashes and bonds all wrong), the refined targets have no CA clash
  and their CA-CA and C-N distances in the evaluation windows;
* a state with nothing to repair is returned bit for bit, and padding stays as it was;
* a state's target does not depend on the other states of its batch (order);
* the loss anchors to the targets when a pool has them; the pool loader checks them; the script writes them.
"""
from __future__ import annotations

import pytest
import torch

from models.framediff.self_state_targets import refine_targets, target_stats
from models.framediff.self_states import load_pool, pool_batch, save_pool, self_state_loss
from test_self_states import EXP, pool, run_collect, tiny, tiny_ckpt  # noqa: F401  (module fixtures)


def _real_states(t: float) -> dict[str, torch.Tensor]:
    """The shipped test chains (every one, its first 60 residues), shrunk by 30 % about their centroid and jittered:
    CA-CA links of ~2.7 A, C-N bonds off, far CA pairs pressed into clashes -- the faults of a model's prediction,
    made larger."""
    from conftest import real_chain_files
    from superdiff_protein.frames.geometry import frames_from_backbone
    from superdiff_protein.runs.structures import read_backbone

    g = torch.Generator().manual_seed(0)
    rows = []
    for f in real_chain_files("spread"):
        a = torch.as_tensor(read_backbone(f).coords, dtype=torch.float64)[:60]
        a = a[torch.isfinite(a).all(-1).all(-1)]
        r, x = frames_from_backbone(a[:, 0], a[:, 1], a[:, 2])
        x = (x - x.mean(0)) * 0.7 + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)
        rows.append((r.float(), x.float()))
    n = max(x.shape[0] for _, x in rows)
    S = len(rows)
    pool = {"pred_rot": torch.eye(3).expand(S, n, 3, 3).clone(), "pred_trans": torch.zeros(S, n, 3),
            "mask": torch.zeros(S, n), "t": torch.full((S,), t), "lengths": torch.zeros(S, dtype=torch.long)}
    for k, (r, x) in enumerate(rows):
        L = x.shape[0]
        pool["pred_rot"][k, :L], pool["pred_trans"][k, :L], pool["mask"][k, :L] = r, x, 1
        pool["lengths"][k] = L
    return pool


def test_targets_repair_clashes_and_bonds():
    pool = _real_states(0.05)
    before = target_stats(pool)
    tg = refine_targets(pool, steps=300)
    after = target_stats(dict(pool, **tg), rot_key="target_rot", trans_key="target_trans")
    # the inputs are far from protein geometry, so the test is not vacuous
    assert before["clashed"] > 0.5 and before["ca_ca_in_window"] < 0.5
    # penalty weight 100 on squared violations: a residual violation is ~ anchor pull / 200, well under the 0.1 A
    # between the refinement windows (3.7-3.9, 1.28-1.38) and the evaluation ones (3.6-4.0, 1.229-1.429)
    assert after["clashed"] == 0.0
    assert after["ca_ca_in_window"] >= 0.95 and after["c_n_in_window"] >= 0.95
    m = pool["mask"].bool()
    assert bool(torch.isfinite(tg["target_trans"]).all()) and bool(torch.isfinite(tg["target_rot"]).all())
    # padding is untouched
    assert torch.equal(tg["target_trans"][~m], pool["pred_trans"][~m].float())
    # the targets are rotations
    r = tg["target_rot"][m].double()
    eye = torch.eye(3, dtype=torch.float64).expand_as(r)
    assert torch.allclose(r @ r.transpose(-1, -2), eye, atol=1e-5)
    assert bool((torch.linalg.det(r) > 0).all())
    # states above geometry_t_max only lose their clashes: bonds are not asked for there
    hi = refine_targets(dict(pool, t=torch.full_like(pool["t"], 0.3)), steps=300)
    hi_st = target_stats(dict(pool, **hi, t=torch.zeros_like(pool["t"])), rot_key="target_rot",
                         trans_key="target_trans")
    assert hi_st["clashed"] == 0.0 and hi_st["ca_ca_in_window"] < 0.5


def _straight_state(n: int, t: float) -> dict[str, torch.Tensor]:
    x = torch.zeros(1, n, 3)
    x[0, :, 0] = torch.arange(n) * 3.8
    g = torch.Generator().manual_seed(n)
    q = torch.randn(1, n, 4, generator=g)
    from superdiff_protein.frames.geometry import quat_to_rotmat
    r = quat_to_rotmat(q / q.norm(dim=-1, keepdim=True))
    return {"pred_trans": x, "pred_rot": r, "mask": torch.ones(1, n), "t": torch.tensor([t]),
            "lengths": torch.tensor([n])}


def test_nothing_to_repair_is_left_as_is():
    # a straight chain 3.8 A per link has no CA or backbone-atom clash; at t above geometry_t_max its (random)
    # peptide geometry is not asked for, so every gradient is exactly zero and Adam never moves
    s = _straight_state(10, 0.4)
    tg = refine_targets(s, steps=50)
    assert torch.equal(tg["target_trans"], s["pred_trans"]) and torch.equal(tg["target_rot"], s["pred_rot"])
    # at small t the random rotations' C-N distances are repaired, so the frames move
    s = _straight_state(10, 0.05)
    tg = refine_targets(s, steps=50)
    assert not torch.equal(tg["target_rot"], s["pred_rot"])


def test_a_states_target_does_not_depend_on_its_batch(pool):  # noqa: F811
    S = pool["t"].shape[0]
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(1))
    a = refine_targets(pool, steps=40)
    b = refine_targets({k: v[perm] for k, v in pool.items()}, steps=40)
    # element-wise Adam, per-state energies: the same float32 arithmetic per state, up to the summation order of
    # the batched reductions (a few ulp of ~10 A coordinates per step)
    for k in a:
        assert torch.allclose(a[k][perm], b[k], atol=1e-4, rtol=0), k


def test_loss_anchors_to_targets(pool, tmp_path):  # noqa: F811
    tg = refine_targets(pool, steps=20)
    full = dict(pool, **tg)
    save_pool(full, tmp_path / "p.pt")
    back = load_pool(tmp_path / "p.pt")
    assert torch.equal(back["target_trans"], full["target_trans"])
    b = pool_batch(back, torch.arange(4), torch.device("cpu"))
    assert "target_rot" in b and b["target_trans"].shape == b["pred_trans"].shape
    on_target = self_state_loss(b["target_rot"], b["target_trans"], b, EXP)
    on_pred = self_state_loss(b["pred_rot"], b["pred_trans"], b, EXP)
    assert float(on_target["anchor"].abs().max()) < 1e-6
    # the anchor of the recorded prediction is its distance to the target: zero exactly where nothing moved
    moved = ((b["target_trans"] != b["pred_trans"]).flatten(1).any(1)
             | (b["target_rot"] != b["pred_rot"]).flatten(1).any(1))
    assert bool(moved.any()) and bool((on_pred["anchor"] > 0).eq(moved).all())
    half = {k: v for k, v in full.items() if k != "target_rot"}
    save_pool(half, tmp_path / "half.pt")
    with pytest.raises(ValueError, match="needs both"):
        load_pool(tmp_path / "half.pt")


def test_script_refines(tiny_ckpt, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "pool.pt"
    assert run_collect(tiny_ckpt, out, "--refine", "--refine-steps", "5") == 0
    assert set(load_pool(out)) >= {"target_rot", "target_trans"}
    assert "refined targets" in capsys.readouterr().out
    assert run_collect(tiny_ckpt, out, "--refine-steps", "0") == 2
