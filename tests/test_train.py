"""Tests of FrameDiff training: the command line ``superdiff_protein.cli.train`` (``train_frame_model``) and the
training code next to the network in ``models/framediff/`` (losses, LightningModule, DataModule, fit).

A tiny FrameDiff model is trained for a few dozen steps on a few real PDownB chains (the prepared
``.gpu_data/pdownb.pt`` when present, else a dataset built here from a few archive members):

* the fixed-noise evaluation loss falls and the training loss falls (first vs last rows);
* ``model.pth`` is an official FrameDiff container that the SAFE loader reads (no trust flag)
  into a ``FrameDiffAdapter`` of the configured size, holding the EMA weights, with finite outputs;
* a run stopped at step 40 and resumed to 60 equals an uninterrupted 60-step run bit for bit
  (weights, EMA, metrics), and the step count continues;
* ``max_minutes`` stops cleanly with a saved checkpoint;
* the loss itself: zero for a perfect prediction, positive otherwise, t gates as official;
* Hydra composes the config (group selection, new keys, refusals);
* the training path runs with biotite unavailable (the GPU machine has none; Hydra and OmegaConf are
  dependencies and travel there as wheels, scripts/train_defaults.sh).
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from test_pdb_io import pdownb_chain_dir  # noqa: F401  (session fixture)

from models.framediff import losses as L
from superdiff_protein.cli import train as T

N_CHAINS = 8
STEPS, STOP = 40, 25  # uninterrupted run length; the interrupted run stops at STOP and resumes
TINY = ["model=tiny", "data.max_length=40", "data.batch_size=4", "experiment.log_every=5",
        "experiment.eval_every=10", "experiment.eval_size=4", "experiment.learning_rate=0.002",
        "experiment.ckpt_every_steps=1000", "experiment.ema_decay=0.9", "trainer.accelerator=cpu",
        "trainer.tensorboard=false", "trainer.num_threads=1"]


@pytest.fixture(scope="module")
def dataset(request, tmp_path_factory) -> tuple[str, list[int] | None]:
    """(dataset file, chain subset): a few real chains."""
    prepared = REPO / ".gpu_data" / "pdownb.pt"
    if prepared.is_file():
        d = torch.load(prepared, weights_only=True)
        helix = d["splits"]["ss"]["helix"].tolist()
        return str(prepared), [int(i) for i in helix[:N_CHAINS]]
    from superdiff_protein.frames.data import prepare_dataset

    chain_dir = request.getfixturevalue("pdownb_chain_dir")
    out = tmp_path_factory.mktemp("train_ds") / "tiny.pt"
    prepare_dataset(chain_dir, out, progress=False, min_length=30)
    return str(out), None


def _cfg(dataset, out_dir: Path, *extra: str) -> dict:
    cfg = T.compose_config([*TINY, f"out_dir={out_dir}", f"data.path={dataset[0]}", *extra])
    cfg["data"]["subset"] = dataset[1]
    return cfg


def _rows(out_dir: Path) -> list[dict]:
    with open(out_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _col(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory) -> dict:
    """An uninterrupted STEPS-step run and a run stopped at STOP, resumed to STEPS."""
    base = tmp_path_factory.mktemp("train_runs")
    full, part = base / "full", base / "part"
    s_full = T.train(_cfg(dataset, full, f"max_steps={STEPS}"))
    s_part1 = T.train(_cfg(dataset, part, f"max_steps={STOP}"))
    s_part2 = T.train(_cfg(dataset, part, f"max_steps={STEPS}", "resume=true"))
    return {"full": full, "part": part, "s_full": s_full, "s_part1": s_part1, "s_part2": s_part2}


def test_output_layout(runs):
    for d in (runs["full"], runs["part"]):
        for name in ("last.ckpt", "model.pth", "metrics.csv", "config.yaml", "loss_curve.png"):
            assert (d / name).is_file(), name
        assert not list(d.glob("*.tmp")) and not list(d.glob(".*.tmp"))


def test_loss_falls(runs):
    rows = _rows(runs["full"])
    ev = _col(rows, "eval_ema_loss")
    raw = _col(rows, "eval_loss")
    assert ev[0][0] == 0 and ev[-1][0] == STEPS
    # fixed noise, fixed t grid: a clean measurement; the tiny model must improve clearly
    assert raw[-1][1] < 0.8 * raw[0][1], raw
    assert ev[-1][1] < ev[0][1], ev
    tr = [v for _, v in _col(rows, "loss")]
    assert len(tr) >= 6 and all(np.isfinite(tr))
    # (no first-vs-last comparison of training losses: t is drawn per batch, so a few of them are
    # too noisy to rank on another dataset; the fixed-noise eval loss above is the measurement)
    for key in ("rot_loss", "trans_loss", "bb_atom_loss", "dist_mat_loss", "grad_norm", "lr"):
        vals = [v for _, v in _col(rows, key)]
        assert vals and all(np.isfinite(vals)), key


def test_resume_continues_exactly(runs):
    assert runs["s_part1"]["step"] == STOP
    assert runs["s_part2"]["start_step"] == STOP and runs["s_part2"]["step"] == STEPS
    a = torch.load(runs["full"] / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(runs["part"] / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k  # model AND ema weights
    ra, rb = _rows(runs["full"]), _rows(runs["part"])
    for key in ("loss", "eval_loss", "eval_ema_loss"):
        assert _col(ra, key) == _col(rb, key), key
    # no duplicated steps in the resumed metrics
    steps = [s for s, _ in _col(rb, "loss")]
    assert steps == sorted(set(steps))
    assert b["superdiff_train_seconds"] > 0


def test_model_pth_is_official_container_and_loads_safely(runs):
    from omegaconf import DictConfig

    from models.framediff import FrameDiffAdapter
    from superdiff_protein.frames.checkpoints import load_checkpoint_file

    path = runs["full"] / "model.pth"
    raw = load_checkpoint_file(path)  # safe loader, no trust flag
    assert set(raw) == {"model", "conf", "optimizer", "epoch", "step"}
    assert isinstance(raw["conf"], DictConfig)
    assert raw["step"] == STEPS
    cfg = _cfg(("x", None), runs["full"])
    assert raw["conf"]["model"]["node_embed_size"] == cfg["model"]["node_embed_size"]
    assert raw["conf"]["model"]["ipa"]["c_s"] == cfg["model"]["node_embed_size"]
    assert raw["conf"]["diffuser"]["so3"]["max_sigma"] == 1.5
    # EMA weights exported (default experiment.export_weights=ema)
    ck = torch.load(runs["full"] / "last.ckpt", map_location="cpu", weights_only=True)
    for k, v in raw["model"].items():
        assert torch.equal(v, ck["state_dict"]["ema." + k]), k
    assert not all(torch.equal(ck["state_dict"]["ema." + k], ck["state_dict"]["model." + k]) for k in raw["model"])

    model = FrameDiffAdapter.from_checkpoint(path)  # the allow-listed loader
    assert model.config.node_embed_size == cfg["model"]["node_embed_size"]
    assert model.config.ipa.num_blocks == cfg["model"]["ipa"]["num_blocks"]
    from superdiff_protein.frames.geometry import so3_exp

    g = torch.Generator().manual_seed(0)
    b, n = 2, 17
    rot = so3_exp(torch.randn(b, n, 3, generator=g))
    tr = torch.randn(b, n, 3, generator=g) * 10
    mask = torch.ones(b, n)
    mask[1, 12:] = 0
    with torch.no_grad():
        out = model(rot, tr, torch.tensor([0.3, 0.8]), mask)
        out2 = model(rot, tr, torch.tensor([0.3, 0.8]), mask, out.self_cond_state)
    for x in (out.rotmats, out.trans, out.psi, out2.trans):
        assert torch.isfinite(x).all()

    # the CLI export (last.ckpt -> model.pth) writes the same weights
    exp = runs["full"] / "exported_raw.pth"
    T.main(["export", str(runs["full"] / "last.ckpt"), str(exp), "raw"])
    raw2 = load_checkpoint_file(exp)
    for k, v in raw2["model"].items():
        assert torch.equal(v, ck["state_dict"]["model." + k])


def test_max_minutes_stops_and_saves(dataset, tmp_path):
    s = T.train(_cfg(dataset, tmp_path / "budget", "max_steps=100000", "max_minutes=0.02",
                     "experiment.eval_every=0"))
    assert s["stopped_for_time"] and not s["done"]
    assert 1 <= s["step"] < 100000
    ck = torch.load(tmp_path / "budget" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == s["step"]
    assert (tmp_path / "budget" / "model.pth").is_file()


def test_refuses_to_clobber_and_checks_resume_config(dataset, runs, tmp_path):
    with pytest.raises(T.TrainError, match="resume=true"):
        T.train(_cfg(dataset, runs["full"], f"max_steps={STEPS}"))
    with pytest.raises(T.TrainError, match="model"):
        T.train(_cfg(dataset, runs["full"], f"max_steps={STEPS + 10}", "resume=true", "model.ipa.num_blocks=3"))
    # finished runs return at once
    s = T.train(_cfg(dataset, runs["full"], f"max_steps={STEPS}", "resume=true"))
    assert s["done"] and s["step"] == STEPS


def test_init_from_fine_tunes_from_a_model_pth(dataset, runs, tmp_path):
    """init_from starts a fresh run (step 0, new optimizer) from another run's exported weights."""
    from models.framediff.checkpointing import read_lightning_checkpoint

    src = runs["full"] / "model.pth"
    out = tmp_path / "ft"
    s = T.train(_cfg(dataset, out, "max_steps=1", f"init_from={src}"))
    assert s["start_step"] == 0 and s["step"] == 1
    rows = _rows(out)
    ev0 = dict(_col(rows, "eval_ema_loss"))[0]
    # step 0's fixed-noise eval of the fine-tuned run is the source run's final EMA eval (same weights,
    # same batch, same noise): equal to float32 rounding of the same arithmetic
    src_last = _col(_rows(runs["full"]), "eval_ema_loss")[-1][1]
    assert abs(ev0 - src_last) <= 1e-5 * abs(src_last), (ev0, src_last)
    # a fresh run from scratch starts elsewhere
    scratch0 = _col(_rows(runs["full"]), "eval_ema_loss")[0][1]
    assert abs(ev0 - scratch0) > 1e-3 * abs(scratch0)
    # resuming ignores init_from (the weights live in last.ckpt)
    s2 = T.train(_cfg(dataset, out, "max_steps=2", "resume=true", f"init_from={src}"))
    assert s2["start_step"] == 1 and s2["step"] == 2
    assert read_lightning_checkpoint(out / "last.ckpt")["superdiff_config"]["init_from"] == str(src)


def test_init_from_refuses_bad_sources(dataset, runs, tmp_path):
    with pytest.raises(T.TrainError, match="init_from: .*not a file"):
        T.train(_cfg(dataset, tmp_path / "a", "max_steps=1", f"init_from={tmp_path / 'missing.pth'}"))
    with pytest.raises(T.TrainError, match="architecture"):
        T.train(_cfg(dataset, tmp_path / "b", "max_steps=1", f"init_from={runs['full'] / 'model.pth'}",
                     "model.ipa.num_blocks=3"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(T.TrainError, match="init_from"):
        T.train(_cfg(dataset, tmp_path / "c", "max_steps=1", f"init_from={junk}"))
    # nothing was written for refused runs
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def _fake_batch(b=3, n=12, seed=0):
    from superdiff_protein.frames.geometry import backbone_atoms_from_frames, so3_exp

    g = torch.Generator().manual_seed(seed)
    rot = so3_exp(torch.randn(b, n, 3, generator=g))
    trans = torch.randn(b, n, 3, generator=g) * 8
    psi = torch.nn.functional.normalize(torch.randn(b, n, 2, generator=g), dim=-1)
    mask = torch.ones(b, n)
    if b > 2:
        mask[2, 9:] = 0
    return rot, trans, psi, mask, backbone_atoms_from_frames(rot, trans, psi)


def test_framediff_loss_zero_for_perfect_prediction_and_gates():
    from superdiff_protein.frames.se3 import SE3Diffuser

    cfg = T.compose_config(["model=tiny"])
    exp = dict(cfg["experiment"])
    d = SE3Diffuser.from_conf(cfg)
    rot, trans, psi, mask, _ = _fake_batch()
    g = torch.Generator().manual_seed(1)
    gt = {"rotmats": rot, "trans": trans, "psi": psi, "psi_mask": mask.bool()}
    for tv in (0.05, 0.15, 0.5, 0.95):
        t = torch.full((3,), tv)
        noised = d.forward_marginal(rot, trans, t, mask, generator=g)
        prs, pts = d.scores_from_prediction(noised.rotmats_t, noised.trans_t, rot, trans, t, mask)
        out = L.framediff_loss(rot, trans, psi, prs.float(), pts.float(), gt, noised, t, mask, exp)
        for k, v in out.items():
            assert v.shape == (3,)
            assert float(v.abs().max()) < 2e-3, (tv, k, v)
        # a wrong prediction costs; aux losses only below their t filter (0.25), angle loss above 0.2
        wrong_t = trans + 1.0
        wrong_r = rot @ T_small_rot()
        prs2, pts2 = d.scores_from_prediction(noised.rotmats_t, noised.trans_t, wrong_r, wrong_t, t, mask)
        out2 = L.framediff_loss(wrong_r, wrong_t, psi, prs2.float(), pts2.float(), gt, noised, t, mask, exp)
        assert (out2["trans_loss"] > 1e-3).all()
        assert (out2["rot_loss"] > 1e-4).all()
        assert bool((out2["bb_atom_loss"] > 0).all()) == (tv < 0.25)
        assert bool((out2["dist_mat_loss"] >= 0).all())
        no_aux = L.framediff_loss(wrong_r, wrong_t, psi, prs2.float(), pts2.float(), gt, noised, t, mask,
                                  dict(exp, aux_loss=False))
        assert float(no_aux["bb_atom_loss"].abs().sum()) == 0.0
        assert torch.allclose(no_aux["loss"], out2["rot_loss"] + out2["trans_loss"])


def test_small_t_weight_cap_scales_the_x0_terms_by_capped_inverse_variance():
    """``small_t_weight_cap = c`` multiplies the x0 translation, backbone-atom and distance losses of each chain by
    ``min(c, 1 / sigma_t^2)`` (``trans_score_scaling^2``) and leaves the rotation loss alone; null is official."""
    from superdiff_protein.frames.se3 import SE3Diffuser

    cfg = T.compose_config(["model=tiny"])
    exp = dict(cfg["experiment"])
    assert exp["small_t_weight_cap"] is None
    d = SE3Diffuser.from_conf(cfg)
    rot, trans, psi, mask, _ = _fake_batch()
    gt = {"rotmats": rot, "trans": trans, "psi": psi, "psi_mask": mask.bool()}
    t = torch.tensor([0.003, 0.1, 0.2])
    noised = d.forward_marginal(rot, trans, t, mask, generator=torch.Generator().manual_seed(2))
    wrong_r, wrong_t = rot @ T_small_rot(), trans + 0.5
    prs, pts = d.scores_from_prediction(noised.rotmats_t, noised.trans_t, wrong_r, wrong_t, t, mask)
    args = (wrong_r, wrong_t, psi, prs.float(), pts.float(), gt, noised, t, mask)
    base = L.framediff_loss(*args, exp)
    cap = 50.0
    out = L.framediff_loss(*args, dict(exp, small_t_weight_cap=cap))
    w = torch.clamp(noised.trans_score_scaling.double() ** 2, max=cap)
    assert float(w[0]) == cap and 1.0 < float(w[2]) < float(w[1]) < cap   # capped at t = 0.003, graded above
    for k in ("trans_loss", "bb_atom_loss", "dist_mat_loss"):
        assert bool((base[k] > 0).all()), k
        torch.testing.assert_close(out[k].double(), base[k].double() * w, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(out["rot_loss"], base["rot_loss"], rtol=0.0, atol=0.0)


def test_sample_t_low_share_and_official_stream():
    """``low_t_frac = 0`` draws exactly the official ``U(min_t, 1)`` stream; with a share, that share (within
    4 standard errors of a binomial) lies in ``[min_t, low_t_max]`` and the rest follows the uniform law."""
    from models.framediff.training import sample_t

    b = 20000
    t0 = sample_t(b, 0.01, 0.0, 0.1, torch.Generator().manual_seed(3))
    ref = 0.01 + 0.99 * torch.rand(b, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t0, ref)
    frac = 0.4
    t = sample_t(b, 0.001, frac, 0.1, torch.Generator().manual_seed(3))
    assert float(t.min()) >= 0.001 and float(t.max()) <= 1.0
    # P(t <= 0.1) = frac + (1 - frac) * (0.1 - min_t) / (1 - min_t)
    p = frac + (1 - frac) * 0.099 / 0.999
    assert abs(float((t <= 0.1).float().mean()) - p) < 4 * (p * (1 - p) / b) ** 0.5
    hi = t[t > 0.1]                       # the uniform part above low_t_max: mean 0.55
    assert abs(float(hi.mean()) - 0.55) < 4 * (0.9 / 12 ** 0.5) / len(hi) ** 0.5


def T_small_rot() -> torch.Tensor:
    from superdiff_protein.frames.geometry import so3_exp

    return so3_exp(torch.tensor([0.2, -0.1, 0.15]))


def test_padding_does_not_change_the_loss():
    """Per-chain losses are independent of how much padding the batch has."""
    from superdiff_protein.frames.se3 import SE3Diffuser

    cfg = T.compose_config(["model=tiny"])
    exp = dict(cfg["experiment"])
    d = SE3Diffuser.from_conf(cfg)
    rot, trans, psi, mask, _ = _fake_batch(b=1, n=10, seed=3)
    t = torch.tensor([0.1])
    gt = {"rotmats": rot, "trans": trans, "psi": psi, "psi_mask": mask.bool()}
    noised = d.forward_marginal(rot, trans, t, mask, generator=torch.Generator().manual_seed(0))
    wrong_t, wrong_r = trans + 0.5, rot @ T_small_rot()
    prs, pts = d.scores_from_prediction(noised.rotmats_t, noised.trans_t, wrong_r, wrong_t, t, mask)
    ref = L.framediff_loss(wrong_r, wrong_t, psi, prs.float(), pts.float(), gt, noised, t, mask, exp)

    def pad(x, fill=0.0):
        p = torch.full((1, 6) + x.shape[2:], fill, dtype=x.dtype)
        return torch.cat([x, p], 1)

    eye = torch.eye(3).expand(1, 6, 3, 3)
    P = lambda x: pad(x, 3.0)  # garbage in the padding  # noqa: E731
    mask_p = pad(mask)
    noised_p = type(noised)(torch.cat([noised.rotmats_t, eye], 1), P(noised.trans_t), P(noised.rot_score),
                            P(noised.trans_score), noised.rot_score_scaling, noised.trans_score_scaling,
                            P(noised.rotvec_noise))
    gt_p = {"rotmats": torch.cat([rot, eye], 1), "trans": P(trans), "psi": P(psi), "psi_mask": mask_p.bool()}
    out = L.framediff_loss(torch.cat([wrong_r, eye], 1), P(wrong_t), P(psi), P(prs.float()), P(pts.float()),
                           gt_p, noised_p, t, mask_p, exp)
    for k in ref:
        assert torch.allclose(out[k], ref[k], rtol=1e-5, atol=1e-6), k


def test_compose_config_with_hydra():
    ov = ["model=tiny", "data.subset=strand", "max_steps=123", "experiment.learning_rate=3e-4",
          "trainer.precision=bf16-mixed", "model.ipa.num_blocks=3", "data.max_tokens=null", "+extra.note=x"]
    a = T.compose_config(ov)
    assert a["model"]["ipa"]["num_blocks"] == 3 and a["experiment"]["learning_rate"] == 3e-4
    assert a["model"]["node_embed_size"] == 32 and a["data"]["subset"] == "strand" and a["max_steps"] == 123
    assert a["data"]["max_tokens"] is None and a["trainer"]["precision"] == "bf16-mixed" and a["extra"] == {"note": "x"}
    # derived as FrameDiff's interpolations
    assert a["model"]["ipa"]["c_s"] == a["model"]["node_embed_size"]
    assert a["model"]["ipa"]["c_z"] == a["model"]["edge_embed_size"]
    assert a["model"]["ipa"]["coordinate_scaling"] == a["experiment"]["coordinate_scaling"] == 0.1
    assert T.compose_config([])["model"]["node_embed_size"] == 96  # default group: small
    for bad, needle in ((["data.no_such_key=1"], "data.no_such_key"), (["model=no_such_model"], "no_such_model"),
                        (["max_steps=1.5"], "integer"), (["data.min_t=abc"], "number"),
                        (["experiment.learning_rate=nan"], "finite"), (["data.subset=coil"], "data.subset")):
        with pytest.raises(T.TrainError, match=needle):
            T.compose_config(bad)


def test_cli_errors_are_one_line(tmp_path, capsys):
    r = subprocess.run([sys.executable, "-m", "superdiff_protein.cli.train", f"out_dir={tmp_path / 'o'}",
                        f"data.path={tmp_path / 'missing.pt'}"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert "train_frame_model: error: dataset file" in r.stderr and "Traceback" not in r.stderr
    for argv, needle in ((["data.subset=coil"], "data.subset"), (["no_such=1"], "no_such"),
                         (["data.low_t_frac=1.5"], "data.low_t_frac"), (["data.low_t_frac=0.5", "data.low_t_max=0.005"], "data.low_t_max"),
                         (["experiment.small_t_weight_cap=0.5"], "small_t_weight_cap"),
                         (["export", str(tmp_path / "none.ckpt"), str(tmp_path / "m.pth")], "not found")):
        with pytest.raises(SystemExit) as e:
            T.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("train_frame_model: error:") and needle in err, err


_NO_BIOTITE = r"""
import sys, json
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('biotite', 'tmtools', 'diffusers'):
            raise ModuleNotFoundError("blocked for this test: " + name)
        return None
sys.meta_path.insert(0, _Block())
from superdiff_protein.cli import train as T
cfg = T.compose_config(json.loads(sys.argv[1]))
cfg['data']['subset'] = json.loads(sys.argv[2])
s = T.train(cfg)
assert not any(m.split('.')[0] == 'biotite' for m in sys.modules), 'imported biotite'
print('STEPS', s['step'])
"""


def test_training_path_needs_no_biotite(dataset, tmp_path):
    """The GPU image has no biotite: training reads the prepared dataset file only (Hydra, OmegaConf and
    Lightning are dependencies; scripts/train_defaults.sh carries Hydra and OmegaConf there as wheels)."""
    ov = [*TINY, f"out_dir={tmp_path / 'nb'}", f"data.path={dataset[0]}", "max_steps=3",
          "experiment.eval_every=0", "experiment.log_every=1"]
    r = subprocess.run([sys.executable, "-c", _NO_BIOTITE, json.dumps(ov), json.dumps(dataset[1])],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "STEPS 3" in r.stdout
    from models.framediff import FrameDiffAdapter

    model = FrameDiffAdapter.from_checkpoint(tmp_path / "nb" / "model.pth")
    assert model.config.node_embed_size == 32


def test_training_code_lives_next_to_the_network():
    """FrameDiff training is plain Lightning classes in models/framediff (no factories); the CLI re-exports them."""
    import pytorch_lightning as pl

    from models.framediff.datamodule import FrameDataModule
    from models.framediff.fit import SaveAndBudget
    from models.framediff.training import FrameDiffusionModule

    assert issubclass(FrameDiffusionModule, pl.LightningModule) and issubclass(FrameDataModule, pl.LightningDataModule)
    assert issubclass(SaveAndBudget, pl.Callback)
    assert T.FrameDiffusionModule is FrameDiffusionModule and T.framediff_loss is L.framediff_loss
    import ast

    for name in ("losses", "training", "datamodule", "fit", "checkpointing", "metrics"):   # models never import a CLI
        tree = ast.parse((REPO / "models" / "framediff" / f"{name}.py").read_text())
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not mods & {"superdiff_protein.cli.common", "superdiff_protein.cli.train", "superdiff_protein"}, (name, mods)


def test_ca_clash_loss_zero_on_truth_and_pushes_clashing_pairs_apart():
    from superdiff_protein.frames.se3 import SE3Diffuser

    rot, trans, psi, mask, _ = _fake_batch()
    # the truth costs nothing, whatever its own close contacts
    assert float(L.ca_clash_loss(trans, trans, mask).abs().max()) == 0.0
    # fold residue 8 of each chain onto residue 1 (|i-j| = 7): a clash the truth does not have
    bad = trans.clone()
    bad[:, 8] = bad[:, 1] + torch.tensor([0.5, 0.0, 0.0])
    bad = bad.requires_grad_(True)
    loss = L.ca_clash_loss(bad, trans, mask)
    assert (loss[mask.sum(-1) > 8] > 0.1).all()
    loss.sum().backward()
    d0 = (bad[:, 8] - bad[:, 1]).norm(dim=-1)
    moved = bad.detach() - 0.1 * bad.grad
    d1 = (moved[:, 8] - moved[:, 1]).norm(dim=-1)
    assert (d1 > d0 + 1e-3)[mask.sum(-1) > 8].all()
    # neighbours closer than min_sep never count; masked residues never count
    near = trans.clone()
    near[:, 2] = near[:, 1] + torch.tensor([0.3, 0.0, 0.0])
    assert float(L.ca_clash_loss(near, trans, mask, min_sep=3).abs().max()) == 0.0
    m2 = mask.clone()
    m2[:, 8] = 0
    assert float(L.ca_clash_loss(bad.detach(), trans, m2).abs().max()) == 0.0

    # wired into framediff_loss only when clash_loss_weight > 0, gated by clash_loss_t_filter
    cfg = T.compose_config(["model=tiny"])
    exp = dict(cfg["experiment"])
    assert float(exp["clash_loss_weight"]) == 0.0
    d = SE3Diffuser.from_conf(cfg)
    gt = {"rotmats": rot, "trans": trans, "psi": psi, "psi_mask": mask.bool()}
    g = torch.Generator().manual_seed(3)
    for tv in (0.1, 0.9):
        t = torch.full((3,), tv)
        noised = d.forward_marginal(rot, trans, t, mask, generator=g)
        prs, pts = d.scores_from_prediction(noised.rotmats_t, noised.trans_t, rot, bad.detach(), t, mask)
        off = L.framediff_loss(rot, bad.detach(), psi, prs.float(), pts.float(), gt, noised, t, mask, exp)
        assert "clash_loss" not in off
        on = L.framediff_loss(rot, bad.detach(), psi, prs.float(), pts.float(), gt, noised, t, mask,
                              dict(exp, clash_loss_weight=2.0, clash_loss_t_filter=0.5))
        expect = 2.0 * L.ca_clash_loss(bad.detach(), trans, mask) * (tv < 0.5)
        assert torch.allclose(on["clash_loss"], expect, atol=1e-6)
        assert torch.allclose(on["loss"], off["loss"] + expect, atol=1e-5)


def test_ca_bond_loss_is_the_mean_squared_bond_error_and_gated_by_t():
    from superdiff_protein.frames.se3 import SE3Diffuser

    rot, trans, psi, mask, _ = _fake_batch()
    assert float(L.ca_bond_loss(trans, trans, mask).abs().max()) == 0.0   # the truth costs nothing
    # stretch every bond of a straight chain by the same 0.3 A: the loss is exactly 0.3^2, in any frame
    n = trans.shape[1]
    line = torch.zeros(3, n, 3)
    line[..., 0] = 3.8 * torch.arange(n, dtype=torch.float32)
    stretched = line * (4.1 / 3.8)
    q = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))[0]
    val = L.ca_bond_loss(stretched @ q.T + 5.0, line, mask)
    assert torch.allclose(val, torch.full_like(val, 0.09), rtol=1e-4)
    # a residue absent on either side removes its two bonds from the mean, not the value
    m2 = mask.clone()
    m2[:, 3] = 0
    assert torch.allclose(L.ca_bond_loss(stretched, line, m2), val, rtol=1e-4)
    # gradient descent shortens an overlong bond, and stays finite when two CAs coincide
    bad = line.clone()
    bad[:, 5:] += torch.tensor([0.5, 0.0, 0.0])
    bad.requires_grad_(True)
    L.ca_bond_loss(bad, line, mask).sum().backward()
    d0 = (bad[:, 5] - bad[:, 4]).norm(dim=-1)
    moved = bad.detach() - 0.5 * bad.grad
    assert ((moved[:, 5] - moved[:, 4]).norm(dim=-1) < d0 - 1e-3)[mask[:, 5] > 0].all()
    same = line.clone()
    same[:, 1] = same[:, 0]
    same.requires_grad_(True)
    L.ca_bond_loss(same, line, mask).sum().backward()
    assert torch.isfinite(same.grad).all()

    # wired into framediff_loss only when bond_loss_weight > 0, gated by bond_loss_t_filter
    cfg = T.compose_config(["model=tiny"])
    exp = dict(cfg["experiment"])
    assert float(exp["bond_loss_weight"]) == 0.0 and float(exp["bond_loss_t_filter"]) == 0.1
    d = SE3Diffuser.from_conf(cfg)
    gt = {"rotmats": rot, "trans": trans, "psi": psi, "psi_mask": mask.bool()}
    pred = trans + 0.2 * torch.randn(trans.shape, generator=torch.Generator().manual_seed(2))
    for tv in (0.05, 0.5):
        t = torch.full((3,), tv)
        noised = d.forward_marginal(rot, trans, t, mask, generator=torch.Generator().manual_seed(3))
        prs, pts = d.scores_from_prediction(noised.rotmats_t, noised.trans_t, rot, pred, t, mask)
        off = L.framediff_loss(rot, pred, psi, prs.float(), pts.float(), gt, noised, t, mask, exp)
        assert "bond_loss" not in off
        on = L.framediff_loss(rot, pred, psi, prs.float(), pts.float(), gt, noised, t, mask,
                              dict(exp, bond_loss_weight=3.0, bond_loss_t_filter=0.1))
        expect = 3.0 * L.ca_bond_loss(pred, trans, mask) * (tv < 0.1)
        assert torch.allclose(on["bond_loss"], expect, atol=1e-6)
        assert torch.allclose(on["loss"], off["loss"] + expect, atol=1e-5)
        assert (expect > 0).all() == (tv < 0.1)


def test_non_finite_loss_stops_at_the_next_metrics_row(dataset, tmp_path):
    """Per-step losses stay on the device; the first metrics row (or save) after a NaN stops the run with a
    one-line TrainError, and no diverged model.pth is written."""
    from models.framediff.training import FrameDiffusionModule, TrainError

    cfg = _cfg(dataset, tmp_path / "nan", "max_steps=12")
    module = FrameDiffusionModule(cfg)
    module._acc = {"loss": [torch.tensor(1.0), torch.tensor(float("nan"))], "grad_norm": [torch.tensor(2.0)]}
    with pytest.raises(TrainError, match="non-finite loss"):
        module._check_finite({k: float(torch.stack(v).mean()) for k, v in module._acc.items()}, 10)
    with pytest.raises(TrainError, match="non-finite loss"):
        module.on_save_checkpoint({})
    module._acc = {"loss": [torch.tensor(1.0)], "grad_norm": [torch.tensor(float("inf"))]}
    module._check_finite({"loss": 1.0, "grad_norm": float("inf")}, 10)   # only losses stop a run
    # end to end: an infinite learning rate diverges at the first step; the run stops with the error
    with pytest.raises(TrainError, match="non-finite loss"):
        from models.framediff.fit import fit
        fit(_cfg(dataset, tmp_path / "inf", "max_steps=12", "experiment.learning_rate=1e30"), tmp_path / "inf")
    assert not (tmp_path / "inf" / "model.pth").exists()


def test_compiled_training_gets_one_batch_shape(dataset, tmp_path):
    """``trainer.compile=true`` feeds the network one shape: full batches padded to ``data.max_length`` (so the
    compiled graph is built once per grad mode, not per length). Without it, batches are padded to their longest
    chain and the partial batch is kept. The batch size is chosen so that every epoch has a partial batch."""
    from models.framediff.datamodule import FrameDataModule

    pad_len = 1000      # longer than any test chain: no cropping, and every eager batch is shorter
    probe = FrameDataModule(_cfg(dataset, tmp_path, f"data.max_length={pad_len}"))
    probe.setup("fit")
    n = len(probe.dataset)
    assert n >= 3 and max(probe.dataset.lengths) < pad_len
    bs = n // 2 + 1          # one pool per epoch (50 batches' worth): a full batch of bs and a partial one of n - bs
    shapes = {}
    for comp in ("false", "true"):
        dm = FrameDataModule(_cfg(dataset, tmp_path, f"data.batch_size={bs}", f"data.max_length={pad_len}",
                                  f"trainer.compile={comp}"))
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        batches = [next(it) for _ in range(6)]
        shapes[comp] = {tuple(b["res_mask"].shape) for b in batches}
        if comp == "true":
            for b in batches:   # the padding is padding: masked, identity frames, zero coordinates
                pad = ~b["res_mask"].bool()
                assert pad.any() and (b["trans"][pad] == 0).all()
                assert torch.equal(b["rotmats"][pad], torch.eye(3).expand(int(pad.sum()), 3, 3))
    assert shapes["true"] == {(bs, pad_len)}
    assert len(shapes["false"]) > 1 and all(L < pad_len for _, L in shapes["false"])
    assert {b for b, _ in shapes["false"]} == {bs, n - bs}     # the partial batch, dropped when compiling
    with pytest.raises(T.TrainError, match="max_tokens"):
        dm = FrameDataModule(_cfg(dataset, tmp_path, "trainer.compile=true", "data.max_tokens=100000"))
        dm.setup("fit")
        dm.train_dataloader()


@pytest.mark.slow
def test_compiled_training_runs_and_exports_the_eager_keys(dataset, tmp_path):
    """``trainer.compile=true`` (Inductor, static shapes; minutes of compiling on 2 CPU cores) trains, and writes a
    model.pth with the eager key set. It compiles two graphs, the no-grad self-conditioning pass and the training
    pass, with no graph break: the fixed batch shape, the self-conditioning input always given, and the eager
    evaluation keep it from compiling more (each graph costs about a minute on a GPU). At step 0 the network and
    its EMA copy hold the same weights, so their fixed-noise evaluations agree to float32 rounding. (Later steps
    are not compared: Adam's normalised first steps turn rounding-level gradient differences into O(lr) updates;
    tests/test_compile.py compares the gradients themselves.)"""
    from torch._dynamo.utils import counters

    from models.framediff.fit import fit
    from superdiff_protein.frames.checkpoints import load_checkpoint_file

    keys = {}
    for comp in ("false", "true"):
        out = tmp_path / comp
        counters.clear()
        fit(_cfg(dataset, out, "max_steps=10", f"trainer.compile={comp}"), out)
        if comp == "true":
            assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], dict(counters["stats"])
        rows = _rows(out)
        assert all(np.isfinite(v) for _, v in _col(rows, "loss")) and _col(rows, "loss")
        keys[comp] = sorted(load_checkpoint_file(out / "model.pth")["model"])
        first = rows[0]
        assert int(first["step"]) == 0
        np.testing.assert_allclose(float(first["eval_loss"]), float(first["eval_ema_loss"]),
                                   rtol=64 * np.finfo(np.float32).eps)
    assert keys["true"] == keys["false"]
