"""scripts/plot_default_progress.py: it pools seeds with equal weight, reads ProteinMPNN where the model card's
protocol writes it, draws the figure, and refuses a missing evaluation with exit 2."""
from __future__ import annotations

import json
import math

import pytest

from script_loader import load_script


def _eval(prefix, seed, clash_free, ca_ca, mpnn=None):
    d = prefix.parent / f"{prefix.name}_s{seed}"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"strand": {"clash_free": clash_free, "ca_ca": ca_ca}}))
    if mpnn is not None:
        m = prefix.parent / "mpnn_full" / f"{prefix.name}_s{seed}_strand"
        m.mkdir(parents=True)
        (m / "metrics.csv").write_text("path,mpnn_ll\n" + "".join(f"x{i}.pdb,{v}\n" for i, v in enumerate(mpnn)))


def test_load_pools_seeds_and_mpnn(tmp_path):
    p = tmp_path / "r" / "eval"
    _eval(p, 0, 0.75, 0.96, [-1.0, -1.2])
    _eval(p, 1, 0.25, 0.98, [-1.4, ""])          # an empty mpnn cell (no score) is skipped
    out = load_script("plot_default_progress").load(p)
    assert out["seeds"] == ["0", "1"]
    assert out["strand"]["clash_free"] == pytest.approx(0.5)
    assert out["strand"]["ca_ca"] == pytest.approx(0.97)
    m, se, n = out["strand"]["mpnn"]
    assert n == 3 and m == pytest.approx(-1.2)
    assert se == pytest.approx(math.sqrt(((0.2 ** 2) * 2) / 2 / 3))
    assert "helix" not in out


def test_main_writes_the_png_and_refuses_a_missing_eval(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    sc = load_script("plot_default_progress")
    p = tmp_path / "eval"
    _eval(p, 0, 0.9, 0.99, [-1.3, -1.5])
    png = tmp_path / "img" / "progress.png"
    assert sc.main([f"a={p}", "--out", str(png)]) == 0
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(png.parent.glob("*.tmp.png"))
    assert sc.main([f"b={tmp_path / 'nothing'}", "--out", str(tmp_path / 'x.png')]) == 2
    assert sc.main(["no-equals-sign", "--out", str(tmp_path / 'x.png')]) == 2
    assert not (tmp_path / "x.png").exists()
    assert "error:" in capsys.readouterr().err
