"""scripts/caca_by_ss.py: consecutive CA–CA in range per secondary-structure class of the pair."""
from __future__ import annotations

import numpy as np
import pytest

from script_loader import load_script


def _script():
    return load_script("caca_by_ss")


def test_pair_counts_classes_and_bounds():
    mod = _script()
    # steps along x: 3.8 (in), 3.6 (in, bound), 4.0 (in, bound), 3.5 (out), 4.1 (out), 3.8, NaN residue
    steps = [3.8, 3.6, 4.0, 3.5, 4.1, 3.8]
    ca = np.zeros((8, 3))
    ca[1:7, 0] = np.cumsum(steps)
    ca[7] = np.nan
    sse = "aaabbcc-"
    # pairs: (0,1) a-a in, (1,2) a-a in, (2,3) a-b other in, (3,4) b-b out, (4,5) b-c other out,
    #        (5,6) c-c other in, (6,7) c-- other NaN -> out
    got = mod.pair_counts(ca, sse)
    assert got == {"helix": (2, 2), "strand": (0, 1), "other": (2, 4)}
    with pytest.raises(ValueError):
        mod.pair_counts(ca, sse[:-1])


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    mod = _script()
    assert mod.main([str(tmp_path)]) == 2
    assert "no .pdb files" in capsys.readouterr().err
