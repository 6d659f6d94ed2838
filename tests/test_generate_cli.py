"""End-to-end tests of the ``generate_backbones`` CLI (real subprocesses, exact frame models).

Small lengths and few steps keep the whole file at about a minute on 2 cores.
"""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import official_fixtures_dir, official_skip_reason
from superdiff_protein.frames.geometry import IDEAL_BACKBONE_LOCAL

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SMALL = ["num_steps=6", "plots=false", "progress=false"]
EXACT_MODELS = "models=[exact-helix,exact-strand]"

IDEAL = {
    "N-CA": float(np.linalg.norm(IDEAL_BACKBONE_LOCAL["N"])),
    "CA-C": float(np.linalg.norm(IDEAL_BACKBONE_LOCAL["C"])),
    "C-O": float(np.linalg.norm(IDEAL_BACKBONE_LOCAL["O_in_psi_frame"])),
}
CA_CA = 3.80


def _cmd() -> list[str]:
    return [sys.executable, "-m", "superdiff_protein.cli.generate"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    return env


def run_cli(*args: str, timeout: float = 180, exe: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI; without a ``models=`` argument the exact models are used (the shipped defaults are
    neural networks, whose float32 batched outputs are not bit-identical across batch sizes)."""
    if not any(a.startswith("models=") for a in args):
        args = (EXACT_MODELS, *args)
    return subprocess.run((exe or _cmd()) + list(args), capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=str(TESTS))


def _rows(out: Path) -> list[dict]:
    with open(out / "samples.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _pdb_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("length_*/sample_*.pdb"))
            if not p.name.endswith("_traj.pdb")}


def _check_backbone_pdb(path: Path, length: int, ca_tol: float | None = 0.35) -> None:
    """biotite reads it; N-CA, CA-C, C-O bonds ideal; consecutive CA-CA distances ~3.8 A.

    Where biotite is not installed (the GPU image of the device machines), the fixed PDB columns are read
    directly, so the geometry checks still run."""
    try:
        from biotite.structure.io.pdb import PDBFile
    except ImportError:
        atoms = [ln for ln in path.read_text().splitlines() if ln.startswith("ATOM")]
        names = [ln[12:16].strip() for ln in atoms]
        coord = np.array([[float(ln[30:38]), float(ln[38:46]), float(ln[46:54])] for ln in atoms])
    else:
        arr = PDBFile.read(str(path)).get_structure(model=1)
        names, coord = list(arr.atom_name), arr.coord
    assert names == ["N", "CA", "C", "O"] * length, path
    xyz = coord.reshape(length, 4, 3).astype(np.float64)
    assert np.isfinite(xyz).all()
    d = lambda a, b: np.linalg.norm(xyz[:, a] - xyz[:, b], axis=-1)  # noqa: E731
    # atoms are written with 3 decimals: each distance is exact to ~2e-3 A
    np.testing.assert_allclose(d(0, 1), IDEAL["N-CA"], atol=3e-3)
    np.testing.assert_allclose(d(1, 2), IDEAL["CA-C"], atol=3e-3)
    np.testing.assert_allclose(d(2, 3), IDEAL["C-O"], atol=3e-3)
    if ca_tol is not None:
        ca = np.linalg.norm(xyz[1:, 1] - xyz[:-1, 1], axis=-1)
        np.testing.assert_allclose(ca, CA_CA, atol=ca_tol)


# ----------------------------------------------------------------------------------------- outputs
def test_end_to_end_outputs_are_complete_and_valid(tmp_path):
    out = tmp_path / "or"
    r = run_cli("rule=or", "lengths=[12,16]", "samples_per_length=2", "batch_size=2", "num_steps=8", "seed=0",
                f"out_dir={out}", "save_traj=true", "plots=true", "noise_scale=1.0")
    assert r.returncode == 0, r.stderr
    assert "4 sample(s) generated, 0 already complete" in r.stdout
    assert "samples" in r.stderr                                            # the progress bar

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    for key in ("models", "rule", "temperature", "bias", "kappa_scope", "estimator", "num_steps", "min_t",
                "noise_scale", "lengths", "samples_per_length", "batch_size", "seed", "device", "precision",
                "out_dir", "save_traj"):
        assert key in cfg
    assert cfg["lengths"] == [12, 16] and cfg["num_steps"] == 8 and cfg["models"] == ["exact-helix", "exact-strand"]

    rows = _rows(out)
    assert [(int(x["length"]), int(x["sample"])) for x in rows] == [(12, 0), (12, 1), (16, 0), (16, 1)]
    assert len({x["seed"] for x in rows}) == 4
    for row in rows:
        L = int(row["length"])
        assert row["rule"] == "or" and row["models"] == "exact-helix;exact-strand" and row["temperature"] == "1"
        kap = [float(row["kappa.exact-helix"]), float(row["kappa.exact-strand"])]
        assert abs(sum(kap) - 1) < 1e-5 and min(kap) >= 0
        for lab in ("exact-helix", "exact-strand"):
            rot, trans = float(row[f"logq.{lab}.rot"]), float(row[f"logq.{lab}.trans"])
            assert abs(rot + trans - float(row[f"logq.{lab}"])) <= 1e-9 * (1 + abs(rot) + abs(trans))
        assert float(row["wall_time_s"]) >= 0
        pdb = out / row["pdb_path"]
        assert row["pdb_path"] == f"length_{L}/sample_{row['sample']}.pdb"
        _check_backbone_pdb(pdb, L)

        from biotite.structure.io.pdb import PDBFile

        traj = PDBFile.read(str(out / row["traj_path"]))
        assert traj.get_model_count() == 9                                   # t=1 and 8 steps
        tr = np.load(out / row["traces_path"])
        assert tr["kappa"].shape == (8, 2, 2) and tr["logq"].shape == (9, 2, 2) and tr["t"].shape == (9,)
        assert list(tr["models"]) == ["exact-helix", "exact-strand"] and list(tr["components"]) == ["rot", "trans"]
        np.testing.assert_allclose(tr["kappa"].sum(-1), 1.0, atol=1e-9)
        np.testing.assert_allclose(tr["kappa"][-1, 0], kap, atol=1e-5)
        np.testing.assert_allclose(tr["logq"][-1].sum(0), [float(row["logq.exact-helix"]),
                                                         float(row["logq.exact-strand"])], rtol=1e-5)
        assert tr["t"][0] == 1.0 and abs(tr["t"][-1] - cfg["min_t"]) < 1e-12
    for L in (12, 16):
        for png in ("kappa_traces.png", "logq_traces.png"):
            assert (out / f"length_{L}" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.tmp")) and not (out / ".generate.lock").exists()


def test_console_script_and_preset(tmp_path):
    """The installed entry point (when installed) runs a preset; the preset's settings are recorded."""
    exe = shutil.which("generate_backbones")
    out = tmp_path / "paper"
    r = run_cli("generate=paper_or", "lengths=10", "samples_per_length=2", "batch_size=1", f"out_dir={out}", *SMALL,
                exe=[exe] if exe else None)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["noise_scale"] == 0.1 and cfg["rule"] == "or" and cfg["num_steps"] == 6
    assert cfg["min_t"] == 0.002 and cfg["kappa_scope"] == "per_component" and cfg["bias_convention"] == "official"
    assert cfg["time_grid"] == "framediff" and cfg["final"] == "state"
    # noise_scale < 1 with the Ito estimator: the bias warning is surfaced once (two batches ran)
    assert r.stderr.count("warning (biased log-densities)") == 1, r.stderr
    rows = _rows(out)
    assert all(x["final"] == "state" and x["kappa_scope"] == "per_component" for x in rows)
    tr = np.load(out / rows[0]["traces_path"])
    np.testing.assert_allclose(tr["t"], np.linspace(0.002, 1.0, 7)[::-1], rtol=0, atol=1e-15)   # the official grid
    # the official run writes the last noisy state (6 steps here: far from a protein), so no CA-CA check
    _check_backbone_pdb(out / "length_10" / "sample_0.pdb", 10, ca_tol=None)


# ----------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("rule, extra", [("or", ["noise_scale=1.0"]),
                                         ("and", ["noise_scale=0.1", "kappa_scope=per_component"])])
def test_same_seed_gives_identical_pdbs_whatever_the_batch_size(tmp_path, rule, extra):
    outs = []
    for bs in (1, 3):
        out = tmp_path / f"bs{bs}"
        r = run_cli(f"rule={rule}", "lengths=[10]", "samples_per_length=3", f"batch_size={bs}", "seed=7",
                    f"out_dir={out}", *SMALL, *extra)
        assert r.returncode == 0, r.stderr
        outs.append(out)
    a, b = _pdb_bytes(outs[0]), _pdb_bytes(outs[1])
    assert len(a) == 3 and a == b
    assert len(set(a.values())) == 3                                        # different samples differ
    ra, rb = _rows(outs[0]), _rows(outs[1])
    for x, y in zip(ra, rb):
        for k in x:
            if k.startswith(("kappa.", "logq.", "seed")):
                assert x[k] == y[k], k
    if rule != "or":
        return
    # another seed gives other structures
    out = tmp_path / "seed8"
    assert run_cli(f"rule={rule}", "lengths=[10]", "samples_per_length=1", "seed=8", f"out_dir={out}",
                   *SMALL, *extra).returncode == 0
    assert _pdb_bytes(out)["length_10/sample_0.pdb"] != a["length_10/sample_0.pdb"]


# ----------------------------------------------------------------------------------------- resume
def test_resume_after_killed_run_matches_uninterrupted_run(tmp_path):
    args = [EXACT_MODELS, "lengths=[14]", "samples_per_length=5", "num_steps=40", "seed=1", "plots=false",
            "progress=false"]
    ref = tmp_path / "ref"
    assert run_cli(*args, "batch_size=3", f"out_dir={ref}").returncode == 0

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd() + args + ["batch_size=1", f"out_dir={out}"], env=_env(), cwd=str(TESTS),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while time.time() - t0 < 120:
        if (out / "samples.csv").is_file() or proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_early = proc.returncode == -signal.SIGKILL
    done_before = _rows(out) if (out / "samples.csv").is_file() else []
    # nothing truncated: every PDB present is complete and every csv row points to one
    for p in out.glob("length_14/sample_*.pdb"):
        assert p.read_text().rstrip().endswith("END")
    for row in done_before:
        assert (out / row["pdb_path"]).is_file()

    assert killed_early, "the run finished before it could be killed; make it longer"
    r = run_cli(*args, "batch_size=2", f"out_dir={out}")
    assert r.returncode == 0, r.stderr
    if killed_early:
        assert f"{5 - len(done_before)} sample(s) generated, {len(done_before)} already complete" in r.stdout
        assert len(done_before) < 5
    assert _pdb_bytes(out) == _pdb_bytes(ref)
    assert len(_rows(out)) == 5 and not list(out.rglob("*.tmp")) and not (out / ".generate.lock").exists()


def test_resume_redoes_samples_with_missing_pdb_or_row_and_refuses_other_settings(tmp_path):
    out = tmp_path / "run"
    args = ["lengths=[10,12]", "samples_per_length=2", "seed=3", f"out_dir={out}", *SMALL]
    assert run_cli(*args).returncode == 0
    before = _pdb_bytes(out)
    (out / "length_10" / "sample_1.pdb").unlink()                          # a PDB without its row ...
    rows = [r for r in _rows(out) if not (r["length"] == "12" and r["sample"] == "0")]
    with open(out / "samples.csv", "w", newline="") as fh:                  # ... and a row without its PDB
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "2 sample(s) generated, 2 already complete" in r.stdout
    assert _pdb_bytes(out) == before and len(_rows(out)) == 4

    r = run_cli(*args)
    assert r.returncode == 0 and "0 sample(s) generated, 4 already complete" in r.stdout
    # more samples per length: only the new ones are made
    r = run_cli(*[a for a in args if not a.startswith("samples_per_length")], "samples_per_length=3")
    assert r.returncode == 0 and "2 sample(s) generated, 4 already complete" in r.stdout

    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = run_cli(*[a for a in args if not a.startswith("seed")], "seed=4")
    assert r.returncode == 2 and "other settings" in r.stderr and "seed" in r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot


# ----------------------------------------------------------------------------------------- bad input
BAD = [   # (further bad values are covered in-process by tests/test_generate_api.py)
    (["models=[no-such-model]"], "unknown model 'no-such-model'"),
    (["models=[/no/such/checkpoint.pt]"], "not found"),
    (["temperature=0"], "T must be > 0"),
    (["lengths=[0]"], ">= 1"),
    (["lengths=[5000]"], "maximum"),
    (["lengths=[400]"], "supports lengths up to"),
    (["device=cuda"], "CUDA"),
    (["models=[exact-helix,py:test_generate_models:incompatible_model]"], "cannot be superposed"),
]


@pytest.mark.parametrize("args, msg", BAD, ids=[a[0] for a, _ in BAD])
def test_bad_input_fails_cleanly_and_writes_nothing(tmp_path, args, msg):
    if args == ["device=cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is present")
    out = tmp_path / "out"
    r = run_cli("lengths=[10]", "samples_per_length=1", f"out_dir={out}", *SMALL, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert msg in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_unknown_key_is_refused(tmp_path):
    r = run_cli("temprature=2", f"out_dir={tmp_path / 'o'}", *SMALL)
    assert r.returncode != 0 and "temprature" in r.stderr and not (tmp_path / "o").exists()


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    r = run_cli("lengths=[10]", "samples_per_length=1", f"out_dir={blocker / 'sub'}", *SMALL)
    assert r.returncode == 2 and "out_dir" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("lengths=[10]", "samples_per_length=1", f"out_dir={blocker}", *SMALL)
    assert r.returncode == 2 and "out_dir" in r.stderr
    assert blocker.read_text() == "not a directory"


def test_nan_during_sampling_names_sample_and_step_and_writes_nothing_of_the_batch(tmp_path):
    out = tmp_path / "nan"
    r = run_cli("models=[py:test_generate_models:nan_model]", "lengths=[10]", "samples_per_length=2",
                "batch_size=2", f"out_dir={out}", "num_steps=10", "plots=false", "progress=false")
    assert r.returncode == 1, r.stderr
    assert "sampling failed" in r.stderr and "step" in r.stderr and "length 10 sample 0" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list(out.glob("length_*/*.pdb")) and not list(out.glob("length_*/*.npz"))
    assert not (out / "samples.csv").exists() and not list(out.rglob("*.tmp"))


# ----------------------------------------------------------------------------------------- FrameDiff checkpoints
SMALL_FRAMEDIFF = {
    "node_embed_size": 32, "edge_embed_size": 16, "embed": {"index_embed_size": 8, "num_bins": 22},
    "ipa": {"c_hidden": 16, "c_skip": 8, "no_heads": 2, "no_qk_points": 4, "no_v_points": 4,
            "seq_tfmr_num_heads": 2, "seq_tfmr_num_layers": 2, "num_blocks": 2},
}
OFFICIAL_DIFFUSER = {
    "diffuse_trans": True, "diffuse_rot": True,
    "r3": {"min_b": 0.1, "max_b": 20.0, "coordinate_scaling": 0.1},
    "so3": {"num_omega": 1000, "num_sigma": 1000, "min_sigma": 0.1, "max_sigma": 1.5, "schedule": "logarithmic",
            "cache_dir": ".cache/", "use_cached_score": False},
}


def _tiny_framediff_checkpoint(path: Path, seed: int, model_conf: dict | None = None) -> Path:
    """A small random FrameDiff network in the official container ``{model, conf, optimizer, epoch, step}``
    (conf an OmegaConf DictConfig, as official files). Every parameter is perturbed (the official init
    zeroes many layers)."""
    import math

    import torch
    from omegaconf import OmegaConf

    from models.framediff.config import FrameDiffConfig
    from models.framediff.network import FrameDiffScoreNetwork

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):       # the default init draws from the global RNG: pin it, so the
        torch.manual_seed(seed)                   # weights do not depend on which tests ran before in this worker
        net = FrameDiffScoreNetwork(FrameDiffConfig.from_dict(SMALL_FRAMEDIFF))
    with torch.no_grad():
        for name, p in net.named_parameters():
            std = 0.3 / math.sqrt(p.shape[1]) if p.ndim >= 2 else 0.1
            p.add_(torch.randn(p.shape, generator=g) * (std / 6 if "bb_update" in name else std))
    conf = OmegaConf.create({"data": {"min_t": 0.01}, "diffuser": OFFICIAL_DIFFUSER,
                             "model": model_conf or SMALL_FRAMEDIFF, "experiment": {}})
    torch.save({"model": net.state_dict(), "conf": conf, "optimizer": {}, "epoch": 0, "step": 0}, path)
    return path


@pytest.fixture(scope="module")
def framediff_ckpts(tmp_path_factory):
    pytest.importorskip("superdiff_protein.frames.registry")
    d = tmp_path_factory.mktemp("ckpts")
    return [_tiny_framediff_checkpoint(d / f"tiny_{s}.pth", s) for s in (0, 1)]


def test_framediff_checkpoints_end_to_end_and_batch_size_invariance(tmp_path, framediff_ckpts):
    a, b = framediff_ckpts
    outs = []
    # float64: a float32 network's batched products are not bit-identical across batch sizes, and for about one
    # random init in six (global RNG seeds 0-5, session 13) a last-bit difference reached a printed coordinate.
    # In float64 a last-bit difference is about 1e-16 relative, many orders below the PDB's 1e-3 A, so equal bytes
    # is a fair test there (seeds 0-5: all equal).
    for bs in (1, 3):
        out = tmp_path / f"bs{bs}"
        r = run_cli(f"models=[{a},{b}]", "rule=or", "lengths=[10]", "samples_per_length=3", f"batch_size={bs}",
                    "seed=5", f"out_dir={out}", "precision=float64", *SMALL)
        assert r.returncode == 0, r.stderr
        outs.append(out)
    pdbs = _pdb_bytes(outs[0])
    assert len(pdbs) == 3 and pdbs == _pdb_bytes(outs[1])
    rows = _rows(outs[0])
    assert rows[0]["models"] == "framediff:tiny_0;framediff:tiny_1"
    for row in rows:
        assert row["final"] == "prediction" and row["final_model"] in ("framediff:tiny_0", "framediff:tiny_1")
        # random networks: bonded geometry is ideal by construction; CA-CA spacing is whatever the net says
        _check_backbone_pdb(outs[0] / row["pdb_path"], 10, ca_tol=None)


def test_framediff_padded_lengths_and_exact_plus_neural_superposition(tmp_path, framediff_ckpts):
    a, b = framediff_ckpts
    out = tmp_path / "padded"
    r = run_cli(f"models=[{a},{b}]", "rule=and", "lengths=[8,11]", "samples_per_length=2", "batch_size=4",
                "pad_lengths=true", f"out_dir={out}", "precision=float64", *SMALL)
    assert r.returncode == 0, r.stderr
    assert "ignored" not in r.stderr
    rows = _rows(out)
    assert [(int(x["length"]), int(x["sample"])) for x in rows] == [(8, 0), (8, 1), (11, 0), (11, 1)]
    for row in rows:
        _check_backbone_pdb(out / row["pdb_path"], int(row["length"]), ca_tol=None)
        tr = np.load(out / row["traces_path"])
        assert np.isfinite(tr["logq"]).all() and np.isfinite(tr["kappa"]).all()
    # an exact model shares FrameDiff's forward process: it superposes with a network (no padding then)
    out = tmp_path / "mixed"
    r = run_cli(f"models=[{a},exact-helix]", "lengths=[9]", "samples_per_length=1", "pad_lengths=true",
                f"out_dir={out}", *SMALL)
    assert r.returncode == 0, r.stderr
    assert "pad_lengths=true ignored" in r.stderr
    _check_backbone_pdb(out / "length_9" / "sample_0.pdb", 9, ca_tol=None)


def test_bad_checkpoints_fail_cleanly(tmp_path, framediff_ckpts):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02 definitely not a checkpoint")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(framediff_ckpts[0].read_bytes()[:5000])
    wrong = _tiny_framediff_checkpoint(tmp_path / "wrong_arch.pth", 0,
                                       model_conf={**SMALL_FRAMEDIFF, "node_embed_size": 48})
    cases = [(corrupt, "corrupt"), (truncated, "truncated"), (wrong, "wrong_arch")]
    fixtures = official_fixtures_dir()
    if (fixtures / "proteus_small_public.pth").is_file():
        cases.append((f"framediff:{fixtures / 'proteus_small_public.pth'}", "proteus_small_public"))
    for spec, name in cases:
        out = tmp_path / f"out_{name}"
        r = run_cli(f"models=[{spec}]", "lengths=[10]", "samples_per_length=1", f"out_dir={out}", *SMALL)
        assert r.returncode == 2, (name, r.stderr)
        assert "cannot load" in r.stderr and name in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not out.exists()


@pytest.mark.gpu
def test_cuda_run_matches_itself_across_batch_sizes(tmp_path, framediff_ckpts):
    """On CUDA: exact + FrameDiff superposition runs, PDBs valid; exact-only runs are batch-size invariant."""
    a, _ = framediff_ckpts
    out = tmp_path / "cuda_mixed"
    r = run_cli(f"models=[{a},exact-strand]", "device=cuda", "lengths=[12]", "samples_per_length=2",
                f"out_dir={out}", *SMALL)
    assert r.returncode == 0, r.stderr
    for row in _rows(out):
        _check_backbone_pdb(out / row["pdb_path"], 12, ca_tol=None)
    outs = []
    for bs in (1, 2):
        o = tmp_path / f"cuda_bs{bs}"
        assert run_cli("device=cuda", "lengths=[12]", "samples_per_length=2", f"batch_size={bs}", f"out_dir={o}",
                       *SMALL).returncode == 0
        outs.append(o)
    assert _pdb_bytes(outs[0]) == _pdb_bytes(outs[1])


def test_bf16_precision_runs_and_stays_close_to_float32(tmp_path, framediff_ckpts):
    """precision=bf16 (network weights in bfloat16, sampler state float64): finite, valid PDBs, and
    the final structures stay near the float32 ones (random tiny nets, few steps: a loose tolerance)."""
    a, b = framediff_ckpts
    outs = {}
    for prec in ("float32", "bf16"):
        out = tmp_path / prec
        r = run_cli(f"models=[{a},{b}]", "rule=or", "lengths=[10]", "samples_per_length=2", "batch_size=2",
                    "seed=1", f"precision={prec}", f"out_dir={out}", *SMALL)
        assert r.returncode == 0, r.stderr
        outs[prec] = out
    from superdiff_protein.frames.pdb_io import read_backbone
    for i in range(2):
        x = read_backbone(outs["float32"] / "length_10" / f"sample_{i}.pdb").atoms[:, 1]
        y = read_backbone(outs["bf16"] / "length_10" / f"sample_{i}.pdb").atoms[:, 1]
        assert np.isfinite(y).all()
        rmsd = float(np.sqrt(((x - y) ** 2).sum(-1).mean()))
        assert 0.0 < rmsd < 2.0, rmsd   # > 0: bf16 really ran


def _official_small_checkpoints() -> dict[str, Path]:
    """kind -> the official small random-weight checkpoint of every *_small_public_reference.json fixture."""
    import json

    fixtures = official_fixtures_dir()
    out: dict[str, Path] = {}
    for ref in sorted(fixtures.glob("*_small_public_reference.json")):
        meta = json.loads(ref.read_text())
        kind = "proteus" if "ema" in meta.get("checkpoint_container_keys", []) else "framediff"
        if (ref.parent / meta["checkpoint_file"]).is_file():
            out[kind] = ref.parent / meta["checkpoint_file"]
    return out


OFFICIAL_SMALL = _official_small_checkpoints()


@pytest.mark.skipif("proteus" not in OFFICIAL_SMALL, reason=official_skip_reason("official Proteus fixture checkpoint"))
@pytest.mark.parametrize("combo", ["proteus", "or", "and"])
def test_proteus_end_to_end_alone_and_superposed_with_framediff(tmp_path, combo):
    """generate_backbones on the official (random-weight) Proteus checkpoint: alone, OR and AND with FrameDiff."""
    p = f"proteus:{OFFICIAL_SMALL['proteus']}"
    if combo == "proteus":
        args = [f"models=[{p}]", "rule=single"]
    else:
        if "framediff" not in OFFICIAL_SMALL:
            pytest.skip(official_skip_reason("official FrameDiff fixture checkpoint"))
        args = [f"models=[framediff:{OFFICIAL_SMALL['framediff']},{p}]", f"rule={combo}"]
    out = tmp_path / combo
    r = run_cli(*args, "lengths=[11]", "samples_per_length=2", f"out_dir={out}", *SMALL)
    assert r.returncode == 0, r.stderr
    rows = _rows(out)
    assert len(rows) == 2
    for row in rows:
        _check_backbone_pdb(out / row["pdb_path"], 11, ca_tol=None)
        if combo != "proteus":
            kappas = [float(v) for k, v in row.items() if k.startswith("kappa.")]
            assert len(kappas) == 2 and all(np.isfinite(kappas))
