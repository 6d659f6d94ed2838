"""Training on the model's own sampled states (models/framediff/self_states.py, models/self_state_pool.py and
scripts/collect_self_states.py).

* the pool holds what the sampler fed the network and what the network answered: re-running the network on a
  pool state's recorded input (frames, t, self-conditioning) gives the recorded prediction; every state has
  ``t <= t_max``; collection is deterministic; the pool round-trips through the allow-listed loader;
* the loss is zero at a clash-free reference, its clash term counts exactly the overlapping pairs, and a gradient
  step pushes an overlapping pair apart; padding does not change it;
* training with a pool logs the self-state terms; bad configurations and bad script input fail cleanly.
"""
from __future__ import annotations

import math

import pytest
import torch

from models.framediff.adapter import FrameDiffAdapter
from models.framediff.checkpointing import export_official_checkpoint
from models.framediff.self_states import (POOL_KEYS, load_pool, pool_batch, radius_of_gyration, save_pool,
                                         self_state_loss)
from models.self_state_pool import collect_self_states
from models.framediff.training import build_network
from script_loader import load_script
from test_pdb_io import pdownb_chain_dir  # noqa: F401  (session fixture)
from test_train import _cfg, _rows, dataset  # noqa: F401  (module fixture: a few real chains)
from superdiff_protein.cli import train as T
from superdiff_protein.frames.se3 import SE3DiffuserConfig

EXP = {"clash_dist": 3.8, "clash_min_sep": 3, "self_state_clash_weight": 8.0, "self_state_bond_weight": 4.0}


@pytest.fixture(scope="module")
def tiny():
    cfg = T.finalize_config(T.compose_config(["model=tiny"]))
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    return cfg, FrameDiffAdapter(net, SE3DiffuserConfig.from_conf(cfg))


@pytest.fixture(scope="module")
def pool(tiny):
    return collect_self_states(tiny[1], [9, 14], 2, seed=3, num_steps=8, t_max=0.5, batch_size=3)


def test_pool_states_are_the_networks_inputs_and_outputs(tiny, pool):
    _, ad = tiny
    S = pool["t"].shape[0]
    assert set(POOL_KEYS) <= set(pool) and pool["mask"].shape == (S, 14)
    assert bool((pool["t"] <= 0.5).all()) and bool((pool["t"] > 0).all())
    assert sorted(set(pool["lengths"].tolist())) == [9, 14]
    assert pool["mask"].sum(1).long().tolist() == pool["lengths"].tolist()
    # the recorded prediction is the network's answer to the recorded input (self-conditioning included):
    # float32 network, inputs of a few tens of Angstrom, so agreement to ~1e-4 A (batch composition differs)
    with torch.no_grad():
        for L in (9, 14):
            sel = pool["lengths"] == L
            b = {k: v[sel][:, :L] if v.ndim > 1 else v[sel] for k, v in pool.items()}
            out = ad(b["rot_t"], b["trans_t"], b["t"], b["mask"], b["sc"])
            scale = float(b["pred_trans"].abs().max())
            assert torch.allclose(out.trans, b["pred_trans"], atol=1e-5 * max(scale, 1.0) * 10, rtol=0)
            assert torch.allclose(out.rotmats, b["pred_rot"], atol=1e-4, rtol=0)
    # the first state of each trajectory is at the grid's first t <= 0.5; its self-conditioning is the previous
    # prediction, so it is not zero
    assert float(pool["sc"].abs().sum((1, 2)).min()) > 0


def test_collection_is_deterministic_and_keep_subsamples(tiny, pool):
    again = collect_self_states(tiny[1], [9, 14], 2, seed=3, num_steps=8, t_max=0.5, batch_size=3)
    assert all(torch.equal(pool[k], again[k]) for k in pool)
    few = collect_self_states(tiny[1], [9], 2, seed=3, num_steps=8, t_max=0.5, keep_per_trajectory=2)
    assert few["t"].shape[0] == 4


def test_pool_round_trip_and_bad_files(pool, tmp_path):
    save_pool(pool, tmp_path / "p.pt", {"note": "x"})
    back = load_pool(tmp_path / "p.pt")
    assert all(torch.equal(pool[k], back[k]) for k in pool)
    torch.save({"pool": {"t": torch.zeros(3)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a self-state pool"):
        load_pool(tmp_path / "bad.pt")
    broken = dict(pool, sc=pool["sc"][:, :3])
    save_pool(broken, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="sc has shape"):
        load_pool(tmp_path / "shape.pt")


def _line(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(1, n, 3, dtype=torch.float64)
    x[0, :, 0] = torch.arange(n) * 3.8
    return x, torch.eye(3, dtype=torch.float64).expand(1, n, 3, 3).clone()


def test_loss_zero_at_clash_free_reference_and_counts_overlaps():
    x, R = _line()
    b = {"mask": torch.ones(1, 12), "pred_trans": x.clone(), "pred_rot": R.clone()}
    out = self_state_loss(R, x, b, EXP)
    assert float(out["loss"]) == 0.0
    # residue 10 onto residue 2 (|i - j| = 8), 2.0 A away: only pairs within 3.8 A of the moved CA count
    y = x.clone()
    y[0, 10] = x[0, 2] + torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64)
    out = self_state_loss(R, y, b, EXP)
    d = torch.cdist(y[0], y[0])
    idx = torch.arange(12)
    far = (idx[:, None] - idx[None, :]).abs() >= 3
    pen = (torch.relu(3.8 - d) ** 2 * far).sum() / 2 / 12 * 8.0
    assert float(out["clash"]) == pytest.approx(float(pen), rel=1e-6)
    assert float(out["clash"]) > 0
    anchor = ((y - x) ** 2).sum() / 12
    assert float(out["anchor"]) == pytest.approx(float(anchor), rel=1e-6)


def test_gradient_pushes_an_overlapping_pair_apart():
    x, R = _line()
    y = x.clone()
    y[0, 10] = x[0, 2] + torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64)
    b = {"mask": torch.ones(1, 12), "pred_trans": y.clone(), "pred_rot": R.clone()}   # reference clashes
    p = y.clone().requires_grad_(True)
    self_state_loss(R, p, b, EXP)["loss"].sum().backward()
    q = y - 0.01 * p.grad
    assert float((q[0, 10] - q[0, 2]).norm()) > float((y[0, 10] - y[0, 2]).norm())


def test_padding_does_not_change_the_loss():
    x, R = _line(10)
    y = x.clone()
    y[0, 8] = x[0, 1] + torch.tensor([0.0, 1.5, 0.0], dtype=torch.float64)
    ref = {"mask": torch.ones(1, 10), "pred_trans": x, "pred_rot": R}
    a = self_state_loss(R, y, ref, EXP)
    pad = lambda v, fill: torch.cat([v, fill.expand(1, 5, *v.shape[2:])], 1)   # noqa: E731
    z3, eye = torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    refp = {"mask": torch.cat([ref["mask"], torch.zeros(1, 5)], 1), "pred_trans": pad(x, z3), "pred_rot": pad(R, eye)}
    b = self_state_loss(pad(R, eye), pad(y, z3), refp, EXP)
    for k in a:
        assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-12, abs=1e-12)


RG = dict(EXP, self_state_rg_weight=2.0, self_state_rg_ref=[2.69, 0.344], self_state_rg_margin=0.1)


def test_rg_term_is_off_by_default():
    x, R = _line()
    b = {"mask": torch.ones(1, 12), "pred_trans": x.clone(), "pred_rot": R.clone()}
    out = self_state_loss(R, x, b, EXP)
    assert "rg" not in out and set(out) == {"loss", "anchor", "clash", "bond"}


def test_rg_term_matches_the_closed_form_of_a_straight_chain():
    # n CAs 3.8 A apart on a line: Rg = 3.8 sqrt((n^2 - 1) / 12); cap = 1.1 * 2.69 * n^0.344
    for n in (12, 40):
        x, R = _line(n)
        b = {"mask": torch.ones(1, n), "pred_trans": x.clone(), "pred_rot": R.clone()}
        out = self_state_loss(R, x, b, RG)
        rg = 3.8 * math.sqrt((n * n - 1) / 12)
        want = 2.0 * max(0.0, rg - 1.1 * 2.69 * n ** 0.344) ** 2
        assert want > 0
        # float32 arithmetic on coordinates up to 3.8 n A: relative error a few ulp of rg, squared difference
        assert float(out["rg"]) == pytest.approx(want, rel=1e-5)
        assert float(out["loss"]) == pytest.approx(float(out["anchor"] + out["clash"] + out["bond"] + out["rg"]))
        assert float(radius_of_gyration(x, torch.ones(1, n))) == pytest.approx(rg, rel=1e-6)


def test_rg_term_is_zero_for_a_compact_chain_and_pulls_a_loose_one_in():
    g = torch.Generator().manual_seed(0)
    n = 60
    compact = torch.randn(1, n, 3, generator=g, dtype=torch.float64) * 5.0     # Rg about 8.7 A < 2.69 * 60^0.344
    R = torch.eye(3, dtype=torch.float64).expand(1, n, 3, 3).clone()
    b = {"mask": torch.ones(1, n), "pred_trans": compact, "pred_rot": R}
    assert float(self_state_loss(R, compact, b, RG)["rg"]) == 0.0
    loose = (compact * 3.0).requires_grad_(True)
    self_state_loss(R, loose, {**b, "pred_trans": loose.detach()}, RG)["rg"].sum().backward()
    m = torch.ones(1, n)
    step = loose.detach() - 0.01 * loose.grad
    assert float(radius_of_gyration(step, m)) < float(radius_of_gyration(loose.detach(), m))


def test_rg_term_ignores_padding():
    x, R = _line(10)
    ref = {"mask": torch.ones(1, 10), "pred_trans": x, "pred_rot": R}
    a = self_state_loss(R, x * 1.5, ref, RG)
    z3, eye = torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    pad = lambda v, fill: torch.cat([v, fill.expand(1, 5, *v.shape[2:])], 1)   # noqa: E731
    refp = {"mask": torch.cat([ref["mask"], torch.zeros(1, 5)], 1), "pred_trans": pad(x, z3), "pred_rot": pad(R, eye)}
    b = self_state_loss(pad(R, eye), pad(x * 1.5, z3 + 100.0), refp, RG)
    assert float(a["rg"]) > 0
    assert float(a["rg"]) == pytest.approx(float(b["rg"]), rel=1e-6)


def test_config_refuses_a_bad_rg_setting():
    for bad in ("experiment.self_state_rg_weight=-1", "experiment.self_state_rg_margin=-0.5",
                "experiment.self_state_rg_ref=[2.69]", "experiment.self_state_rg_ref=[0,0.3]"):
        with pytest.raises(T.TrainError, match="self_state_rg"):
            T.finalize_config(T.compose_config(["model=tiny", bad]))


def test_pool_batch_crops_to_longest(pool):
    idx = torch.nonzero(pool["lengths"] == 9).flatten()[:3]
    b = pool_batch(pool, idx, torch.device("cpu"))
    assert b["trans_t"].shape == (3, 9, 3) and b["t"].shape == (3,)


def test_training_with_a_pool_logs_the_terms(pool, dataset, tmp_path):
    save_pool(pool, tmp_path / "pool.pt")
    cfg = _cfg(dataset, tmp_path / "run", "max_steps=10", "experiment.self_state_weight=1.0",
               f"experiment.self_state_path={tmp_path / 'pool.pt'}", "experiment.self_state_batch=4",
               # a reference small enough that the tiny chains (9-14 residues) are all above it: the term is on
               "experiment.self_state_rg_weight=0.5", "experiment.self_state_rg_ref=[0.5,0.3]")
    T.train(cfg)
    rows = [r for r in _rows(tmp_path / "run") if r.get("self_loss")]
    assert len(rows) == 2
    for r in rows:
        assert float(r["self_rg"]) > 0
        parts = float(r["self_anchor"]) + float(r["self_clash"]) + float(r["self_bond"]) + float(r["self_rg"])
        assert math.isfinite(float(r["self_loss"])) and float(r["self_loss"]) == pytest.approx(parts, rel=1e-5)
        assert float(r["loss"]) >= float(r["self_loss"]) - 1e-6     # the total includes the weighted term
    # the loss curves get a third panel for the self-state terms
    from models.framediff.metrics import plot_metrics
    png = tmp_path / "curves.png"
    if plot_metrics(tmp_path / "run" / "metrics.csv", png):
        from PIL import Image
        w, h = Image.open(png).size
        assert w / h > 3.5          # three 5.5 x 4 inch panels (two would be 11 x 4)


def test_config_refuses_a_weight_without_a_pool(tmp_path):
    with pytest.raises(T.TrainError, match="self_state_path"):
        T.finalize_config(T.compose_config(["model=tiny", "experiment.self_state_weight=1.0"]))
    with pytest.raises(T.TrainError, match="self_state_weight"):
        T.finalize_config(T.compose_config(["model=tiny", "experiment.self_state_weight=-1.0"]))


@pytest.fixture(scope="module")
def tiny_ckpt(tiny, tmp_path_factory):
    """The tiny network as an official model.pth."""
    cfg, ad = tiny
    ck = tmp_path_factory.mktemp("tiny_ckpt") / "tiny.pth"
    export_official_checkpoint(ad.network.state_dict(), cfg, ck, step=0)
    return ck


def run_collect(ck, out, *extra: str) -> int:
    """scripts/collect_self_states.py on 2 chains of 8 residues, 6 steps, 3 states kept per chain, on the CPU."""
    return load_script("collect_self_states").main(
        [str(ck), str(out), "--lengths", "8", "--per-length", "2", "--keep", "3", "--steps", "6", *extra,
         "--device", "cpu"])


def test_script_writes_a_pool_and_refuses_bad_input(tiny_ckpt, tmp_path, capsys):
    mod = load_script("collect_self_states")
    ck, out = tiny_ckpt, tmp_path / "pool.pt"
    rc = run_collect(ck, out)
    assert rc == 0 and load_pool(out)["t"].shape[0] == 6
    assert "states of 2 trajectories" in capsys.readouterr().out
    assert mod.main([str(tmp_path / "missing.pth"), str(out), "--device", "cpu"]) == 2
    assert mod.main([str(ck), str(tmp_path / "no" / "pool.pt"), "--device", "cpu"]) == 2
    assert mod.main([str(ck), str(out), "--per-length", "0", "--device", "cpu"]) == 2
    assert "error:" in capsys.readouterr().err
