"""scripts/cap_half.py: the capped-half dataset copies of the issue 17 data experiments."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from superdiff_protein.errors import UserError

from script_loader import load_script

REPO = Path(__file__).resolve().parents[1]


def _script():
    return load_script("cap_half")


def _data(n: int = 40, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    frac = rng.dirichlet([1.0, 1.0, 1.0], size=n)
    order = np.argsort(frac[:, 0] - frac[:, 1])
    return {"ss_frac": torch.from_numpy(frac), "lengths": torch.from_numpy(rng.integers(40, 200, size=n)),
            "splits": {"ss": {"strand": torch.from_numpy(order[: n // 2]), "helix": torch.from_numpy(order[n // 2:]),
                              "stats": {"method": "test"}}, "other": "kept"}}


@pytest.mark.parametrize("half, column, cap", [("helix", "helix", 0.5), ("strand", "coil", 0.4),
                                               ("strand", "strand", 0.3)])
def test_only_the_chosen_half_is_cut_and_exactly_at_the_cap(half, column, cap):
    data = _data()
    out = _script().cap_half(data, half, column, cap)
    col = ("helix", "strand", "coil").index(column)
    frac = data["ss_frac"].numpy()
    before, after = data["splits"]["ss"][half].numpy(), out["splits"]["ss"][half].numpy()
    assert set(after) == {i for i in before if frac[i, col] <= cap}
    assert 0 < len(after) < len(before)
    other = "strand" if half == "helix" else "helix"
    assert torch.equal(out["splits"]["ss"][other], data["splits"]["ss"][other])
    assert out["splits"]["other"] == "kept"
    st = out["splits"]["ss"]["stats"][f"{half}_cap"]
    assert st["chains"] == len(after) and st["chains_before"] == len(before)
    np.testing.assert_allclose(st["chain_mean_helix_strand_coil"], frac[after].mean(0), atol=1e-4)
    assert "stats" in data["splits"]["ss"] and f"{half}_cap" not in data["splits"]["ss"]["stats"]   # input untouched


def test_a_cap_that_keeps_nothing_is_a_user_error():
    with pytest.raises(UserError, match="no chain"):
        _script().cap_half(_data(), "strand", "coil", 1e-6)


def test_cli_bad_file_exits_2_without_output(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a dataset")
    out = tmp_path / "out.pt"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "cap_half.py"), str(bad), str(out), "--half", "strand",
                        "--column", "coil", "--max", "0.7"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
