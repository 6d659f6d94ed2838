"""scripts/bond_check.py: local geometry of a frame model's clean predictions from noised real chains."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from script_loader import load_script
from test_pdb_io import pdownb_chain_dir  # noqa: F401  (session fixture)

REPO = Path(__file__).resolve().parents[1]


def test_pairs_and_window_count_only_file_neighbours():
    mod = load_script("bond_check")
    # steps along x: 3.8, 3.65, 3.95 (in), 3.5, 4.1 (out); residue 6 is padding
    ca = torch.zeros(1, 7, 3)
    ca[0, 1:6, 0] = torch.cumsum(torch.tensor([3.8, 3.65, 3.95, 3.5, 4.1]), 0)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    rid = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    pairs = mod.neighbour_pairs(mask, rid)
    assert pairs.tolist() == [[True] * 5 + [False]]
    assert mod.in_range_share(ca, pairs) == pytest.approx(3 / 5)
    # a numbering gap between residues 2 and 3 (ids 3 -> 10) removes that pair: the 3.95 A step is not a bond
    rid_gap = torch.tensor([[1, 2, 3, 10, 11, 12, 13]])
    pairs = mod.neighbour_pairs(mask, rid_gap)
    assert pairs.tolist() == [[True, True, False, True, True, False]]
    assert mod.in_range_share(ca, pairs) == pytest.approx(2 / 4)
    with pytest.raises(ValueError):
        mod.in_range_share(ca, torch.zeros_like(pairs))


def test_shipped_strand_model_end_to_end(pdownb_chain_dir, tmp_path, capsys):  # noqa: F811
    from superdiff_protein.frames.data import prepare_dataset

    mod = load_script("bond_check")
    ds = tmp_path / "tiny.pt"
    prepare_dataset(pdownb_chain_dir, ds, progress=False, min_length=30)
    ck = str(REPO / "models" / "checkpoints" / "default_strand.pt")
    assert mod.main([str(ds), "all", ck, "--t", "0.002", "0.3", "--n", "4", "--max-length", "64"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| checkpoint | t = 0.002 | t = 0.3 |") and out[2].startswith(f"| {ck} |")
    # a trained model nearly reproduces bond lengths from almost clean input, and cannot at t = 0.3, where its
    # prediction is a posterior mean (shorter bonds)
    from superdiff_protein.frames.data import FrameDataset, collate_frames

    d = FrameDataset(str(ds), max_length=64, crop="center")
    r = mod.check(ck, collate_frames([d[i] for i in range(len(d))]), [0.002, 0.3])
    assert r["sc"][0] > 0.8 and r["sc"][1] < r["sc"][0] - 0.3
    assert mod.main([str(tmp_path / "absent.pt"), "all", ck]) == 2
    assert "error:" in capsys.readouterr().err
