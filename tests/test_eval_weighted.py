"""evaluate_backbones' importance-weighted means for runs of the FKC rules (issue 15, docs/fkc.md)."""
import math

import pytest

from eval.report import weighted_means


def test_weighted_means_normalise_within_groups_and_average_groups():
    rows = [
        {"method": "m", "group": "L10_g0", "log_weight": math.log(3.0), "mpnn_ll": -1.0, "helix_frac": 0.5},
        {"method": "m", "group": "L10_g0", "log_weight": 0.0, "mpnn_ll": -2.0, "helix_frac": 0.1},
        {"method": "m", "group": "L10_g1", "log_weight": 5.0, "mpnn_ll": -0.5, "helix_frac": None},
    ]
    w = weighted_means(rows)
    assert w["n_groups"] == 2
    # group 0: (3 * -1 + 1 * -2) / 4 = -1.25; group 1: -0.5 -> mean -0.875
    assert w["mpnn_ll_mean"] == pytest.approx(-0.875, abs=1e-12)
    # helix: group 1 has no value -> only group 0: (3 * 0.5 + 0.1) / 4
    assert w["helix_frac_mean"] == pytest.approx(0.4, abs=1e-12)


def test_no_weights_no_weighted_block():
    assert weighted_means([{"method": "m", "mpnn_ll": -1.0}]) is None
