"""Protein backbone structure I/O (PDB / mmCIF / BinaryCIF, optionally gzipped).

Reading is done with biotite, in :mod:`superdiff_protein.runs.structures` (the one :class:`Backbone` and
:func:`read_backbone` of the project, shared with ``eval``; re-exported here). Writing is done by hand so
that the output columns are fully controlled (fixed-width PDB, one chain, atoms ``N, CA, C[, O]`` per
residue) and so that the output is byte-for-byte deterministic.

* :func:`read_backbone` / :func:`parse_backbone` -> :class:`Backbone` (first model, one chain,
  ATOM records of amino-acid residues only; HETATM and water are skipped).
* :func:`write_backbone_pdb` / :func:`write_trajectory_pdb` write PDB files **atomically**
  (:func:`superdiff_protein.runs.atomic.atomic_open`: temporary file in the same directory, then
  ``os.replace``), so a killed process never leaves a truncated file under the final name.

Every problem with an input file raises :class:`StructureError` (a ``ValueError``) with a message
that names the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..runs.atomic import atomic_open
from ..runs.structures import (
    _ONE_TO_THREE,
    BACKBONE_ATOMS,
    SUPPORTED_SUFFIXES,
    Backbone,
    StructureError,
    chain_break_flags,
    detect_format,
    parse_backbone,
    read_backbone,
)

__all__ = [
    "BACKBONE_ATOMS",
    "Backbone",
    "StructureError",
    "PDBWriteError",
    "SUPPORTED_SUFFIXES",
    "detect_format",
    "parse_backbone",
    "read_backbone",
    "write_backbone_pdb",
    "write_trajectory_pdb",
    "format_backbone_pdb",
    "chain_break_flags",
]

_ELEMENTS = {"N": "N", "CA": "C", "C": "C", "O": "O"}


class PDBWriteError(ValueError):
    """Arguments that cannot be written as a valid PDB file (shape, range, NaN, ...)."""


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------

def _as_atoms(atoms, what: str = "atoms") -> np.ndarray:
    try:
        a = np.asarray(atoms.detach().cpu() if hasattr(atoms, "detach") else atoms, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise PDBWriteError(f"{what}: cannot convert to a float array ({e})") from e
    if a.ndim != 3 or a.shape[1] not in (3, 4) or a.shape[2] != 3:
        raise PDBWriteError(f"{what}: expected shape (L, 4, 3) or (L, 3, 3) for N, CA, C[, O]; got {a.shape}")
    return a


def _residue_names(sequence, n: int) -> list[str]:
    if sequence is None:
        return ["GLY"] * n
    if isinstance(sequence, str):
        seq = list(sequence)
        if len(seq) != n:
            raise PDBWriteError(f"sequence has length {len(seq)} but there are {n} residues")
        out = []
        for s in seq:
            if s.upper() not in _ONE_TO_THREE:
                raise PDBWriteError(f"unknown one-letter residue code {s!r} in sequence")
            out.append(_ONE_TO_THREE[s.upper()])
        return out
    names = [str(s).upper() for s in sequence]
    if len(names) != n:
        raise PDBWriteError(f"sequence has length {len(names)} but there are {n} residues")
    for s in names:
        if not (1 <= len(s) <= 3 and s.isalnum()):
            raise PDBWriteError(f"invalid residue name {s!r} (1-3 alphanumeric characters)")
    return names


def _remark_lines(remarks) -> list[str]:
    if remarks is None:
        return []
    if isinstance(remarks, str):
        remarks = [remarks]
    lines = []
    for r in remarks:
        for part in str(r).splitlines() or [""]:
            part = part.encode("ascii", "replace").decode("ascii")
            while True:
                lines.append(f"REMARK   1 {part[:69]}".ljust(80))
                part = part[69:]
                if not part:
                    break
    return lines


def _check_coords(a: np.ndarray, what: str) -> None:
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise PDBWriteError(f"{what}: non-finite coordinate at residue {bad[-3]} (0-based)")
    if (a < -999.999).any() or (a > 9999.999).any():
        raise PDBWriteError(
            f"{what}: coordinates outside the PDB range [-999.999, 9999.999] A "
            f"(min {a.min():.1f}, max {a.max():.1f}); are they in nm or unscaled?"
        )


def _model_lines(a: np.ndarray, names: list[str], chain_id: str, numbers: np.ndarray, icodes: list[str],
                 b: np.ndarray, mask: np.ndarray) -> list[str]:
    lines = []
    serial = 0
    n_at = a.shape[1]
    for i in range(a.shape[0]):
        for k in range(n_at):
            if not mask[i, k]:
                continue
            serial += 1
            an = BACKBONE_ATOMS[k]
            x, y, z = a[i, k]
            lines.append(
                f"ATOM  {serial % 100000:5d} {_atom_name_field(an)}"
                f" {names[i]:>3s} {chain_id}{int(numbers[i]):4d}{icodes[i]:1s}   "
                f"{x:8.3f}{y:8.3f}{z:8.3f}{1.0:6.2f}{b[i, k]:6.2f}          {_ELEMENTS[an]:>2s}  "
            )
    last = a.shape[0] - 1
    if last >= 0:
        serial += 1
        lines.append(f"TER   {serial % 100000:5d}      {names[last]:>3s} {chain_id}{int(numbers[last]):4d}{icodes[last]:1s}".ljust(80))
    return lines


def _atom_name_field(an: str) -> str:
    # element symbols of the backbone atoms are one letter -> name starts in column 14
    return f" {an:<3s}"


def _prepare(atoms, sequence, chain_id, residue_start, residue_numbers, insertion_codes, b_factors,
             atom_mask, what="atoms"):
    a = _as_atoms(atoms, what)
    n, n_at = a.shape[0], a.shape[1]
    if not isinstance(chain_id, str) or len(chain_id) != 1 or not chain_id.isprintable() or chain_id == " ":
        raise PDBWriteError(f"chain_id must be a single printable character, got {chain_id!r}")
    names = _residue_names(sequence, n)
    if residue_numbers is None:
        numbers = np.arange(residue_start, residue_start + n)
    else:
        numbers = np.asarray(residue_numbers).astype(np.int64).reshape(-1)
        if numbers.shape[0] != n:
            raise PDBWriteError(f"residue_numbers has {numbers.shape[0]} entries for {n} residues")
    if n and (numbers.min() < -999 or numbers.max() > 9999):
        raise PDBWriteError("residue numbers must lie in [-999, 9999] to fit the PDB format")
    if insertion_codes is None:
        icodes = [""] * n
    else:
        icodes = [str(c) for c in insertion_codes]
        if len(icodes) != n or any(len(c) > 1 for c in icodes):
            raise PDBWriteError("insertion_codes must have one entry of at most one character per residue")
    if b_factors is None:
        b = np.zeros((n, n_at))
    else:
        b = np.asarray(b_factors.detach().cpu() if hasattr(b_factors, "detach") else b_factors, dtype=np.float64)
        if b.shape == (n,):
            b = np.repeat(b[:, None], n_at, axis=1)
        if b.shape != (n, n_at):
            raise PDBWriteError(f"b_factors must have shape ({n},) or ({n}, {n_at}); got {b.shape}")
        if not np.isfinite(b).all() or (b < -99.99).any() or (b > 999.99).any():
            raise PDBWriteError("b_factors must be finite and within [-99.99, 999.99] (PDB column width)")
    if atom_mask is None:
        mask = np.ones((n, n_at), dtype=bool)
    else:
        mask = np.asarray(atom_mask, dtype=bool)
        if mask.shape != (n, n_at):
            raise PDBWriteError(f"atom_mask must have shape ({n}, {n_at}); got {mask.shape}")
    _check_coords(np.where(mask[..., None], a, 0.0), what)
    return a, names, numbers, icodes, b, mask


def format_backbone_pdb(atoms, sequence=None, chain_id: str = "A", residue_start: int = 1,
                        b_factors=None, remarks=None, *, residue_numbers=None, insertion_codes=None,
                        atom_mask=None) -> str:
    """PDB text for one backbone; see :func:`write_backbone_pdb` for the arguments."""
    a, names, numbers, icodes, b, mask = _prepare(atoms, sequence, chain_id, residue_start,
                                                   residue_numbers, insertion_codes, b_factors, atom_mask)
    lines = _remark_lines(remarks)
    lines += _model_lines(a, names, chain_id, numbers, icodes, b, mask)
    lines.append("END".ljust(80))
    return "\n".join(lines) + "\n"


def write_backbone_pdb(path: str | os.PathLike, atoms, sequence=None, chain_id: str = "A",
                       residue_start: int = 1, b_factors=None, remarks=None, *, residue_numbers=None,
                       insertion_codes=None, atom_mask=None) -> Path:
    """Write one backbone chain as a PDB file, atomically.

    Args:
        path: output file (its directory must exist).
        atoms: (L, 4, 3) N, CA, C, O or (L, 3, 3) N, CA, C coordinates in Angstrom (numpy or torch).
            With 3 atoms only N, CA, C are written (placing O is left to the caller).
        sequence: one-letter string (``X`` -> UNK) or list of three-letter names; default all ``GLY``
            (a backbone without CB is chemically glycine; tools that rebuild side chains then do
            not invent a CB).
        chain_id: one character.
        residue_start: number of the first residue (consecutive numbering) unless
            ``residue_numbers`` gives every number explicitly (then ``insertion_codes`` may too).
        b_factors: (L,) per residue or (L, n_atoms) per atom, within [-99.99, 999.99].
        remarks: string or list of strings written as ``REMARK   1`` lines.
        atom_mask: optional (L, n_atoms) bool; False atoms are not written.

    Returns:
        The path written. Raises :class:`PDBWriteError` on invalid arguments (nothing is written).
    """
    text = format_backbone_pdb(atoms, sequence, chain_id, residue_start, b_factors, remarks,
                               residue_numbers=residue_numbers, insertion_codes=insertion_codes,
                               atom_mask=atom_mask)
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return Path(path)


def write_trajectory_pdb(path: str | os.PathLike, frames: Sequence | np.ndarray, sequence=None,
                         chain_id: str = "A", residue_start: int = 1, b_factors=None, remarks=None, *,
                         residue_numbers=None) -> Path:
    """Write a multi-model PDB (``MODEL``/``ENDMDL``, one model per frame), atomically.

    ``frames`` is a sequence of (L, 4, 3) or (L, 3, 3) arrays (or one (T, L, n, 3) array), all of the
    same shape; ``b_factors`` may be per residue (L,), per atom (L, n), or per frame (T, L[, n]).
    Other arguments are as in :func:`write_backbone_pdb`.
    """
    frames = list(frames)
    if not frames:
        raise PDBWriteError("frames is empty: a trajectory needs at least one model")
    if len(frames) > 9999:
        raise PDBWriteError(f"{len(frames)} models exceed the PDB limit of 9999")
    shape = _as_atoms(frames[0], "frames[0]").shape
    b_all = None
    if b_factors is not None:
        b_all = np.asarray(b_factors.detach().cpu() if hasattr(b_factors, "detach") else b_factors, dtype=np.float64)
        per_frame = b_all.ndim >= 1 and b_all.shape[0] == len(frames) and b_all.shape[1:] in ((shape[0],), shape[:2])
        if not per_frame:
            b_all = np.broadcast_to(b_all, (len(frames),) + b_all.shape)
    # validate everything before opening the output
    prepared = []
    for t, fr in enumerate(frames):
        a = _as_atoms(fr, f"frames[{t}]")
        if a.shape != shape:
            raise PDBWriteError(f"frames[{t}] has shape {a.shape}, expected {shape} like frames[0]")
        prepared.append(_prepare(a, sequence, chain_id, residue_start, residue_numbers, None,
                                 None if b_all is None else b_all[t], None, what=f"frames[{t}]"))
    with atomic_open(path, "w") as fh:
        for ln in _remark_lines(remarks):
            fh.write(ln + "\n")
        for t, (a, names, numbers, icodes, b, mask) in enumerate(prepared):
            fh.write(f"MODEL     {t + 1:4d}".ljust(80) + "\n")
            for ln in _model_lines(a, names, chain_id, numbers, icodes, b, mask):
                fh.write(ln + "\n")
            fh.write("ENDMDL".ljust(80) + "\n")
        fh.write("END".ljust(80) + "\n")
    return Path(path)
