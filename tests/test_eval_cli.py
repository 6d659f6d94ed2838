"""evaluate_backbones end to end through a subprocess, resume, bad input, and the results notebook."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_eval_common import pdownb_chains, tiny_esmfold, tiny_mpnn_checkpoint, write_sample_dir

REPO = Path(__file__).resolve().parents[1]
CONTRACT_CSV = ["path", "length", "novelty_max_tm", "helix_frac", "strand_frac", "coil_frac", "sc_rmsd", "sc_tm",
                "designable"]
CONTRACT_SUMMARY = ["n_samples", "pairwise_tm_mean", "n_clusters", "cluster_fraction", "cluster_tm_threshold"]


def run_cli(*args, env=None):
    e = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "superdiff_protein.cli.evaluate", *args], capture_output=True, text=True, env=e,
                          cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    chains = pdownb_chains(4)
    sdir = write_sample_dir(tmp / "samples", chains)
    (sdir / f"length_{chains[0].length}" / "sample_0_traj.pdb").write_text("garbage")  # trajectories ignored
    (sdir / "broken.pdb").write_text("this is not a PDB file\n")
    ref = tmp / "ref"
    ref.mkdir()
    for bb in chains[:2]:
        (ref / f"{bb.name}.pdb").write_text((sdir / f"length_{bb.length}" / f"sample_{chains.index(bb)}.pdb").read_text())
    esm = tmp / "esmfold"
    tiny_esmfold().save_pretrained(str(esm))
    ckpt = tiny_mpnn_checkpoint(tmp / "mpnn.pt")
    args = [f"samples_dir={sdir}", f"reference={ref}", f"esmfold={esm}", f"mpnn.weights={ckpt}", "mpnn.num_seqs=2",
            "workers=1", "fold.batch_size=2"]
    proc = run_cli(*args)
    return sdir, args, proc, chains


def _rows(sdir):
    with open(sdir / "eval" / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_cli_outputs_contract(evaluated):
    sdir, _, proc, chains = evaluated
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = sdir / "eval"
    rows = _rows(sdir)
    assert set(CONTRACT_CSV) <= set(rows[0])
    assert len(rows) == len(chains) + 1  # + the broken file, recorded not fatal
    broken = [r for r in rows if r["path"] == "broken.pdb"][0]
    assert broken["error"] and broken["length"] == ""
    good = [r for r in rows if r["path"] != "broken.pdb"]
    assert all(r["sc_rmsd"] and r["sc_tm"] and r["novelty_max_tm"] and r["helix_frac"] for r in good)
    assert {r["method"] for r in good} == {"sum:framediff+proteus", "mixture:framediff+proteus"}
    summary = json.loads((out / "summary.json").read_text())
    assert set(CONTRACT_SUMMARY) <= set(summary)
    assert summary["n_samples"] == len(chains) + 1 and summary["n_failed"] == 1
    assert summary["cluster_tm_threshold"] == 0.5
    assert 1 <= summary["n_clusters"] <= len(chains)
    for f in ("table.csv", "table.md", "plots/metric_histograms.png", "plots/pairwise_tm.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    md = (out / "table.md").read_text()
    assert "Designable" in md and "±" in md
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_cli_resume_skips_work(evaluated):
    sdir, args, proc, _ = evaluated
    assert proc.returncode == 0
    before = {p: p.stat().st_mtime_ns for p in (sdir / "eval" / "cache").glob("*.json")}
    rows_before = _rows(sdir)
    again = run_cli(*args, "progress=true")
    assert again.returncode == 0, again.stderr[-3000:]
    # no per-sample work redone: progress bars of the model stages never start, caches of good samples untouched
    assert "ProteinMPNN:" not in again.stderr and "ESMFold self-consistency:" not in again.stderr
    after = {p: p.stat().st_mtime_ns for p in (sdir / "eval" / "cache").glob("*.json")}
    unchanged = [p for p in before if "broken" not in p.name and before[p] == after[p]]
    assert len(unchanged) == len(before) - 1
    assert _rows(sdir) == rows_before


@pytest.mark.parametrize("args,needle", [
    (["samples_dir=/definitely/not/here"], "not a directory"),
    ([], "samples_dir is required"),
    (["samples_dir={empty}"], "no structure files"),
    (["samples_dir={samples}", "reference=/no/such/reference"], "reference"),
    (["samples_dir={samples}", "no_such_key=1"], "unknown option 'no_such_key'"),
])
def test_cli_bad_input_exits_nonzero(tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    samples = write_sample_dir(tmp_path / "samples", pdownb_chains(1))
    args = [a.format(empty=tmp_path / "empty", samples=samples) for a in args]
    proc = run_cli(*args)
    assert proc.returncode != 0
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_cli_without_esmfold_weights_explains_and_computes_rest(tmp_path):
    sdir = write_sample_dir(tmp_path / "s", pdownb_chains(2), with_csv=False)
    proc = run_cli(f"samples_dir={sdir}", f"out_dir={tmp_path / 'out'}", f"esmfold={tmp_path / 'no_esmfold'}",
                   "mpnn.enabled=false", "workers=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "facebook/esmfold_v1" in proc.stderr and "hf download" in proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))
    assert all(r["helix_frac"] and r["sc_rmsd"] == "" and r["designable"] == "" and r["method"] == "all"
               for r in rows)


def test_notebook_executes_on_results(evaluated):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    sdir, _, proc, _ = evaluated
    assert proc.returncode == 0
    nb = nbformat.read(REPO / "eval" / "notebooks" / "evaluate_results.ipynb", as_version=4)
    old = dict(os.environ)
    os.environ.update(EVAL_RESULTS_DIR=str(sdir / "eval"), EVAL_SAMPLES_DIR=str(sdir), MPLBACKEND="Agg",
                      PYTHONPATH=str(REPO))
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum(1 for o in outputs if "image/png" in o.get("data", {})) >= 3  # plots + 3-D view
