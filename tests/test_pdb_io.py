"""Tests of superdiff_protein.frames.pdb_io on real PDownB chains and on hand-made bad files."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import real_chain_files
from superdiff_protein.frames.pdb_io import (
    BACKBONE_ATOMS,
    Backbone,
    PDBWriteError,
    StructureError,
    read_backbone,
    write_backbone_pdb,
    write_trajectory_pdb,
)

_CHAIN_DIR: list[Path] = []  # shared by every module that imports the fixture (copy once)


@pytest.fixture(scope="session")
def pdownb_chain_dir(tmp_path_factory) -> Path:
    """A few real PDownB chains shipped in tests/data/pdownb (set "spread": every 400th archive member),
    copied to a scratch folder so that no test can write into the repository."""
    if _CHAIN_DIR and _CHAIN_DIR[0].is_dir():
        return _CHAIN_DIR[0]
    out = tmp_path_factory.mktemp("pdownb_chains")
    for f in real_chain_files("spread"):
        (out / f.name).write_bytes(f.read_bytes())
    assert len(chain_files(out)) >= 4
    _CHAIN_DIR.append(out)
    return out


def chain_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.pdb"))


def parse_atom_lines(path: Path) -> dict:
    """Independent fixed-column parser: {(chain, resseq, icode): {atom: xyz}} of ATOM records, model 1."""
    res: dict = {}
    order = []
    for line in path.read_text().splitlines():
        if line.startswith("ENDMDL"):
            break
        if not line.startswith("ATOM  "):
            continue
        if line[16] not in (" ", "A"):
            continue
        key = (line[21], int(line[22:26]), line[26].strip())
        if key not in res:
            res[key] = {"resname": line[17:20].strip()}
            order.append(key)
        res[key].setdefault(line[12:16].strip(), np.array([float(line[30:38]), float(line[38:46]), float(line[46:54])]))
    return {"order": order, "res": res}


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

def test_read_real_chains_match_independent_parse(pdownb_chain_dir):
    for f in chain_files(pdownb_chain_dir):
        bb = read_backbone(f)
        ref = parse_atom_lines(f)
        first_chain = ref["order"][0][0]
        keys = [k for k in ref["order"] if k[0] == first_chain]
        assert isinstance(bb, Backbone)
        assert bb.chain_id == first_chain
        assert len(bb) == len(keys), f.name
        assert bb.atoms.shape == (len(keys), 4, 3) and bb.atom_mask.shape == (len(keys), 4)
        assert len(bb.sequence) == len(keys)
        np.testing.assert_array_equal(bb.res_ids, [k[1] for k in keys])
        for i, k in enumerate(keys):
            for j, an in enumerate(BACKBONE_ATOMS):
                present = an in ref["res"][k]
                assert bb.atom_mask[i, j] == present
                if present:
                    np.testing.assert_allclose(bb.atoms[i, j], ref["res"][k][an], atol=1e-4)
        assert set(bb.sequence) <= set("ACDEFGHIKLMNPQRSTVWYX")
        assert bb.resolution is None  # PDownB headers are stripped


def test_read_formats_cif_and_gzip_agree(pdownb_chain_dir, tmp_path):
    import biotite.structure.io.pdb as pdb
    import biotite.structure.io.pdbx as pdbx

    for f in chain_files(pdownb_chain_dir)[:3]:
        ref = read_backbone(f)
        arr = pdb.PDBFile.read(str(f)).get_structure(model=1)
        cif = pdbx.CIFFile()
        pdbx.set_structure(cif, arr)
        cif_path = tmp_path / f"{f.stem}.cif"
        cif.write(str(cif_path))
        gz_pdb = tmp_path / f"{f.stem}.pdb.gz"
        gz_pdb.write_bytes(gzip.compress(f.read_bytes()))
        gz_cif = tmp_path / f"{f.stem}.cif.gz"
        gz_cif.write_bytes(gzip.compress(cif_path.read_bytes()))
        for p in (cif_path, gz_pdb, gz_cif):
            bb = read_backbone(p)
            assert bb.sequence == ref.sequence, p
            np.testing.assert_array_equal(bb.res_ids, ref.res_ids)
            np.testing.assert_array_equal(bb.atom_mask, ref.atom_mask)
            np.testing.assert_allclose(bb.atoms, ref.atoms, atol=1e-3)
            assert bb.chain_id == ref.chain_id


def _two_chain_file(pdownb_chain_dir: Path, tmp_path: Path) -> tuple[Path, Backbone, Backbone]:
    f1, f2 = chain_files(pdownb_chain_dir)[:2]
    b1, b2 = read_backbone(f1), read_backbone(f2)
    p1, p2 = tmp_path / "c1.pdb", tmp_path / "c2.pdb"
    write_backbone_pdb(p1, b1.atoms, b1.sequence, chain_id="B", atom_mask=b1.atom_mask)
    write_backbone_pdb(p2, b2.atoms, b2.sequence, chain_id="C", atom_mask=b2.atom_mask)
    body = [ln for ln in p1.read_text().splitlines() if ln.startswith(("ATOM", "TER"))]
    body += [ln for ln in p2.read_text().splitlines() if ln.startswith(("ATOM", "TER"))]
    # ligand + waters (HETATM) must be ignored
    het = [
        "HETATM 9001  O   HOH B 901      10.000  10.000  10.000  1.00 20.00           O  ",
        "HETATM 9002 ZN    ZN C 902      11.000  10.000  10.000  1.00 20.00          ZN  ",
    ]
    out = tmp_path / "two_chains.pdb"
    out.write_text("\n".join(het[:1] + body + het[1:] + ["END"]) + "\n")
    return out, b1, b2


def test_chain_selection_and_hetatm_skipped(pdownb_chain_dir, tmp_path):
    path, b1, b2 = _two_chain_file(pdownb_chain_dir, tmp_path)
    first = read_backbone(path)
    assert first.chain_id == "B" and first.sequence == b1.sequence
    second = read_backbone(path, chain="C")
    assert second.chain_id == "C" and second.sequence == b2.sequence
    np.testing.assert_allclose(second.atoms[second.atom_mask], b2.atoms[b2.atom_mask], atol=1e-3)
    with pytest.raises(StructureError, match="chain 'Z' not found"):
        read_backbone(path, chain="Z")


def test_first_model_is_taken(pdownb_chain_dir, tmp_path):
    f = chain_files(pdownb_chain_dir)[0]
    bb = read_backbone(f)
    traj = tmp_path / "traj.pdb"
    base = np.where(bb.atom_mask[..., None], bb.atoms, 0.0)
    write_trajectory_pdb(traj, [base + 5.0, base], bb.sequence)
    back = read_backbone(traj)
    np.testing.assert_allclose(back.atoms, base + 5.0, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

def test_roundtrip_real_chains(pdownb_chain_dir, tmp_path):
    import biotite.structure.io.pdb as pdb

    for f in chain_files(pdownb_chain_dir):
        bb = read_backbone(f)
        out = tmp_path / f"rt_{f.name}"
        write_backbone_pdb(out, bb.atoms, bb.sequence, chain_id=bb.chain_id, residue_numbers=bb.res_ids,
                           insertion_codes=bb.ins_codes, atom_mask=bb.atom_mask, remarks=["round trip", "x" * 150])
        back = read_backbone(out)
        assert back.sequence == bb.sequence
        assert back.chain_id == bb.chain_id
        np.testing.assert_array_equal(back.res_ids, bb.res_ids)
        np.testing.assert_array_equal(back.atom_mask, bb.atom_mask)
        np.testing.assert_allclose(back.atoms, bb.atoms, atol=1e-3)
        # biotite reads it as a plain protein: element symbols, atom names, no hetero records
        arr = pdb.PDBFile.read(str(out)).get_structure(model=1)
        assert not arr.hetero.any()
        assert set(arr.atom_name) <= set(BACKBONE_ATOMS)
        for an, el in zip(arr.atom_name, arr.element):
            assert el == {"N": "N", "CA": "C", "C": "C", "O": "O"}[an]
        lines = out.read_text().splitlines()
        assert all(len(ln) <= 80 for ln in lines)
        assert lines[-1].strip() == "END"
        assert any(ln.startswith("TER") for ln in lines)


def test_default_numbering_sequence_and_three_atoms(pdownb_chain_dir, tmp_path):
    import biotite.structure as struc
    import biotite.structure.io.pdb as pdb

    f = chain_files(pdownb_chain_dir)[0]
    bb = read_backbone(f)
    keep = bb.atom_mask[:, :3].all(1)
    atoms3 = bb.atoms[keep][:, :3]
    out = tmp_path / "three.pdb"
    write_backbone_pdb(out, atoms3, chain_id="Q", residue_start=-3, b_factors=np.linspace(0, 99, len(atoms3)))
    arr = pdb.PDBFile.read(str(out)).get_structure(model=1, extra_fields=["b_factor"])
    assert arr.array_length() == 3 * len(atoms3)
    assert set(arr.chain_id) == {"Q"}
    assert set(arr.res_name) == {"GLY"}
    np.testing.assert_array_equal(struc.get_residues(arr)[0], np.arange(-3, -3 + len(atoms3)))
    np.testing.assert_allclose(arr.coord.reshape(-1, 3, 3), atoms3, atol=1e-3)
    np.testing.assert_allclose(arr.b_factor[1::3], np.linspace(0, 99, len(atoms3)), atol=0.006)


def test_trajectory_models(pdownb_chain_dir, tmp_path):
    import biotite.structure.io.pdb as pdb

    rng = np.random.default_rng(0)
    for f in chain_files(pdownb_chain_dir)[:2]:
        bb = read_backbone(f)
        base = np.where(bb.atom_mask[..., None], bb.atoms, 0.0)
        frames = [base + rng.normal(0, 1, base.shape) for _ in range(4)]
        out = tmp_path / f"traj_{f.name}"
        write_trajectory_pdb(out, frames, bb.sequence, chain_id="A")
        pf = pdb.PDBFile.read(str(out))
        assert pf.get_model_count() == len(frames)
        stack = pf.get_structure()
        assert stack.stack_depth() == len(frames)
        for t in range(len(frames)):
            np.testing.assert_allclose(stack.coord[t].reshape(-1, 4, 3), frames[t], atol=1e-3)
        text = out.read_text()
        assert text.count("ENDMDL") == len(frames) and text.rstrip().endswith("END")


def test_writes_are_atomic(pdownb_chain_dir, tmp_path):
    f = chain_files(pdownb_chain_dir)[0]
    bb = read_backbone(f)
    out = tmp_path / "keep.pdb"
    write_backbone_pdb(out, bb.atoms, bb.sequence, atom_mask=bb.atom_mask)
    before = out.read_bytes()
    bad = bb.atoms.copy()
    bad[len(bad) // 2, 1, 0] = np.nan
    with pytest.raises(PDBWriteError, match="non-finite"):
        write_backbone_pdb(out, bad)
    with pytest.raises(PDBWriteError, match="range"):
        write_backbone_pdb(out, bb.atoms * 1e4)
    # a failure in the middle of a trajectory leaves nothing behind either
    with pytest.raises(PDBWriteError):
        write_trajectory_pdb(tmp_path / "t.pdb", [bb.atoms, bad])
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.pdb"]
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"atoms": np.zeros((5, 2, 3))}, "shape"),
        ({"atoms": np.zeros((5, 4, 3)), "sequence": "AAA"}, "length"),
        ({"atoms": np.zeros((5, 4, 3)), "sequence": "AAAA1"}, "one-letter"),
        ({"atoms": np.zeros((5, 4, 3)), "chain_id": "AB"}, "chain_id"),
        ({"atoms": np.zeros((5, 4, 3)), "residue_start": 9998}, "residue numbers"),
        ({"atoms": np.zeros((5, 4, 3)), "b_factors": np.full(5, 1e4)}, "b_factors"),
    ],
)
def test_write_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(PDBWriteError, match=match):
        write_backbone_pdb(tmp_path / "x.pdb", **kwargs)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------

DNA_PDB = "\n".join(
    f"ATOM  {i + 1:5d}  {an:<3s}  DA B   1      {x:6.3f}   1.000   1.000  1.00  0.00           {an[0]}  "
    for i, (an, x) in enumerate([("P", 1.0), ("OP1", 2.0), ("C1'", 3.0)])
) + "\nEND\n"
WATER_PDB = "HETATM    1  O   HOH A   1       1.000   1.000   1.000  1.00  0.00           O  \nEND\n"


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("empty.pdb", b"", "empty"),
        ("garbage.pdb", b"this is not a structure\nat all\n", "no ATOM|cannot parse|no atoms"),
        ("binary.pdb", bytes(range(256)) * 4, "not a text|cannot parse"),
        ("dna.pdb", DNA_PDB.encode(), "not a protein"),
        ("water.pdb", WATER_PDB.encode(), "not a protein"),
        ("broken.cif", b"data_x\nloop_\n_atom_site.id\n1 2 3\n", "cannot parse|not a protein|no atoms"),
        ("corrupt.pdb.gz", b"\x1f\x8b\x08\x00garbage", "gzip"),
        ("notes.txt", b"hello", "unsupported"),
    ],
)
def test_bad_files_raise_structure_error(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(StructureError, match=match) as ei:
        read_backbone(p)
    assert name.split(".")[0] in str(ei.value)  # message names the file


def test_missing_file_raises(tmp_path):
    with pytest.raises(StructureError, match="cannot read"):
        read_backbone(tmp_path / "nope.pdb")
