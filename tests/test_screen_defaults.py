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
