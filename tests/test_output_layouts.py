"""Output layouts of generate_backbones (``layout=flat``, the default, and ``layout=framediff``), resuming in both,
and FrameDiff's ``self_consistency/sc_results.csv`` from evaluate_backbones. Exact models, few steps, tiny
evaluation models: fast, and nothing from ../shared is needed."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from test_generate_cli import _rows, run_cli

SMALL = ["num_steps=6", "plots=true", "progress=false", "seed=5", "save_traj=true", "noise_scale=1.0"]


def _models(path) -> list[str]:
    """The MODEL blocks of a multi-model PDB, as text."""
    blocks, cur = [], None
    for ln in path.read_text().splitlines():
        if ln.startswith("MODEL"):
            cur = []
        elif ln.startswith("ENDMDL"):
            blocks.append("\n".join(cur))
            cur = None
        elif cur is not None:
            cur.append(ln)
    return blocks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layouts")
    out = {}
    for layout in ("flat", "framediff"):
        d = tmp / layout
        r = run_cli("lengths=[10,12]", "samples_per_length=2", "batch_size=2", f"layout={layout}", f"out_dir={d}",
                    *SMALL)
        assert r.returncode == 0, r.stderr
        out[layout] = d
    return out


def test_framediff_layout_writes_framediffs_files(runs):
    flat, fd = runs["flat"], runs["framediff"]
    for L in (10, 12):
        for i in range(2):
            s = fd / f"length_{L}" / f"sample_{i}"
            assert sorted(p.name for p in s.iterdir()) == ["bb_traj_1.pdb", "sample_1.pdb", "traces.npz"]
            # the same sample as the flat layout's, byte for byte
            assert (s / "sample_1.pdb").read_bytes() == (flat / f"length_{L}" / f"sample_{i}.pdb").read_bytes()
            a, b = np.load(s / "traces.npz"), np.load(flat / f"length_{L}" / f"sample_{i}_traces.npz")
            assert set(a.files) == set(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
            # FrameDiff's trajectory order: model 1 = the last state (t = min_t), the last model = t = 1
            ft, ff = _models(flat / f"length_{L}" / f"sample_{i}_traj.pdb"), _models(s / "bb_traj_1.pdb")
            assert len(ft) == 7 and ff == ft[::-1]
        assert not list((fd / f"length_{L}").glob("sample_*.pdb"))
        for png in ("kappa_traces.png", "logq_traces.png"):                  # per-length plots in both layouts
            assert (fd / f"length_{L}" / png).is_file() and (flat / f"length_{L}" / png).is_file()
    rf, rd = _rows(flat), _rows(fd)
    paths = ("pdb_path", "traj_path", "traces_path", "wall_time_s")
    assert [{k: v for k, v in r.items() if k not in paths} for r in rf] == \
        [{k: v for k, v in r.items() if k not in paths} for r in rd]
    for r in rd:
        base = f"length_{r['length']}/sample_{r['sample']}"
        assert (r["pdb_path"], r["traj_path"], r["traces_path"]) == \
            (f"{base}/sample_1.pdb", f"{base}/bb_traj_1.pdb", f"{base}/traces.npz")
    import yaml

    assert yaml.safe_load((fd / "config.yaml").read_text())["layout"] == "framediff"


@pytest.mark.parametrize("layout", ["flat", "framediff"])
def test_resume_in_both_layouts(runs, tmp_path, layout):
    import shutil

    out = tmp_path / layout
    shutil.copytree(runs[layout], out)
    args = ["lengths=[10,12]", "samples_per_length=2", "batch_size=2", f"layout={layout}", f"out_dir={out}", *SMALL]
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.pdb")}
    rows = _rows(out)
    (out / rows[1]["pdb_path"]).unlink()                                     # a PDB without its row ...
    keep = [r for r in rows if r is not rows[2]]                             # ... and a row without its PDB
    with open(out / "samples.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "2 sample(s) generated, 2 already complete" in r.stdout
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.pdb")} == before
    assert [x["pdb_path"] for x in _rows(out)] == [x["pdb_path"] for x in rows]
    r = run_cli(*args)
    assert r.returncode == 0 and "0 sample(s) generated, 4 already complete" in r.stdout
    other = "flat" if layout == "framediff" else "framediff"
    r = run_cli(*[a for a in args if not a.startswith("layout=")], f"layout={other}")
    assert r.returncode == 2 and f"layout: '{layout}' -> '{other}'" in r.stderr


# ------------------------------------------------------------------------------ evaluate_backbones: sc_results.csv
def test_discovery_skips_framediff_trajectories_and_self_consistency(tmp_path):
    from eval.io import discover_structures

    for rel in ("length_10/sample_0/sample_1.pdb", "length_10/sample_0/bb_traj_1.pdb",
                "length_10/sample_0/x0_traj_1.pdb", "length_10/sample_0/self_consistency/sample_1.pdb",
                "length_10/sample_0/self_consistency/esmf/sample_0.pdb", "length_10/sample_1_traj.pdb",
                "length_10/sample_1.pdb"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert [p.relative_to(tmp_path).as_posix() for p in discover_structures(tmp_path)] == \
        ["length_10/sample_0/sample_1.pdb", "length_10/sample_1.pdb"]


@pytest.fixture(scope="module")
def tiny_eval_models(tmp_path_factory):
    from test_eval_common import tiny_esmfold, tiny_mpnn_checkpoint

    tmp = tmp_path_factory.mktemp("tiny_models")
    esm = tmp / "esmfold"
    tiny_esmfold().save_pretrained(str(esm))
    return esm, tiny_mpnn_checkpoint(tmp / "mpnn.pt")


def _evaluate(sdir, models, *extra):
    from superdiff_protein.cli.evaluate import load_config
    from eval.pipeline import evaluate

    esm, ckpt = models
    return evaluate(load_config([f"samples_dir={sdir}", "mpnn.num_seqs=2", "workers=1", "progress=false",
                                 "fold.batch_size=2", "reference=null", f"esmfold={esm}", f"mpnn.weights={ckpt}",
                                 *extra]))


def _generate(out, layout):
    from superdiff_protein.frames.generation import generate

    return generate(models=["exact-helix", "exact-strand"], lengths=[16], samples_per_length=2, num_steps=4,
                    plots=False, progress=False, layout=layout, out_dir=str(out))


def test_evaluate_writes_framediff_sc_results_for_a_framediff_run(tmp_path, tiny_eval_models):
    from eval.pipeline import cache_file
    from eval.sc_results import SC_RESULTS_COLUMNS

    sdir = tmp_path / "fd"
    _generate(sdir, "framediff")
    summary = _evaluate(sdir, tiny_eval_models)
    assert summary["n_samples"] == 2
    for i in range(2):
        sample = sdir / "length_16" / f"sample_{i}"
        sc = sample / "self_consistency"
        with open(sc / "sc_results.csv", newline="") as fh:
            rows = list(csv.reader(fh))
        # pandas' DataFrame.to_csv header of FrameDiff's sc_results.csv: unnamed index, then its five columns
        assert rows[0] == SC_RESULTS_COLUMNS == ["", "tm_score", "sample_path", "header", "sequence", "rmsd"]
        cache = json.loads(cache_file(sdir / "eval", f"length_16/sample_{i}/sample_1.pdb").read_text())
        per_seq = cache["sections"]["fold"]["per_sequence"]
        assert len(rows) == 1 + len(per_seq) == 3
        for k, (row, rec) in enumerate(zip(rows[1:], per_seq)):
            assert row[0] == str(k) and row[4] == rec["sequence"]
            assert float(row[1]) == rec["sc_tm"] and float(row[5]) == rec["sc_rmsd"]
            assert row[2] == str(sc / "esmf" / f"sample_{k}.pdb") and (sc / "esmf" / f"sample_{k}.pdb").is_file()
            assert row[3].startswith(f"T=0.1, sample={k + 1}, score=")
        assert (sc / "sample_1.pdb").read_bytes() == (sample / "sample_1.pdb").read_bytes()
        fasta = (sc / "seqs" / "sample_1.fa").read_text().split("\n")
        assert fasta[0::2][:2] == [f">{r[3]}" for r in rows[1:]] and fasta[1::2][:2] == [r[4] for r in rows[1:]]
    # a rerun evaluates the same two samples: nothing under self_consistency/ is taken for a sample
    assert _evaluate(sdir, tiny_eval_models)["n_samples"] == 2


def test_sc_results_modes(tmp_path, tiny_eval_models):
    flat = tmp_path / "flat"
    _generate(flat, "flat")
    _evaluate(flat, tiny_eval_models)                                       # auto: not a framediff run
    assert not list(flat.rglob("sc_results.csv"))
    _evaluate(flat, tiny_eval_models, "sc_results=true")                    # forced: under out_dir, one folder each
    got = sorted(p.relative_to(flat).as_posix() for p in flat.rglob("sc_results.csv"))
    assert got == [f"eval/self_consistency/length_16__sample_{i}/sc_results.csv" for i in range(2)]
    fd = tmp_path / "fd"
    _generate(fd, "framediff")
    _evaluate(fd, tiny_eval_models, "sc_results=false")
    assert not list(fd.rglob("sc_results.csv")) and not list(fd.rglob("self_consistency"))
