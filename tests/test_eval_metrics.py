"""Metric correctness on real pdownb structures against independent computations."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from eval.metrics import geometry_metrics, kabsch, radius_of_gyration, secondary_structure, superposed_rmsd, \
    tm_align, tm_score
from eval.novelty import cluster, diversity, novelty, pairwise_tm
from eval.reference import _from_chains
from test_eval_common import pdownb_chains, random_rotation


@pytest.fixture(scope="module")
def chains():
    return pdownb_chains(8)


def test_kabsch_rmsd_matches_scipy_align_vectors(chains):
    rng = np.random.default_rng(0)
    for a, b in zip(chains, chains[1:]):
        n = min(a.length, b.length)
        p, q = a.ca[:n], b.ca[:n]
        ours = superposed_rmsd(p, q)
        # independent: scipy's optimal rotation on centred points
        pc, qc = p - p.mean(0), q - q.mean(0)
        rot, _ = Rotation.align_vectors(qc, pc)
        ref = np.sqrt(((rot.apply(pc) - qc) ** 2).sum(-1).mean())
        assert ours == pytest.approx(ref, abs=1e-8)
        r, t = kabsch(p, q)
        assert np.allclose(r @ r.T, np.eye(3), atol=1e-12) and np.linalg.det(r) == pytest.approx(1.0, abs=1e-12)
        assert superposed_rmsd(p @ random_rotation(rng).T + 3.0, q) == pytest.approx(ours, abs=1e-8)


def test_self_and_rigid_copy(chains):
    rng = np.random.default_rng(1)
    for bb in chains:
        moved = bb.ca @ random_rotation(rng).T + rng.normal(scale=20.0, size=3)
        assert superposed_rmsd(bb.ca, bb.ca) == pytest.approx(0.0, abs=1e-9)
        assert superposed_rmsd(moved, bb.ca) == pytest.approx(0.0, abs=1e-6)
        assert tm_score(bb.ca, bb.ca, bb.sequence, bb.sequence) == pytest.approx(1.0, abs=1e-6)
        assert tm_score(moved, bb.ca) == pytest.approx(1.0, abs=1e-4)
        assert radius_of_gyration(moved) == pytest.approx(radius_of_gyration(bb.ca), abs=1e-9)


def test_different_folds_low_tm_and_normalisation(chains):
    tms = []
    for a in chains:
        for b in chains:
            if a.name != b.name:
                r = tm_align(a.ca, b.ca)
                tms.append(r.tm_norm_1)
                # normalised by the first (sample) structure's length: the shorter one scores higher
                if a.length < b.length:
                    assert r.tm_norm_1 >= r.tm_norm_2 - 1e-9
    assert np.median(tms) < 0.4
    # a fragment of a chain inside the full chain: TM normalised by the fragment length is high
    bb = chains[0]
    frag = bb.ca[5:bb.length - 5]
    assert tm_score(frag, bb.ca) > 0.9
    assert tm_align(frag, bb.ca).tm_norm_2 < tm_score(frag, bb.ca)


def test_secondary_structure_ideal_helix_and_real_chains(chains):
    # ideal alpha helix: 1.5 A rise, 100 deg per residue, radius 2.3 A
    k = np.arange(30)
    helix = np.stack([2.3 * np.cos(np.deg2rad(100 * k)), 2.3 * np.sin(np.deg2rad(100 * k)), 1.5 * k], -1)
    ss = secondary_structure(helix)
    assert ss["helix_frac"] > 0.8
    # ideal extended strand: zig-zag with 3.3 A rise per residue
    strand = np.stack([3.3 * k, 0.9 * (-1) ** k, np.zeros_like(k, dtype=float)], -1)
    for bb in chains:
        s = secondary_structure(bb.ca, bb.res_ids)
        assert s["helix_frac"] + s["strand_frac"] + s["coil_frac"] == pytest.approx(1.0)
        assert len(s["sse"]) == bb.length
    assert secondary_structure(strand)["helix_frac"] == 0.0


def test_geometry_sanity(chains):
    for bb in chains:
        g = geometry_metrics(bb.coords)
        assert 3.7 < g["ca_ca_mean"] < 3.9 and g["ca_ca_valid_frac"] > 0.9
        assert g["n_ca_clashes"] == 0 and g["n_bb_clashes"] == 0 and g["n_chain_breaks"] == 0
    # collapse two distant residues onto each other -> a CA clash and backbone clashes
    x = chains[0].coords.copy()
    x[20] = x[5] + 0.5
    g = geometry_metrics(x)
    assert g["n_ca_clashes"] >= 1 and g["n_bb_clashes"] >= 1
    # CA-only input: backbone clashes unknown, CA metrics still there
    g = geometry_metrics(chains[0].ca)
    assert np.isnan(g["n_bb_clashes"]) and g["ca_ca_valid_frac"] > 0.9


def test_clustering_hand_made():
    # two tight groups {0,1,2} and {3,4}, plus a singleton 5
    s = np.full((6, 6), 0.2)
    for grp in ([0, 1, 2], [3, 4]):
        for i in grp:
            for j in grp:
                s[i, j] = 0.8
    np.fill_diagonal(s, 1.0)
    for method in ("greedy", "single", "average", "complete"):
        lab = cluster(s, 0.5, method)
        assert len(set(lab)) == 3
        assert lab[0] == lab[1] == lab[2] and lab[3] == lab[4] and len({lab[0], lab[3], lab[5]}) == 3
    assert len(set(cluster(s, 0.1))) == 1 and len(set(cluster(s, 0.9))) == 6
    d = diversity(s, 0.5)
    assert d["n_clusters"] == 3 and d["cluster_fraction"] == pytest.approx(0.5)
    assert d["pairwise_tm_mean"] == pytest.approx(s[~np.eye(6, dtype=bool)].mean())


def test_pairwise_and_clustering_real(chains):
    rng = np.random.default_rng(2)
    cas = [bb.ca for bb in chains[:4]]
    cas += [c @ random_rotation(rng).T + 5.0 for c in cas[:2]]  # rigid copies of 0 and 1
    t = pairwise_tm(cas)
    assert t[0, 4] == pytest.approx(1.0, abs=1e-4) and t[1, 5] == pytest.approx(1.0, abs=1e-4)
    ref = tm_align(cas[2], cas[3])
    assert (t[2, 3], t[3, 2]) == pytest.approx((ref.tm_norm_1, ref.tm_norm_2))
    d = diversity(t, 0.5)
    assert d["labels"][0] == d["labels"][4] and d["labels"][1] == d["labels"][5]
    assert d["n_clusters"] == len(set(d["labels"][:4]))
    # resume: known pairs are used, not recomputed
    known = {(0, 1): (0.123, 0.456)}
    t2 = pairwise_tm(cas, known=known)
    assert t2[0, 1] == 0.123 and t2[1, 0] == 0.456


def test_novelty_exact_prefilter_equals_brute_force(chains):
    rng = np.random.default_rng(3)
    ref_chains = [(bb.name, bb.sequence, bb.ca) for bb in chains[2:]]
    # include a truncated copy so the length bound is exercised
    ref_chains.append(("short", chains[0].sequence[:15], chains[0].ca[:15]))
    ref = _from_chains(ref_chains)
    queries = [(chains[0].ca + rng.normal(scale=0.5, size=chains[0].ca.shape), chains[0].sequence),
               (chains[1].ca, chains[1].sequence), (chains[3].ca @ random_rotation(rng).T, chains[3].sequence)]
    res = novelty(queries, ref, workers=1)
    for (ca, seq), r in zip(queries, res):
        brute = max(tm_align(ca, ref.chain(i), seq, str(ref.sequences[i])).tm_norm_1 for i in range(len(ref)))
        assert r.max_tm == pytest.approx(brute, abs=1e-12) and r.exact
    assert res[2].max_tm == pytest.approx(1.0, abs=1e-4) and res[2].best_ref == chains[3].name
    assert res[2].n_skipped_bound >= 1  # after the perfect hit nothing can beat the bound
    heur = novelty(queries, ref, workers=1, top_k=2)
    assert all(h.max_tm <= r.max_tm + 1e-12 and not h.exact and h.n_aligned <= 2 for h, r in zip(heur, res))


def test_novelty_parallel_matches_serial(chains):
    ref = _from_chains([(bb.name, bb.sequence, bb.ca) for bb in chains[3:6]])
    queries = [(bb.ca, bb.sequence) for bb in chains[:3]]
    serial = [r.max_tm for r in novelty(queries, ref, workers=1)]
    par = [r.max_tm for r in novelty(queries, ref, workers=2)]
    assert par == pytest.approx(serial, abs=1e-12)


def test_prepare_reference_from_tar_and_npz(tmp_path, chains):
    import tarfile

    from eval.io import write_backbone_pdb
    from eval.reference import load_reference, main as ref_main, prepare_reference

    src = tmp_path / "src"
    for bb in chains[:3]:
        write_backbone_pdb(src / f"{bb.name}.pdb", bb.coords, bb.sequence)
    (src / "junk.pdb").write_text("nonsense\n")
    arch = tmp_path / "ref.tar.xz"
    with tarfile.open(arch, "w:xz") as tar:
        tar.add(src, arcname="ref")
    ref = prepare_reference(arch, tmp_path / "ref.npz", progress=False)
    back = load_reference(tmp_path / "ref.npz")
    assert sorted(back.names) == sorted(bb.name for bb in chains[:3]) and back.fingerprint() == ref.fingerprint()
    for i, name in enumerate(back.names):
        bb = [c for c in chains if c.name == name][0]
        assert np.allclose(back.chain(i), bb.ca, atol=1e-3) and str(back.sequences[i]) == bb.sequence
    assert sorted(load_reference(src).names) == sorted(back.names)
    assert ref_main([str(tmp_path / "missing"), str(tmp_path / "x.npz")]) == 2


@pytest.mark.slow
def test_novelty_on_full_pdownb_exact_vs_heuristic(chains):
    from conftest import pdownb_archive_file, pdownb_skip_reason
    from eval.reference import build_reference

    arch = pdownb_archive_file()
    if arch is None:
        pytest.skip(pdownb_skip_reason())
    ref = build_reference(arch, workers=2)
    assert len(ref) > 2000
    rng = np.random.default_rng(0)
    queries = [(bb.ca + rng.normal(scale=1.0, size=bb.ca.shape), bb.sequence) for bb in chains[:2]]
    exact = novelty(queries, ref, workers=2)
    heur = novelty(queries, ref, workers=2, top_k=300)
    for bb, e, h in zip(chains, exact, heur):
        assert e.best_ref == bb.name and e.max_tm > 0.6  # the noisy copy (1 A noise) finds its source chain
        assert h.max_tm <= e.max_tm + 1e-12
