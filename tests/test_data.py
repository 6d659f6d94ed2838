"""Tests of superdiff_protein.frames.data: prepare_dataset, FrameDataset, samplers, SS split."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, official_fixtures_dir, official_skip_reason
from superdiff_protein.frames.data import (
    RESTYPES,
    DatasetError,
    FrameDataset,
    LengthBucketSampler,
    collate_frames,
    decode_coords,
    load_dataset_file,
    prepare_dataset,
    split_by_secondary_structure,
)
from superdiff_protein.frames.geometry import frames_from_backbone
from superdiff_protein.frames.pdb_io import read_backbone
from test_pdb_io import DNA_PDB, chain_files, pdownb_chain_dir  # noqa: F401  (session fixture)

CORRUPT = b"ATOM      1  N   ALA A   1      xx.xxx  1.000  1.000  1.00  0.00           N\n" * 3
# AF2 / openfold idealised backbone (alanine) in the residue frame, Angstrom: N, CA, C
IDEAL_N_CA_C = ((-0.525, 1.363, 0.0), (0.0, 0.0, 0.0), (1.526, 0.0, 0.0))
NO_FILTER = dict(min_length=1, max_length=100000, progress=False)


def _frame_complete(bb):
    return bb.select(bb.has_frame_atoms)


def _independent_breaks(ca: np.ndarray) -> np.ndarray:
    out = np.zeros(len(ca), dtype=bool)
    for i in range(1, len(ca)):
        out[i] = float(np.sqrt(((ca[i] - ca[i - 1]) ** 2).sum())) > 4.2
    return out


@pytest.fixture(scope="module")
def input_dir(pdownb_chain_dir, tmp_path_factory) -> Path:  # noqa: F811
    d = tmp_path_factory.mktemp("prep_in")
    for f in chain_files(pdownb_chain_dir):
        (d / f.name).write_bytes(f.read_bytes())
    (d / "corrupt.pdb").write_bytes(CORRUPT)
    (d / "dna.pdb").write_text(DNA_PDB)
    (d / "README.txt").write_text("not a structure")
    return d


@pytest.fixture(scope="module")
def prepared(input_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep_out") / "ds.pt"
    summary = prepare_dataset(input_dir, out, split="ss", num_workers=1, **NO_FILTER)
    return summary, out


def test_prepare_lists_skipped_and_keeps_real_chains(prepared, input_dir):
    summary, out = prepared
    real = sorted(p.name for p in input_dir.glob("*.pdb") if p.name not in ("corrupt.pdb", "dna.pdb"))
    data = load_dataset_file(out)
    assert sorted(data["sources"]) == real
    assert summary.kept == len(real)
    assert sorted(s["file"] for s in summary.skipped) == ["corrupt.pdb", "dna.pdb"]
    assert summary.ignored == ["README.txt"]
    log = json.loads(Path(summary.log).read_text())
    assert sorted(s["file"] for s in log["skipped"]) == ["corrupt.pdb", "dna.pdb"]
    assert all(s["reason"] for s in log["skipped"])
    assert "corrupt.pdb" in summary.text() and "dna.pdb" in summary.text()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_stored_chains_match_files(prepared, input_dir):
    import biotite.structure as struc
    import biotite.structure.io.pdb as pdb

    _, out = prepared
    data = load_dataset_file(out)
    coords = decode_coords(data).numpy()
    off = data["offsets"].numpy()
    for i, src in enumerate(data["sources"]):
        bb = _frame_complete(read_backbone(input_dir / src))
        a, b = off[i], off[i + 1]
        assert b - a == len(bb) == int(data["lengths"][i])
        assert data["sequences"][i] == bb.sequence
        np.testing.assert_array_equal(data["atom_mask"][a:b].numpy(), bb.atom_mask)
        np.testing.assert_array_equal(data["res_ids"][a:b].numpy(), bb.res_ids)
        # int16 storage at 0.01 A: error <= 0.005 A (+ float32 rounding)
        err = np.abs(coords[a:b] - np.where(bb.atom_mask[..., None], bb.atoms, 0))
        assert err.max() <= 0.0051, (src, err.max())
        np.testing.assert_array_equal(data["chain_break"][a:b].numpy(), _independent_breaks(bb.atoms[:, 1].astype(np.float64)))
        # SS labels: biotite P-SEA on the chain read independently
        arr = pdb.PDBFile.read(str(input_dir / src)).get_structure(model=1)
        arr = arr[(arr.chain_id == bb.chain_id) & ~arr.hetero & struc.filter_amino_acids(arr)]
        sse = struc.annotate_sse(arr)
        starts = struc.get_residue_starts(arr)
        has_frame = np.array([{"N", "CA", "C"} <= set(arr.atom_name[s:e]) for s, e in
                              zip(starts, list(starts[1:]) + [arr.array_length()])])
        expect = np.array(["abc".index(x) for x in sse[has_frame]])
        np.testing.assert_array_equal(data["ss"][a:b].numpy(), expect)
        frac = np.bincount(expect, minlength=3) / len(expect)
        np.testing.assert_allclose(data["ss_frac"][i].numpy(), frac, atol=1e-6)


def test_tar_input_and_workers_give_same_dataset(prepared, input_dir, tmp_path):
    _, out = prepared
    ref = load_dataset_file(out)
    tar_path = tmp_path / "chains.tar.xz"
    with tarfile.open(tar_path, "w:xz") as tf:
        for p in sorted(input_dir.iterdir()):
            tf.add(p, arcname=f"sub/{p.name}")
        info = tarfile.TarInfo("sub/emptydir")
        info.type = tarfile.DIRTYPE
        tf.addfile(info)
    s = prepare_dataset(tar_path, tmp_path / "from_tar.pt", split="ss", num_workers=2, **NO_FILTER)
    got = load_dataset_file(s.output)
    assert got["names"] == ref["names"]
    assert [p.split("/")[-1] for p in got["sources"]] == ref["sources"]
    for k in ("coords_q", "atom_mask", "ss", "chain_break", "res_ids", "lengths", "coord_center"):
        assert torch.equal(got[k], ref[k]), k
    assert sorted(x["file"] for x in s.skipped) == ["sub/corrupt.pdb", "sub/dna.pdb"]
    assert s.ignored == ["sub/README.txt"]
    for half in ("helix", "strand"):
        assert torch.equal(got["splits"]["ss"][half], ref["splits"]["ss"][half])


def test_length_and_gap_filters(input_dir, tmp_path):
    bbs = {p.name: _frame_complete(read_backbone(p)) for p in chain_files(input_dir)
           if p.name not in ("corrupt.pdb", "dna.pdb")}
    lengths = sorted(len(b) for b in bbs.values())
    lo, hi = lengths[1], lengths[-2]
    s = prepare_dataset(input_dir, tmp_path / "len.pt", min_length=lo, max_length=hi, progress=False, split=None)
    kept = sorted(load_dataset_file(s.output)["sources"])
    assert kept == sorted(n for n, b in bbs.items() if lo <= len(b) <= hi)
    assert {f["filter"] for f in s.filtered} <= {"min_length", "max_length"}
    assert len(s.filtered) == len(bbs) - len(kept)

    no_break = sorted(n for n, b in bbs.items() if not _independent_breaks(b.atoms[:, 1].astype(np.float64)).any())
    if no_break:
        s0 = prepare_dataset(input_dir, tmp_path / "gap.pt", max_gap=0, progress=False, split=None,
                             min_length=1, max_length=100000)
        assert sorted(load_dataset_file(s0.output)["sources"]) == no_break
        assert all(f["filter"] == "max_gap" for f in s0.filtered)
        s1 = prepare_dataset(input_dir, tmp_path / "brk.pt", max_breaks=0, progress=False, split=None,
                             min_length=1, max_length=100000)
        assert sorted(load_dataset_file(s1.output)["sources"]) == no_break


def test_resolution_filter_uses_header_when_present(pdownb_chain_dir, tmp_path):  # noqa: F811
    src = chain_files(pdownb_chain_dir)[0].read_text()
    d = tmp_path / "res"
    d.mkdir()
    (d / "good.pdb").write_text("REMARK   2 RESOLUTION.    1.50 ANGSTROMS.\n" + src)
    (d / "bad.pdb").write_text("REMARK   2 RESOLUTION.    3.50 ANGSTROMS.\n" + src)
    (d / "noheader.pdb").write_text(src)
    s = prepare_dataset(d, tmp_path / "res.pt", max_resolution=2.0, split=None, **NO_FILTER)
    data = load_dataset_file(s.output)
    assert sorted(data["sources"]) == ["good.pdb", "noheader.pdb"]
    assert [f["file"] for f in s.filtered] == ["bad.pdb"]
    res = dict(zip(data["sources"], data["resolution"].tolist()))
    assert res["good.pdb"] == pytest.approx(1.5) and np.isnan(res["noheader.pdb"])


def test_prepare_errors_are_clear(input_dir, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        prepare_dataset(tmp_path / "missing", tmp_path / "x.pt", progress=False)
    with pytest.raises(DatasetError, match="no chain left"):
        prepare_dataset(input_dir, tmp_path / "x.pt", min_length=99999, max_length=100000, progress=False)
    with pytest.raises(DatasetError, match="min_length"):
        prepare_dataset(input_dir, tmp_path / "x.pt", min_length=50, max_length=10, progress=False)
    bad_tar = tmp_path / "bad.tar.xz"
    bad_tar.write_bytes(b"\xfd7zXZ\x00garbage")
    with pytest.raises(DatasetError, match="cannot read archive"):
        prepare_dataset(bad_tar, tmp_path / "x.pt", progress=False)
    assert not (tmp_path / "x.pt").exists()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"nope")
    with pytest.raises(DatasetError, match="not a readable dataset"):
        load_dataset_file(garbage)


def test_cli_end_to_end(input_dir, tmp_path):
    out = tmp_path / "cli" / "ds.pt"
    cmd = [sys.executable, "-m", "superdiff_protein.cli.prepare_dataset", f"input_dir={input_dir}", f"output={out}",
           "min_length=1", "progress=false"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "corrupt.pdb" in r.stdout and "kept" in r.stdout
    assert out.is_file() and Path(str(out) + ".log.json").is_file()
    assert not (tmp_path / "outputs").exists()  # hydra writes no run directory
    r = subprocess.run([sys.executable, "-m", "superdiff_protein.cli.prepare_dataset", f"input_dir={tmp_path / 'nope'}",
                        f"output={out}"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# frames
# ---------------------------------------------------------------------------------------------

def test_frames_reconstruct_backbone(prepared):
    _, out = prepared
    ds = FrameDataset(out, center=True)
    ideal = torch.tensor(IDEAL_N_CA_C, dtype=torch.float64)
    errs = []
    for i in range(len(ds)):
        it = ds[i]
        R, t, x = it["rotmats"].double(), it["trans"].double(), it["atoms"].double()
        eye = torch.eye(3, dtype=torch.float64).expand_as(R)
        assert torch.allclose(R.transpose(-1, -2) @ R, eye, atol=1e-5)
        assert torch.allclose(torch.linalg.det(R), torch.ones(len(R), dtype=torch.float64), atol=1e-5)
        assert torch.allclose(t, x[:, 1], atol=1e-6)  # CA exactly
        # frame definition: C on +x, N in the xy plane with y > 0
        loc_c = (R.transpose(-1, -2) @ (x[:, 2] - x[:, 1])[..., None])[..., 0]
        loc_n = (R.transpose(-1, -2) @ (x[:, 0] - x[:, 1])[..., None])[..., 0]
        assert torch.allclose(loc_c[:, 1:], torch.zeros_like(loc_c[:, 1:]), atol=1e-4) and (loc_c[:, 0] > 0).all()
        assert torch.allclose(loc_n[:, 2], torch.zeros_like(loc_n[:, 2]), atol=1e-4) and (loc_n[:, 1] > 0).all()
        rebuilt = (R[:, None] @ ideal[None, :, :, None])[..., 0] + t[:, None]
        errs.append((rebuilt - x[:, :3]).norm(dim=-1))
    errs = torch.cat(errs)
    assert errs[:, 1].max() < 1e-6
    # real bond lengths / angles deviate from AF2's ideal ones by a few hundredths of an A / degrees
    assert errs[:, [0, 2]].median() < 0.06, errs.median()
    assert torch.quantile(errs[:, [0, 2]].flatten(), 0.99) < 0.25


def _quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    """Reference unit quaternion (w, x, y, z) -> rotation matrix (Hamilton convention)."""
    w, x, y, z = q.unbind(-1)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def test_frames_match_official_framediff_convention():
    """Frames rebuilt from the official atoms equal the official frames, for every stored trajectory state of every
    FrameDiff fixture set. Tolerance (docs/testing.md): the atoms are float32 (built as R local + t: ~4 roundings of
    the coordinates' magnitude); a frame direction errs by the atom error over the bond length (N-CA 1.46 A), twice
    (two bonds); the official unit quaternion adds a few float32 roundings of 1."""
    from tolerances import close, rounding_tol

    refs = sorted(official_fixtures_dir().glob("framediff_*_reference.pt"))
    found = 0
    for ref in refs:
        d = torch.load(ref, map_location="cpu", weights_only=False)
        if "traj/out/prot_traj" not in d:
            continue
        found += 1
        prot, rig = d["traj/out/prot_traj"].double(), d["traj/out/rigid_traj"].double()
        for k in range(prot.shape[0]):  # atom37 of x_t (N=0, CA=1, C=2) built by the official code from rigid_traj[k]
            R, t = frames_from_backbone(prot[k, :, 0], prot[k, :, 1], prot[k, :, 2])
            q = rig[k, :, :4] / rig[k, :, :4].norm(dim=-1, keepdim=True)
            scale = prot[k, :, :3].abs().amax((-1, -2))[:, None, None]  # per residue
            close(R, _quat_to_rotmat(q), rounding_tol(torch.float32, 2 * scale / 1.46, 4)
                  + rounding_tol(torch.float32, 1.0, 6), f"{ref.stem} state {k} rotations")
            close(t, rig[k, :, 4:], rounding_tol(torch.float32, scale[..., 0], 4), f"{ref.stem} state {k} CA")
    if not found:
        pytest.skip(official_skip_reason("framediff_*_reference.pt with a trajectory"))


def test_dataset_items_crop_and_collate(prepared):
    _, out = prepared
    full = FrameDataset(out, center=False)
    crop = 37
    a = FrameDataset(out, max_length=crop, crop="random", seed=3, center=False)
    b = FrameDataset(out, max_length=crop, crop="random", seed=3, center=False)
    assert (a.lengths == np.minimum(full.lengths, crop)).all()
    moved = False
    for i in range(len(a)):
        x, y, f = a[i], b[i], full[i]
        assert x["length"] == min(crop, f["length"]) and torch.equal(x["atoms"], y["atoms"])
        # the window is a contiguous slice of the full chain
        L = x["length"]
        starts = [s for s in range(f["length"] - L + 1) if torch.equal(f["res_ids"][s:s + L], x["res_ids"])]
        assert starts and torch.equal(f["atoms"][starts[0]:starts[0] + L], x["atoms"])
        assert x["aatype"].max() < len(RESTYPES) and x["ss"].max() <= 2
        a.set_epoch(1)
        moved |= not torch.equal(a[i]["res_ids"], x["res_ids"])
        a.set_epoch(0)
    assert moved or all(f <= crop + 1 for f in full.lengths)
    batch = collate_frames([a[i] for i in range(len(a))])
    n = len(a)
    assert batch["atoms"].shape == (n, max(a.lengths), 4, 3)
    assert torch.equal(batch["res_mask"].sum(1).long(), torch.as_tensor(a.lengths))
    pad = batch["res_mask"] == 0
    if pad.any():
        assert torch.equal(batch["rotmats"][pad], torch.eye(3).expand(int(pad.sum()), 3, 3))
        assert (batch["atom_mask"][pad] == 0).all()
    centered = FrameDataset(out, center=True)[0]
    assert centered["trans"].mean(0).abs().max() < 1e-4


def test_length_bucket_sampler_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(40, 300, size=503)
    s1 = LengthBucketSampler(lengths, batch_size=8, seed=11, pool_batches=10)
    s2 = LengthBucketSampler(lengths, batch_size=8, seed=11, pool_batches=10)
    b1, b2 = list(s1), list(s2)
    assert b1 == b2 and len(b1) == len(s1)
    assert sorted(i for b in b1 for i in b) == list(range(len(lengths)))
    assert all(1 <= len(b) <= 8 for b in b1)
    assert list(LengthBucketSampler(lengths, batch_size=8, seed=12, pool_batches=10)) != b1
    s1.set_epoch(1)
    assert list(s1) != b1
    # batches are of similar length: far tighter than random batches of the same size
    spread = np.mean([np.ptp(lengths[b]) for b in b1])
    rand = np.mean([np.ptp(lengths[rng.permutation(len(lengths))[:8]]) for _ in range(200)])
    assert spread < 0.25 * rand
    # token budget
    st = LengthBucketSampler(lengths, batch_size=64, max_tokens=1200, seed=0)
    assert all(len(b) * lengths[b].max() <= 1200 for b in st)
    assert sorted(i for b in st for i in b) == list(range(len(lengths)))
    # replicas: disjoint, equal batch counts
    r0 = list(LengthBucketSampler(lengths, batch_size=8, seed=5, num_replicas=2, rank=0))
    r1 = list(LengthBucketSampler(lengths, batch_size=8, seed=5, num_replicas=2, rank=1))
    assert len(r0) == len(r1) and not set(i for b in r0 for i in b) & set(i for b in r1 for i in b)


def test_split_by_secondary_structure(prepared):
    _, out = prepared
    data = load_dataset_file(out)
    n = len(data["names"])
    sp = split_by_secondary_structure(out)
    h, s = set(sp.helix.tolist()), set(sp.strand.tolist())
    assert not h & s and h | s == set(range(n)) and abs(len(h) - len(s)) <= 1
    score = (data["ss_frac"][:, 0] - data["ss_frac"][:, 1]).numpy()
    assert score[sp.helix].min() >= score[sp.strand].max()
    assert sp.stats["helix"]["helix_frac"] >= sp.stats["strand"]["helix_frac"]
    assert sp.stats["strand"]["strand_frac"] <= 1 and sp.stats["helix"]["chains"] == len(h)
    # the split stored by prepare_dataset is the same and usable as a subset
    assert torch.equal(data["splits"]["ss"]["helix"], torch.from_numpy(sp.helix))
    ds = FrameDataset(out, subset="strand")
    assert len(ds) == len(s) and {ds[i]["index"] for i in range(len(ds))} == s
    sp2 = split_by_secondary_structure(data, exclude_middle=0.34)
    assert len(sp2.helix) + len(sp2.strand) == n - round(0.34 * n)
    assert set(sp2.helix.tolist()) <= h and set(sp2.strand.tolist()) <= s
    with pytest.raises(DatasetError, match="subset"):
        FrameDataset(out, subset="sheet")
