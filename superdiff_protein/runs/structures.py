"""Reading protein backbone structures back (PDB / mmCIF / BinaryCIF, optionally gzipped): the one
:class:`Backbone` type and the one reader of the project.

Runs write PDB files (:mod:`superdiff_protein.frames.pdb_io`) and read them back (resume checks of
``generate_backbones``); ``prepare_dataset`` reads training structures and ``eval`` reads samples and
reference sets, all through :func:`read_backbone` / :func:`parse_backbone` (biotite parses; first model,
one chain, ATOM records of amino-acid residues). It lives in ``runs`` because ``eval`` may import only
:mod:`superdiff_protein.runs` of the library.

Every problem with an input file raises :class:`StructureError` (a ``ValueError``) with a message
that names the file.
"""
from __future__ import annotations

import gzip
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "BACKBONE_ATOMS",
    "Backbone",
    "StructureError",
    "SUPPORTED_SUFFIXES",
    "chain_break_flags",
    "detect_format",
    "parse_backbone",
    "read_backbone",
]

#: Backbone atom names in the order used by every (L, 4, 3) array of this package.
BACKBONE_ATOMS: tuple[str, ...] = ("N", "CA", "C", "O")

#: File suffixes understood by :func:`read_backbone` (each also with a trailing ``.gz``).
SUPPORTED_SUFFIXES: tuple[str, ...] = (".pdb", ".ent", ".cif", ".mmcif", ".bcif")

_ONE_TO_THREE = {
    "A": "ALA", "R": "ARG", "N": "ASN", "D": "ASP", "C": "CYS", "Q": "GLN", "E": "GLU",
    "G": "GLY", "H": "HIS", "I": "ILE", "L": "LEU", "K": "LYS", "M": "MET", "F": "PHE",
    "P": "PRO", "S": "SER", "T": "THR", "W": "TRP", "Y": "TYR", "V": "VAL", "X": "UNK",
}


class StructureError(ValueError):
    """A structure file cannot be read, or holds no usable protein chain."""


@dataclass(eq=False)  # compared by identity: field-wise == of numpy arrays has no truth value
class Backbone:
    """Backbone of one protein chain.

    Attributes:
        atoms: (L, 4, 3) float32 coordinates of N, CA, C, O in Angstrom (0 where missing).
        atom_mask: (L, 4) bool, True where the atom is present in the file.
        sequence: one-letter sequence of length L (``X`` for unknown / non-standard residues).
        res_ids: (L,) int residue numbers from the file.
        ins_codes: (L,) str insertion codes (``""`` when none).
        chain_id: chain identifier (author chain id for mmCIF).
        name: a label for the structure (file stem by default).
        res_names: (L,) str three-letter residue names from the file.
        resolution: resolution in Angstrom from the file header, ``None`` when absent.
    """

    atoms: np.ndarray
    atom_mask: np.ndarray
    sequence: str
    res_ids: np.ndarray
    ins_codes: np.ndarray
    chain_id: str
    name: str = ""
    res_names: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="U3"))
    resolution: float | None = None

    def __len__(self) -> int:
        return int(self.atoms.shape[0])

    @property
    def length(self) -> int:
        """Number of residues L."""
        return len(self)

    @property
    def coords(self) -> np.ndarray:
        """(L, 4, 3) float64 coordinates of N, CA, C, O with NaN where an atom is absent (the form the
        evaluation metrics take)."""
        return np.where(self.atom_mask[..., None], self.atoms.astype(np.float64), np.nan)

    @property
    def has_full_backbone(self) -> bool:
        """True when every residue has all of N, CA, C and O."""
        return bool(self.atom_mask.all())

    @property
    def ca(self) -> np.ndarray:
        """(L, 3) float64 CA coordinates, NaN where the CA atom is absent."""
        return self.coords[:, 1]

    @property
    def has_frame_atoms(self) -> np.ndarray:
        """(L,) bool: residue has N, CA and C (enough to define a backbone frame)."""
        return self.atom_mask[:, :3].all(-1)

    def chain_breaks(self, threshold: float = 4.2) -> np.ndarray:
        """(L,) bool: CA(i-1)-CA(i) distance > ``threshold`` (first residue: False).

        A residue whose own CA or whose predecessor's CA is missing also counts as a break.
        """
        return chain_break_flags(self.atoms[:, 1], self.atom_mask[:, 1], threshold)

    def select(self, keep: np.ndarray) -> "Backbone":
        """A new Backbone restricted to residues where ``keep`` (bool (L,)) is True."""
        keep = np.asarray(keep, dtype=bool)
        seq = "".join(np.array(list(self.sequence), dtype="U1")[keep]) if len(self) else ""
        return Backbone(
            atoms=self.atoms[keep], atom_mask=self.atom_mask[keep], sequence=seq,
            res_ids=self.res_ids[keep], ins_codes=self.ins_codes[keep], chain_id=self.chain_id,
            name=self.name, res_names=self.res_names[keep] if len(self.res_names) else self.res_names,
            resolution=self.resolution,
        )


def chain_break_flags(ca: np.ndarray, ca_mask: np.ndarray | None = None, threshold: float = 4.2) -> np.ndarray:
    """(L,) bool flags: True at residue i when |CA(i) - CA(i-1)| > ``threshold`` Angstrom.

    The first residue is never a break. With ``ca_mask``, a missing CA on either side is a break.
    """
    ca = np.asarray(ca, dtype=np.float64)
    flags = np.zeros(ca.shape[0], dtype=bool)
    if ca.shape[0] > 1:
        d = np.linalg.norm(ca[1:] - ca[:-1], axis=-1)
        flags[1:] = ~(d <= threshold)  # NaN counts as a break
        if ca_mask is not None:
            m = np.asarray(ca_mask, dtype=bool)
            flags[1:] |= ~(m[1:] & m[:-1])
    return flags


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------

def detect_format(name: str | os.PathLike) -> tuple[str, bool]:
    """Return ``(fmt, gzipped)`` from a file name; fmt is ``"pdb"``, ``"cif"`` or ``"bcif"``.

    Raises:
        StructureError: unknown suffix.
    """
    n = str(name).lower()
    gz = n.endswith(".gz")
    if gz:
        n = n[:-3]
    if n.endswith((".pdb", ".ent")) or re.search(r"\.pdb\d*$", n):
        return "pdb", gz
    if n.endswith((".cif", ".mmcif")):
        return "cif", gz
    if n.endswith(".bcif"):
        return "bcif", gz
    raise StructureError(
        f"{name}: unsupported file type (expected one of {', '.join(SUPPORTED_SUFFIXES)}, optionally .gz)"
    )


def _three_to_one(res_name: str) -> str:
    from biotite.sequence import ProteinSequence

    try:
        one = ProteinSequence.convert_letter_3to1(res_name)
    except KeyError:
        return "X"
    return one if one in _ONE_TO_THREE else "X"


def _pdb_resolution(text: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("REMARK   2 RESOLUTION."):
            m = re.search(r"RESOLUTION\.\s*([0-9.]+)", line)
            if m:
                try:
                    return float(m.group(1))
                except ValueError:
                    return None
    return None


def _cif_resolution(block) -> float | None:
    for cat, key in (("refine", "ls_d_res_high"), ("reflns", "d_resolution_high"),
                     ("em_3d_reconstruction", "resolution")):
        try:
            col = block[cat][key]
            vals = col.as_array(str)
        except Exception:  # category / key absent or not a string column
            continue
        for v in vals:
            try:
                return float(v)
            except ValueError:
                continue
    return None


def _load_atom_array(data: bytes | str, fmt: str, name: str):
    """Parse file content -> (AtomArray of the first model, resolution or None)."""
    import warnings

    import biotite.structure.io.pdb as pdb
    import biotite.structure.io.pdbx as pdbx

    with warnings.catch_warnings():
        # e.g. "elements were guessed from atom name": harmless for backbone atoms
        warnings.simplefilter("ignore", UserWarning)
        return _load_atom_array_inner(data, fmt, name, pdb, pdbx)


def _load_atom_array_inner(data, fmt, name, pdb, pdbx):
    try:
        if fmt == "bcif":
            raw = data.encode() if isinstance(data, str) else data
            f = pdbx.BinaryCIFFile.read(io.BytesIO(raw))
            arr = pdbx.get_structure(f, model=1, use_author_fields=True)
            return arr, _cif_resolution(f.block)
        text = data.decode("utf-8", errors="strict") if isinstance(data, bytes) else data
        if not text.strip():
            raise StructureError(f"{name}: file is empty")
        if fmt == "pdb":
            f = pdb.PDBFile.read(io.StringIO(text))
            if f.get_model_count() == 0:
                raise StructureError(f"{name}: no ATOM/HETATM records")
            arr = f.get_structure(model=1)
            return arr, _pdb_resolution(text)
        if fmt == "cif":
            f = pdbx.CIFFile.read(io.StringIO(text))
            arr = pdbx.get_structure(f, model=1, use_author_fields=True)
            return arr, _cif_resolution(f.block)
    except StructureError:
        raise
    except UnicodeDecodeError as e:
        raise StructureError(f"{name}: not a text {fmt.upper()} file ({e})") from e
    except Exception as e:  # biotite raises many types on malformed input
        raise StructureError(f"{name}: cannot parse as {fmt.upper()}: {type(e).__name__}: {e}") from e
    raise StructureError(f"{name}: unknown format {fmt!r}")


def _protein_atoms(arr, name: str, chain: str | None, hetero_residues: Sequence[str] = ()):
    """ATOM records of amino-acid residues of one chain (first chain by default), plus HETATM records of
    the residue names in ``hetero_residues`` (e.g. selenomethionine ``MSE``)."""
    import biotite.structure as struc

    if arr.array_length() == 0:
        raise StructureError(f"{name}: no atoms")
    sel = ~arr.hetero
    try:
        sel &= struc.filter_amino_acids(arr)
    except Exception as e:  # pragma: no cover - defensive
        raise StructureError(f"{name}: cannot classify residues: {e}") from e
    if len(hetero_residues):
        sel |= arr.hetero & np.isin(arr.res_name, list(hetero_residues))
    prot = arr[sel]
    if prot.array_length() == 0:
        raise StructureError(f"{name}: no protein (amino-acid ATOM) residues; not a protein structure")
    chains = list(dict.fromkeys(prot.chain_id.tolist()))
    if chain is None:
        chain = chains[0]
    elif chain not in chains:
        raise StructureError(f"{name}: chain {chain!r} not found; protein chains present: {chains}")
    return prot[prot.chain_id == chain], chain


def _backbone_from_chain_atoms(prot, chain: str, name: str, resolution: float | None) -> Backbone:
    import biotite.structure as struc

    starts = struc.get_residue_starts(prot)
    n_res = len(starts)
    res_index = np.searchsorted(starts, np.arange(prot.array_length()), side="right") - 1
    atoms = np.zeros((n_res, 4, 3), dtype=np.float32)
    mask = np.zeros((n_res, 4), dtype=bool)
    for k, an in enumerate(BACKBONE_ATOMS):
        idx = np.nonzero(prot.atom_name == an)[0]
        r = res_index[idx]
        # first occurrence per residue wins (altlocs are already resolved by biotite)
        r_unique, first = np.unique(r, return_index=True)
        atoms[r_unique, k] = prot.coord[idx[first]]
        mask[r_unique, k] = True
    res_names = prot.res_name[starts].astype("U3")
    seq = "".join(_three_to_one(r) for r in res_names)
    ins = prot.ins_code[starts].astype(str)
    if not np.isfinite(atoms).all():
        raise StructureError(f"{name}: non-finite coordinates")
    return Backbone(
        atoms=atoms, atom_mask=mask, sequence=seq, res_ids=prot.res_id[starts].astype(np.int64),
        ins_codes=ins, chain_id=str(chain), name=name, res_names=res_names, resolution=resolution,
    )


def parse_backbone(data: bytes | str, fmt: str, name: str = "structure", chain: str | None = None,
                   gzipped: bool = False, hetero_residues: Sequence[str] = ()) -> Backbone:
    """Parse in-memory file content (``fmt`` in ``pdb``/``cif``/``bcif``) into a :class:`Backbone`.

    Same semantics as :func:`read_backbone`; ``name`` is used in messages and as ``Backbone.name``.
    """
    if gzipped:
        try:
            data = gzip.decompress(data if isinstance(data, bytes) else data.encode("latin-1"))
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise StructureError(f"{name}: corrupt gzip data ({e})") from e
    arr, resolution = _load_atom_array(data, fmt, name)
    prot, chain = _protein_atoms(arr, name, chain, hetero_residues)
    return _backbone_from_chain_atoms(prot, chain, name, resolution)


def _strip_suffixes(path: Path) -> str:
    n = path.name
    if n.lower().endswith(".gz"):
        n = n[:-3]
    return n.rsplit(".", 1)[0] if "." in n else n


def read_backbone(path: str | os.PathLike, chain: str | None = None, *, name: str | None = None,
                  hetero_residues: Sequence[str] = ()) -> Backbone:
    """Read the backbone (N, CA, C, O) of one protein chain from a PDB / mmCIF / BinaryCIF file.

    The first model is used; only ATOM records of amino-acid residues are kept (HETATM, water and
    ligands are skipped, except the residue names in ``hetero_residues``; altlocs: first one).
    ``chain=None`` selects the first protein chain. ``name`` (default: the file name without its
    suffixes) labels messages and ``Backbone.name``.

    Raises:
        StructureError: missing/unreadable file, unsupported suffix, malformed content, no protein
            residues, or an absent ``chain``.
    """
    p = Path(path)
    fmt, gz = detect_format(p)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise StructureError(f"{p}: cannot read file ({e.strerror or e})") from e
    return parse_backbone(raw, fmt, name=_strip_suffixes(p) if name is None else name, chain=chain, gzipped=gz,
                          hetero_residues=hetero_residues)
