"""scripts/clash_separation.py: CA clashes split by sequence separation."""
from __future__ import annotations

import numpy as np
import pytest

from eval.metrics import geometry_metrics
from script_loader import load_script
from superdiff_protein.frames.pdb_io import write_backbone_pdb


def _chain_with_clashes(n: int = 30) -> np.ndarray:
    """(n, 4, 3) backbone on a straight line, 3.8 A per residue, then residue 20 moved onto residue 2
    (|i-j| = 18, 1.0 A) and residue 9 to 2.5 A from residue 5 (|i-j| = 4)."""
    ca = np.zeros((n, 3))
    ca[:, 0] = np.arange(n) * 3.8
    ca[20] = ca[2] + np.array([0.0, 1.0, 0.0])
    ca[9] = ca[5] + np.array([0.0, 0.0, 2.5])
    offs = np.array([[-1.2, 0.8, 0.0], [0.0, 0.0, 0.0], [1.2, 0.8, 0.0], [1.9, 1.8, 0.0]])
    return ca[:, None, :] + offs[None] * 0.3


def test_counts_and_classes_match_the_eval_metric(tmp_path):
    mod = load_script("clash_separation")
    atoms = _chain_with_clashes()
    write_backbone_pdb(tmp_path / "a.pdb", atoms)
    (tmp_path / "sub").mkdir()
    write_backbone_pdb(tmp_path / "sub" / "b.pdb", atoms[:15])
    sep, dist = mod.clash_pairs(atoms[:, 1])
    assert sorted(sep.tolist()) == [4, 18]
    assert sorted(np.round(dist, 6).tolist()) == [1.0, 2.5]
    r = mod.summarise(tmp_path)
    # the same clashes the evaluation counts: a.pdb has both, b.pdb (residues 0-14) only the |i-j| = 4 one
    expected = geometry_metrics(atoms)["n_ca_clashes"] + geometry_metrics(atoms[:15])["n_ca_clashes"]
    assert r["samples"] == 2 and r["clashes_per_sample"] == pytest.approx(expected / 2) == pytest.approx(1.5)
    assert r["shares"] == pytest.approx({"3-4": 2 / 3, "5-6": 0.0, "7-12": 0.0, ">12": 1 / 3})
    assert r["median_distance"] == pytest.approx(2.5)


def test_empty_folder_exits_2(tmp_path, capsys):
    mod = load_script("clash_separation")
    assert mod.main([str(tmp_path)]) == 2
    assert "no .pdb files" in capsys.readouterr().err
