"""Backbone refinement (frames/refine.py): the ideal peptide against real chains, what a refinement guarantees on
broken and clashing backbones, that real backbones barely move, rigid-motion equivariance, and the C-N metric."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eval.io import read_backbone
from eval.metrics import BB_CLASH_DIST, C_N_WINDOW, CA_CA_WINDOW, geometry_metrics
from superdiff_protein.core.so3 import so3_exp
from superdiff_protein.frames.geometry import (backbone_atoms_from_frames, dihedral_angle, frames_from_backbone,
                                               psi_from_backbone)
from superdiff_protein.frames.guidance import ClashGuide
from superdiff_protein.frames.refine import _link_distances, peptide_targets, refine_backbone
from superdiff_protein.frames.se3 import SE3Diffuser
from test_eval_common import pdownb_chains

F64 = torch.float64
TOL = 0.01                      # refine_backbone's default stopping tolerance (Angstrom)


@pytest.fixture(scope="module")
def chains():
    got = pdownb_chains(8)
    assert len(got) >= 3
    return got


def _frames(bb):
    a = torch.tensor(bb.atoms, dtype=F64)
    R, T = frames_from_backbone(a[:, 0], a[:, 1], a[:, 2])
    return R, T, psi_from_backbone(a[:, 0], a[:, 1], a[:, 2], a[:, 3])


def _check_refined(r, d0=4.0):
    """What every converged refinement guarantees, checked on the atoms it produces."""
    a = backbone_atoms_from_frames(r.rot, r.trans, r.psi)
    tgt = peptide_targets()
    dev = (_link_distances(a) - torch.tensor([tgt.c_n, tgt.ca_n, tgt.c_ca, tgt.ca_ca], dtype=F64)).abs()
    assert float(dev.max()) <= TOL and r.peptide_max_dev <= TOL
    assert r.min_far_ca >= d0 - TOL
    g = geometry_metrics(a.numpy())
    assert g["ca_ca_valid_frac"] == 1.0 and g["c_n_valid_frac"] == 1.0
    assert g["n_ca_clashes"] == 0 and g["n_bb_clashes"] == 0
    # omega: the targets are a planar trans peptide
    omega = dihedral_angle(a[:-1, 1], a[:-1, 2], a[1:, 0], a[1:, 1])
    assert float((math.pi - omega.abs()).max()) < math.radians(5)
    # O from the recomputed psi lies in the peptide plane, trans to the next N (O-C-N-CA dihedral ~ 0)
    o_dih = dihedral_angle(a[:-1, 3], a[:-1, 2], a[1:, 0], a[1:, 1])
    assert float(o_dih.abs().max()) < math.radians(5)
    assert r.converged and "links ideal" in r.summary()
    return a


def test_ideal_peptide_matches_real_chains(chains):
    """The targets are built from constants; real X-ray chains are independent data. Their medians agree within
    half a standard deviation of the chains' own spread (and CA-CA is the textbook 3.80 A)."""
    links = torch.cat([_link_distances(torch.tensor(bb.atoms, dtype=F64)) for bb in chains])
    tgt = peptide_targets()
    med, sd = links.median(0).values, links.std(0)
    for k, v in enumerate((tgt.c_n, tgt.ca_n, tgt.c_ca, tgt.ca_ca)):
        assert abs(float(med[k]) - v) <= 0.5 * float(sd[k]), (k, float(med[k]), v, float(sd[k]))
    assert abs(tgt.ca_ca - 3.80) < 0.02


def test_real_backbones_barely_move(chains):
    """A real chain rebuilt from its frames (ideal residues) is already near ideal: refinement moves its CAs by
    about the residues' own deviation from ideal geometry, a few hundredths of an Angstrom."""
    for bb in chains:
        R, T, psi = _frames(bb)
        r = refine_backbone(R, T, psi)
        _check_refined(r)
        assert r.ca_rmsd < 0.25, (bb.name, r.ca_rmsd)


def test_broken_and_clashing_backbones_are_repaired(chains):
    """Real chains with every residue knocked by ~10 degrees and ~0.4 A, and a segment pushed into the chain: the
    result meets every guarantee and stays close to the original chain."""
    g = torch.Generator().manual_seed(0)
    for bb in chains[:4]:
        R, T, psi = _frames(bb)
        n = T.shape[0]
        Rn = so3_exp(0.17 * torch.randn(n, 3, generator=g, dtype=F64)) @ R
        Tn = T + 0.4 * torch.randn(n, 3, generator=g, dtype=F64)
        far = torch.cdist(T, T) + 1e3 * ((torch.arange(n)[:, None] - torch.arange(n)[None]).abs() < 8)
        i, j = divmod(int(far.argmin()), n)                                         # closest far-apart pair
        Tn[j] += 0.8 * (T[i] - T[j])                                                # j nearly on top of i
        before = geometry_metrics(backbone_atoms_from_frames(Rn, Tn, psi).numpy())
        assert before["n_ca_clashes"] > 0 and before["c_n_valid_frac"] < 0.9      # the case is broken
        r = refine_backbone(Rn, Tn, psi)
        _check_refined(r)
        assert float((r.trans - T).pow(2).sum(-1).mean().sqrt()) < 1.0


def test_refinement_is_equivariant_under_rigid_motions(chains):
    bb = chains[0]
    R, T, psi = _frames(bb)
    g = torch.Generator().manual_seed(1)
    Rn = so3_exp(0.2 * torch.randn(T.shape[0], 3, generator=g, dtype=F64)) @ R
    Tn = T + 0.3 * torch.randn(T.shape[0], 3, generator=g, dtype=F64)
    G = so3_exp(torch.tensor([0.3, -1.2, 2.0], dtype=F64))
    shift = torch.tensor([5.0, -7.0, 11.0], dtype=F64)
    r1 = refine_backbone(Rn, Tn, psi)
    r2 = refine_backbone(G @ Rn, Tn @ G.T + shift, psi)
    # Exact arithmetic would give the same path. With rounding, the stop (checked every chunk against TOL) can fall
    # a chunk apart, and L-BFGS moves freely along the nearly flat phi/psi directions: inputs that differ by 1e-12 A
    # were measured to end up to 0.06 A apart (typically < 1e-6 A; docs/superposition.md, "Refinement"). A frame
    # error (e.g. rotating about the wrong point) would move whole residues by Angstroms.
    moved = r1.trans @ G.T + shift
    assert float((moved - r2.trans).norm(dim=-1).max()) <= 0.15
    assert float((G @ r1.rot - r2.rot).abs().max()) <= 0.15
    _check_refined(r2)


def test_an_unfinished_refinement_says_so(chains):
    bb = chains[0]
    R, T, psi = _frames(bb)
    g = torch.Generator().manual_seed(2)
    r = refine_backbone(so3_exp(0.3 * torch.randn(T.shape[0], 3, generator=g, dtype=F64)) @ R, T, psi, max_iters=3,
                        chunk=3)
    assert not r.converged and r.peptide_max_dev > TOL
    assert "NOT converged in 3 evaluations" in r.summary()


def test_single_residue_and_no_psi():
    R = torch.eye(3, dtype=F64)[None]
    T = torch.zeros(1, 3, dtype=F64)
    r = refine_backbone(R, T, None)
    assert r.iters == 0 and r.converged and torch.equal(r.trans, T) and torch.equal(r.rot, R)
    assert torch.allclose(r.psi, torch.tensor([[0.0, -1.0]], dtype=F64))


def test_guide_finalize_is_the_refinement_with_its_own_distance(chains):
    bb = chains[1]
    R, T, psi = _frames(bb)
    guide = ClashGuide(SE3Diffuser().space, 10.0, weight=0.5, d0=4.5)
    r = guide.finalize(R, T, psi)
    ref = refine_backbone(R, T, psi, d0=4.5)
    assert torch.equal(r.trans, ref.trans) and torch.equal(r.rot, ref.rot)
    _check_refined(r, d0=4.5)


def test_c_n_metric_counts_broken_links(chains):
    bb = chains[0]
    g = geometry_metrics(bb.atoms)
    assert g["c_n_valid_frac"] == 1.0 and abs(g["c_n_mean"] - 1.329) < 0.02
    x = bb.atoms.astype(np.float64).copy()
    u = (x[10, 0] - x[9, 2]) / np.linalg.norm(x[10, 0] - x[9, 2])
    x[10:] += 0.5 * u                                     # one link stretched by 0.5 A along the bond
    cn = np.linalg.norm(x[9, 2] - x[10, 0])
    g2 = geometry_metrics(x)
    expect_bad = not (C_N_WINDOW[0] <= cn <= C_N_WINDOW[1])
    assert expect_bad
    assert g2["c_n_valid_frac"] == pytest.approx(1.0 - 1.0 / (bb.length - 1))
    assert math.isnan(geometry_metrics(bb.ca)["c_n_valid_frac"])      # CA-only: unknown
    assert CA_CA_WINDOW[0] < 3.8 < CA_CA_WINDOW[1] and BB_CLASH_DIST < 2.7   # the refinement's margins hold


# ------------------------------------------------------------------------------ the option in generate_backbones
TINY = dict(models=["exact-helix", "exact-strand"], lengths=[12], samples_per_length=2, num_steps=6, plots=False,
            progress=False)


def test_generate_refine_option_is_recorded_and_refused_on_resume(tmp_path):
    import yaml

    from superdiff_protein.frames.generate_config import GenerateError
    from superdiff_protein.frames.generation import generate

    generate(out_dir=str(tmp_path / "plain"), **TINY)
    plain = (tmp_path / "plain" / "length_12" / "sample_0.pdb").read_text()
    assert "refined:" not in plain                                    # off by default
    out = tmp_path / "prediction"
    generate(out_dir=str(out), refine=True, **TINY)
    text = (out / "length_12" / "sample_0.pdb").read_text()
    assert "refined: CA moved" in text and "links ideal, no clashes" in text
    g = geometry_metrics(read_backbone(out / "length_12" / "sample_0.pdb").atoms)
    assert g["c_n_valid_frac"] == 1.0 and g["n_ca_clashes"] == 0 and g["n_bb_clashes"] == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["refine"] is True
    # final=state is refined too. After 6 steps the exact models' state is still noise (CA-CA ~25 A); the refinement
    # may or may not make a chain of it in 500 evaluations (seen both ways across CPUs); a remark that does not say
    # "NOT converged" must hold
    generate(out_dir=str(tmp_path / "state"), refine=True, final="state", **TINY)
    for pdb in sorted((tmp_path / "state" / "length_12").glob("sample_*.pdb")):
        text = pdb.read_text()
        assert "refined: CA moved" in text
        g = geometry_metrics(read_backbone(pdb).atoms)
        ideal = g["c_n_valid_frac"] == 1.0 and g["ca_ca_valid_frac"] == 1.0 and g["n_ca_clashes"] == 0
        assert "NOT converged" in text or ideal, (pdb.name, g)     # a converged refinement is ideal by the eval too
    with pytest.raises(Exception, match="other settings"):
        generate(out_dir=str(tmp_path / "prediction"), refine=False, **TINY)
    with pytest.raises(GenerateError, match="refine"):
        generate(out_dir=str(tmp_path / "bad"), refine="maybe", **TINY)
    assert not (tmp_path / "bad").exists()


def _pdb_atoms(path) -> np.ndarray:
    """(L, 4, 3) N, CA, C, O of a PDB we wrote (fixed columns; no biotite, which the GPU image lacks)."""
    xyz = [[float(ln[30:38]), float(ln[38:46]), float(ln[46:54])] for ln in path.read_text().splitlines()
           if ln.startswith("ATOM") and ln[12:16].strip() in ("N", "CA", "C", "O")]
    return np.asarray(xyz, dtype=np.float64).reshape(-1, 4, 3)


@pytest.mark.gpu
def test_cuda_inputs_and_a_guided_cuda_run(tmp_path):
    """Frames on CUDA are refined on the CPU (the same result as CPU inputs); a guided, refined run on CUDA writes
    ideal backbones."""
    from superdiff_protein.frames.generation import generate

    g = torch.Generator().manual_seed(3)
    R = so3_exp(torch.randn(30, 3, generator=g, dtype=F64))
    T = torch.cumsum(torch.randn(30, 3, generator=g, dtype=F64), 0) * 2.0
    cpu = refine_backbone(R, T, None)
    gpu = refine_backbone(R.cuda(), T.cuda(), None)
    assert gpu.trans.device.type == "cpu" and torch.equal(gpu.trans, cpu.trans)
    out = tmp_path / "cuda"
    generate(out_dir=str(out), device="cuda", clash_guidance={"weight": 0.5, "t_max": 1.0}, refine=True, **TINY)
    for pdb in sorted((out / "length_12").glob("sample_*.pdb")):
        assert "links ideal, no clashes" in pdb.read_text()
        m = geometry_metrics(_pdb_atoms(pdb))
        assert m["c_n_valid_frac"] == 1.0 and m["n_ca_clashes"] == 0
