"""Exact frame models of generate_backbones, config parsing, and model factories that the CLI tests
load with ``models=[py:test_generate_models:<factory>]`` (this directory on PYTHONPATH)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.exact_frames import EXACT_MODELS, ExactFrameMixture, load_exact_frame_set, load_exact_model
from superdiff_protein.frames.generate_config import GenerateError, parse_lengths
from superdiff_protein.frames.plan import sample_seed
from superdiff_protein.frames.geometry import IDEAL_BACKBONE_LOCAL, backbone_atoms_from_frames, so3_exp
from superdiff_protein.core.spaces import frame_space


# ----------------------------------------------------------------------------- factories (CLI tests)
class _NaNAfter(ExactFrameMixture):
    """An exact model whose translation score turns NaN once t < 0.5 (a diverging network)."""

    def __call__(self, x, t, mask, state):
        out = super().__call__(x, t, mask, state)
        if float(t.min()) < 0.5:
            out.scores["trans"] = out.scores["trans"] * float("nan")
        return out


def nan_model(device=None, dtype=None) -> ExactFrameMixture:
    base = load_exact_model("exact-helix")
    return _NaNAfter(base.chains, base.space, name="nan-model", chain_names=base.chain_names)


def incompatible_model(device=None, dtype=None) -> ExactFrameMixture:
    """An exact model under a different forward SDE (sigma_max 2.0, uncentred, nm): cannot be superposed."""
    return load_exact_model("exact-strand", space=frame_space(sigma_max=2.0))


# ----------------------------------------------------------------------------- the data file
def test_exact_data_file_holds_valid_real_chains():
    d = load_exact_frame_set()
    assert set(d["groups"]) == {"helix", "strand"}
    assert len(d["names"]) == len(d["atoms"]) == len(d["groups"]) == len(d["sources"])
    for name, a in zip(d["names"], d["atoms"]):
        a = a.numpy().astype(np.float64)
        assert a.ndim == 3 and a.shape[1:] == (4, 3) and a.shape[0] >= 100, name
        assert np.isfinite(a).all()
        ca = np.linalg.norm(a[1:, 1] - a[:-1, 1], axis=-1)
        assert 3.7 <= ca.min() and ca.max() <= 3.9, name          # no breaks, no cis peptides
        n_ca = np.linalg.norm(a[:, 0] - a[:, 1], axis=-1)
        assert abs(np.median(n_ca) - 1.46) < 0.03, name             # real backbone geometry


@pytest.mark.parametrize("name", list(EXACT_MODELS))
def test_exact_modes_rebuild_the_real_backbones(name):
    """Mode frames + psi through backbone_atoms_from_frames give back the chain windows' atoms."""
    m = load_exact_model(name, windows_per_chain=2)
    n = 40
    R, x, psi = m.modes(n)
    wins = m.windows(n)
    assert R.shape == (len(wins), n, 3, 3) and x.shape == (len(wins), n, 3) and psi.shape == (len(wins), n, 2)
    eye = torch.eye(3, dtype=R.dtype)
    assert torch.allclose(R.transpose(-1, -2) @ R, eye.expand_as(R), atol=1e-10)
    assert torch.allclose(torch.linalg.det(R), torch.ones(R.shape[:2], dtype=R.dtype), atol=1e-10)
    assert torch.allclose(x.mean(1), torch.zeros(len(wins), 3, dtype=x.dtype), atol=1e-10)
    for k, (ci, s) in enumerate(wins):
        real = m.chains[ci][s:s + n]
        atoms = backbone_atoms_from_frames(R[k], x[k] * m.to_angstrom + real[:, 1].mean(0), psi[k])
        assert torch.allclose(atoms[:, 1], real[:, 1], atol=1e-9)                  # CA exact
        assert (atoms - real).norm(dim=-1).max() < 0.3                              # N, C, O idealised


def test_exact_model_scores_are_gradients_of_its_log_density():
    """Rotation score = body-frame gradient, translation score = gradient of the exact log q_t."""
    torch.manual_seed(0)
    m = load_exact_model("exact-strand", windows_per_chain=3)
    n, B = 12, 3
    R, x, _ = m.modes(n)
    rot = R[:B] @ so3_exp(0.3 * torch.randn(B, n, 3, dtype=torch.float64))
    tr = x[:B] * 0.7 + 0.2 * torch.randn(B, n, 3, dtype=torch.float64)
    for tval in (0.05, 0.3, 0.9):
        t = torch.full((B,), tval, dtype=torch.float64)
        out = m({"rot": rot, "trans": tr}, t, None, None)
        e = torch.zeros(B, n, 3, dtype=torch.float64, requires_grad=True)
        y = tr.clone().requires_grad_(True)
        lp = m.log_prob({"rot": rot @ so3_exp(e), "trans": y}, t)
        ge, gy = torch.autograd.grad(lp.sum(), [e, y])
        torch.testing.assert_close(out.scores["rot"], ge, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(out.scores["trans"], gy, rtol=1e-6, atol=1e-8)
        assert set(out.extras) >= {"pred_rotmats", "pred_trans", "psi"}


def test_exact_prediction_is_the_responsible_window_at_small_t():
    m = load_exact_model("exact-helix", windows_per_chain=2)
    n = 20
    R, x, psi = m.modes(n)
    k = [1, len(R) - 1]
    t = torch.full((2,), 0.02, dtype=torch.float64)
    out = m({"rot": R[k], "trans": x[k] * 0.999}, t, None, None)
    assert out.extras["mode_index"].tolist() == k
    torch.testing.assert_close(out.extras["pred_rotmats"], R[k])
    torch.testing.assert_close(out.extras["pred_trans"], x[k] * m.to_angstrom, atol=0.05, rtol=0)
    torch.testing.assert_close(out.extras["psi"], psi[k])


def test_exact_model_refuses_padding_and_too_long_chains():
    m = load_exact_model("exact-helix")
    with pytest.raises(ValueError, match="supports lengths"):
        m.modes(m.max_length + 1)
    R, x, _ = m.modes(10)
    mask = torch.ones(1, 10)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="padded"):
        m({"rot": R[:1], "trans": x[:1]}, torch.full((1,), 0.5, dtype=torch.float64), mask, None)


def test_ideal_bond_lengths_used_by_the_cli_tests():
    """The reference values the CLI tests compare written PDBs against."""
    n = np.array(IDEAL_BACKBONE_LOCAL["N"])
    c = np.array(IDEAL_BACKBONE_LOCAL["C"])
    o = np.array(IDEAL_BACKBONE_LOCAL["O_in_psi_frame"])
    assert abs(np.linalg.norm(n) - 1.4606) < 1e-3
    assert abs(np.linalg.norm(c) - 1.526) < 1e-3
    assert abs(np.linalg.norm(o) - 1.2333) < 1e-3


# ----------------------------------------------------------------------------- parsing / seeds
@pytest.mark.parametrize("spec, expected", [
    (100, [100]),
    ([60, 100], [60, 100]),
    ("60-100:20", [60, 80, 100]),
    ("60-95:20", [60, 80]),
    ("5-7", [5, 6, 7]),
    ("60,80, 60", [60, 80]),
    ({"start": 60, "stop": 100, "step": 20}, [60, 80, 100]),
    ([50, "60-70:10", 50.0], [50, 60, 70]),
    ("2000", [2000]),
])
def test_parse_lengths(spec, expected):
    assert parse_lengths(spec) == expected


@pytest.mark.parametrize("spec, msg", [
    (0, ">= 1"), ([-5], ">= 1"), ([10, 2001], "maximum"), ("abc", "cannot parse"), ("10-5", "stop < start"),
    ("10-20:0", "step"), ([], "no lengths"), (None, "no lengths"), (12.5, "integer"), ({"start": 1}, "start, stop"),
    ([True], "not a length"), ([[10]], "nested"),
])
def test_parse_lengths_rejects(spec, msg):
    with pytest.raises(GenerateError, match=msg):
        parse_lengths(spec)


def test_sample_seeds_are_stable_distinct_and_in_range():
    seeds = {(s, L, i): sample_seed(s, L, i) for s in (0, 1) for L in (60, 61) for i in range(50)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= v < 2**63 for v in seeds.values())
    assert sample_seed(0, 60, 3) == seeds[(0, 60, 3)]
    assert math.isclose(np.mean([v / 2**63 for v in seeds.values()]), 0.5, abs_tol=0.1)
