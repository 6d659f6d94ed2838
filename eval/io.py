"""Reading protein backbones (PDB / mmCIF, plain, gzip-compressed (``.pdb.gz``) or inside tar archives),
discovering sample files, and atomic file writes.

Structures are parsed by the project's one reader, :func:`superdiff_protein.runs.structures.read_backbone`
(``eval`` imports only :mod:`superdiff_protein.runs` of the library), into its one
:class:`~superdiff_protein.runs.structures.Backbone`: the first protein chain of the first model of a file.
The evaluation's view of it (:func:`read_backbone`) keeps the modified residues ``MSE``/``SEC``/``PYL`` written
as HETATM, drops residues without a CA atom and spells the sequence with :data:`_THREE_TO_ONE`; metrics use
``Backbone.coords`` (float64, NaN where an atom is absent, e.g. CA-only files), ``ca``, ``sequence`` and
``res_ids``.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import tarfile
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np

from superdiff_protein.runs.structures import Backbone, StructureError, detect_format, parse_backbone
from superdiff_protein.runs.structures import read_backbone as _read_backbone

from .errors import BadInputError, StructureReadError

__all__ = ["Backbone", "BACKBONE_ATOMS", "STRUCTURE_SUFFIXES", "MIN_RESIDUES", "HETERO_RESIDUES", "read_backbone",
           "backbone_from_text", "structure_suffix", "iter_tar_structures", "is_tar", "discover_structures",
           "write_backbone_pdb", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "require_dir"]

BACKBONE_ATOMS = ("N", "CA", "C", "O")
_PLAIN_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".bcif")
#: file names read as structures (gzip-compressed variants too, as prepare_dataset reads them)
STRUCTURE_SUFFIXES = _PLAIN_SUFFIXES + tuple(s + ".gz" for s in _PLAIN_SUFFIXES)
#: modified amino acids read even when written as HETATM records (selenomethionine in crystal structures, ...)
HETERO_RESIDUES = ("MSE", "SEC", "PYL")
#: fewer residues than this cannot be evaluated (TM-align needs 3; ProteinMPNN and DSSP-like labels are meaningless)
MIN_RESIDUES = 3

_THREE_TO_ONE = {
    "ALA": "A", "ARG": "R", "ASN": "N", "ASP": "D", "CYS": "C", "GLN": "Q", "GLU": "E", "GLY": "G",
    "HIS": "H", "ILE": "I", "LEU": "L", "LYS": "K", "MET": "M", "PHE": "F", "PRO": "P", "SER": "S",
    "THR": "T", "TRP": "W", "TYR": "Y", "VAL": "V", "MSE": "M", "SEC": "C", "PYL": "K", "UNK": "X",
}
_ONE_TO_THREE = {v: k for k, v in _THREE_TO_ONE.items() if k not in ("MSE", "SEC", "PYL")}


def structure_suffix(name: str | os.PathLike) -> tuple[str, bool]:
    """``(suffix, gzipped)`` of a structure file name: ``x.pdb.gz`` -> ``(".pdb", True)``."""
    p = Path(name)
    if p.suffix.lower() == ".gz":
        return Path(p.stem).suffix.lower(), True
    return p.suffix.lower(), False


def _eval_view(bb: Backbone, name: str) -> Backbone:
    """The evaluation's view of a parsed chain: residues without a CA atom dropped and the sequence spelled
    with :data:`_THREE_TO_ONE` (``MSE`` -> ``M``, ``SEC`` -> ``C``, ``PYL`` -> ``K``, else ``X``)."""
    keep = bb.atom_mask[:, 1]
    if not keep.any():
        raise StructureReadError(f"{name}: no residue with a CA atom in chain {bb.chain_id!r}")
    bb = bb.select(keep)
    return replace(bb, sequence="".join(_THREE_TO_ONE.get(str(r).upper(), "X") for r in bb.res_names))


def read_backbone(path: str | os.PathLike, name: str | None = None) -> Backbone:
    """Read the first protein chain of a PDB/mmCIF file (plain or ``.gz``) as a
    :class:`~superdiff_protein.runs.structures.Backbone` (the project's one reader, with the modified residues
    of :data:`HETERO_RESIDUES` kept), in the evaluation's view (:func:`_eval_view`).

    Raises :class:`StructureReadError` when the file is missing, malformed or has no CA atoms.
    """
    path = Path(path)
    name = name or path.name
    if not path.is_file():
        raise StructureReadError(f"{path}: file not found")
    try:
        bb = _read_backbone(path, name=name, hetero_residues=HETERO_RESIDUES)
    except StructureError as exc:
        raise StructureReadError(str(exc)) from exc
    return _eval_view(bb, name)


def backbone_from_text(text: str, suffix: str, name: str) -> Backbone:
    """Parse PDB/mmCIF text (e.g. a tar member) into a :class:`Backbone` (as :func:`read_backbone`)."""
    try:
        bb = parse_backbone(text, detect_format(f"x{suffix.lower()}")[0], name=name, hetero_residues=HETERO_RESIDUES)
    except StructureError as exc:
        raise StructureReadError(str(exc)) from exc
    return _eval_view(bb, name)


def iter_tar_structures(path: str | os.PathLike) -> Iterator[tuple[str, str, str]]:
    """Yield ``(member_name, suffix, text)`` for each structure file of a tar archive (any compression;
    ``.gz`` members are decompressed, corrupt ones skipped)."""
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            suffix, gz = structure_suffix(member.name)
            if suffix not in (".pdb", ".ent", ".cif", ".mmcif"):
                continue
            fh = tar.extractfile(member)
            if fh is None:
                continue
            data = fh.read()
            if gz:
                try:
                    data = gzip.decompress(data)
                except (OSError, EOFError):
                    continue
            yield member.name, suffix, data.decode("utf-8", errors="replace")


def is_tar(path: str | os.PathLike) -> bool:
    p = str(path).lower()
    return p.endswith((".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2"))


#: FrameDiff's per-sample trajectory files (``bb_traj_1.pdb``, ``x0_traj_1.pdb``; jasonkyuyim/se3_diffusion @ 53359d7,
#: ``experiments/inference_se3_diffusion.py::save_traj``)
_FRAMEDIFF_TRAJ = re.compile(r"(bb|x0)_traj_\d+\.(pdb|cif)(\.gz)?")
#: FrameDiff's per-sample evaluation folder (a copy of the sample, ESMFold refolds in ``esmf/``): never a sample
SELF_CONSISTENCY_DIR = "self_consistency"


def discover_structures(root: str | os.PathLike, exclude: list[str | os.PathLike] = ()) -> list[Path]:
    """All structure files under ``root`` (recursive, sorted), excluding trajectories (``*_traj.pdb`` and
    FrameDiff's ``bb_traj_N.pdb`` / ``x0_traj_N.pdb``), FrameDiff's ``self_consistency/`` folders and anything
    inside the ``exclude`` directories (e.g. the evaluation output directory)."""
    root = Path(root)
    excl = [Path(e).resolve() for e in exclude]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath).resolve()
        if any(d == e or e in d.parents for e in excl):
            dirnames[:] = []
            continue
        dirnames[:] = sorted(n for n in dirnames if n != SELF_CONSISTENCY_DIR)
        for fn in filenames:
            low = fn.lower()
            if not low.endswith(STRUCTURE_SUFFIXES) or low.endswith(("_traj.pdb", "_traj.cif", "_traj.pdb.gz",
                                                                     "_traj.cif.gz")) or _FRAMEDIFF_TRAJ.fullmatch(low):
                continue
            out.append(Path(dirpath) / fn)
    return sorted(out)


def write_backbone_pdb(path: str | os.PathLike, coords: np.ndarray, sequence: str | None = None,
                       b_factors: np.ndarray | None = None) -> None:
    """Write backbone coordinates ``(L, 4, 3)`` (N, CA, C, O; NaN atoms skipped) or CA-only ``(L, 3)``
    as a single-chain PDB file (atomically)."""
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim == 2:
        full = np.full((coords.shape[0], 4, 3), np.nan)
        full[:, 1] = coords
        coords = full
    L = coords.shape[0]
    sequence = sequence or "G" * L
    lines, serial = [], 1
    for i in range(L):
        res = _ONE_TO_THREE.get(sequence[i], "UNK")
        b = 0.0 if b_factors is None else float(b_factors[i])
        for k, atom in enumerate(BACKBONE_ATOMS):
            x = coords[i, k]
            if not np.isfinite(x).all():
                continue
            lines.append(
                f"ATOM  {serial:5d}  {atom:<3s} {res:3s} A{i + 1:4d}    "
                f"{x[0]:8.3f}{x[1]:8.3f}{x[2]:8.3f}{1.0:6.2f}{b:6.2f}          {atom[0]:>2s}"
            )
            serial += 1
    lines += ["TER", "END", ""]
    atomic_write_text(path, "\n".join(lines))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def require_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise BadInputError(f"{what} {str(p)!r} is not a directory (does it exist?)")
    return p
