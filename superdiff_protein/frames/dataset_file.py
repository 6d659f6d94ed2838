"""The dataset file of frame-model training: its format, packing, loading and the helix/strand split.

One ``.pt`` file (format in ``docs/data.md``) holds every chain, coordinates quantised to int16
(:func:`_pack`, :func:`decode_coords`). :func:`load_dataset_file` reads it back with the allow-listed
loader (no code from the file runs); :func:`split_by_secondary_structure` ranks chains into helix-rich and
strand-rich halves. Writing it from PDB/mmCIF inputs: :mod:`superdiff_protein.frames.prepare`; reading it
as a torch ``Dataset``: :mod:`superdiff_protein.frames.data`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .checkpoints import CheckpointError, load_checkpoint_file
from .naming import unique_names
from .pdb_io import BACKBONE_ATOMS

__all__ = [
    "DatasetError",
    "RESTYPES",
    "SS_CODES",
    "CA_BREAK_THRESHOLD",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "decode_coords",
    "load_dataset_file",
    "SSSplit",
    "split_by_secondary_structure",
]

#: Residue-type order of ``aatype`` tokens (openfold / FrameDiff order), index 20 = unknown ``X``.
RESTYPES = "ARNDCQEGHILKMFPSTWYVX"
#: P-SEA secondary-structure labels: 0 = ``a`` (alpha helix), 1 = ``b`` (beta strand), 2 = ``c`` (coil).
SS_CODES = "abc"
#: A chain break precedes residue i when CA(i-1)-CA(i) exceeds this distance (Angstrom).
CA_BREAK_THRESHOLD = 4.2
FORMAT_NAME = "superdiff_protein.backbone_dataset"
FORMAT_VERSION = 1
_COORD_STEP = 0.01  # Angstrom per int16 unit (unless a chain is too large, then per-chain)


class DatasetError(RuntimeError, UserError):
    """Bad dataset input, configuration or file (message says what and where; exit code 2 in the CLI)."""

# ----------------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------------

def _chain_name(source: str, chain_id: str) -> str:
    base = source.rsplit("/", 1)[-1]
    if base.lower().endswith(".gz"):
        base = base[:-3]
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return f"{stem}_{chain_id}"


def _quantize(atoms: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    ca_ok = mask[:, 1]
    center = atoms[ca_ok, 1].astype(np.float64).mean(0) if ca_ok.any() else np.zeros(3)
    center = np.round(center, 2)
    rel = np.where(mask[..., None], atoms.astype(np.float64) - center, 0.0)
    maxabs = float(np.abs(rel).max()) if rel.size else 0.0
    scale = _COORD_STEP if maxabs / _COORD_STEP < 32767 else maxabs / 32767 * (1 + 1e-6)
    q = np.round(rel / scale).astype(np.int16)
    return q, scale, center


def decode_coords(data: dict) -> torch.Tensor:
    """(R, 4, 3) float32 coordinates (Angstrom) of all residues of a loaded dataset dict."""
    q = data["coords_q"].to(torch.float64)
    lengths = data["lengths"].to(torch.int64)
    scale = torch.repeat_interleave(data["coord_scale"].to(torch.float64), lengths)
    center = torch.repeat_interleave(data["coord_center"].to(torch.float64), lengths, dim=0)
    x = q * scale[:, None, None] + center[:, None, :]
    return (x * data["atom_mask"][..., None]).to(torch.float32)


def _pack(records: list[dict], cfg: dict, skipped: list, filtered: list, ignored: list) -> dict:
    n = len(records)
    lengths = np.array([r["atoms"].shape[0] for r in records], dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    qs, scales, centers = [], [], []
    for r in records:
        q, s, c = _quantize(r["atoms"], r["atom_mask"])
        qs.append(q)
        scales.append(s)
        centers.append(c)
    cat = lambda key, dt, shape: (np.concatenate([r[key] for r in records]).astype(dt) if n else np.zeros(shape, dt))  # noqa: E731
    ss = cat("ss", np.int8, (0,))
    ss_frac = np.zeros((n, 3), dtype=np.float32)
    for i in range(n):
        s = ss[offsets[i]:offsets[i + 1]]
        ss_frac[i] = np.bincount(s, minlength=3)[:3] / max(1, len(s))
    names = unique_names(_chain_name(r["source"], r["chain_id"]) for r in records)
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "atom_names": list(BACKBONE_ATOMS),
        "restypes": RESTYPES,
        "ss_codes": SS_CODES,
        "break_threshold": CA_BREAK_THRESHOLD,
        "names": names,
        "sources": [r["source"] for r in records],
        "chain_ids": [r["chain_id"] for r in records],
        "sequences": [r["sequence"] for r in records],
        "lengths": torch.from_numpy(lengths.astype(np.int32)),
        "offsets": torch.from_numpy(offsets),
        "coords_q": torch.from_numpy(np.concatenate(qs) if n else np.zeros((0, 4, 3), np.int16)),
        "coord_scale": torch.tensor(scales, dtype=torch.float32),
        "coord_center": torch.from_numpy(np.array(centers, dtype=np.float32).reshape(n, 3)),
        "atom_mask": torch.from_numpy(cat("atom_mask", bool, (0, 4))),
        "res_ids": torch.from_numpy(cat("res_ids", np.int32, (0,))),
        "ss": torch.from_numpy(ss),
        "chain_break": torch.from_numpy(cat("chain_break", bool, (0,))),
        "resolution": torch.tensor([math.nan if r["resolution"] is None else r["resolution"] for r in records],
                                   dtype=torch.float32),
        "ss_frac": torch.from_numpy(ss_frac),
        "splits": {},
        "config": cfg,
        "skipped": skipped,
        "filtered": filtered,
        "ignored": ignored,
    }


# ----------------------------------------------------------------------------------------------
# splitting
# ----------------------------------------------------------------------------------------------

@dataclass
class SSSplit:
    """Two disjoint index sets (positions in the dataset file) and their SS composition."""

    helix: np.ndarray
    strand: np.ndarray
    stats: dict = field(default_factory=dict)


def _half_stats(data: dict, idx: np.ndarray) -> dict:
    ss_frac = data["ss_frac"].numpy().astype(np.float64)
    lengths = data["lengths"].numpy().astype(np.float64)
    if idx.size == 0:
        return {"chains": 0}
    w = lengths[idx]
    res_frac = (ss_frac[idx] * w[:, None]).sum(0) / w.sum()
    return {
        "chains": int(idx.size),
        "residues": int(w.sum()),
        "mean_length": float(w.mean()),
        "helix_frac": float(res_frac[0]),
        "strand_frac": float(res_frac[1]),
        "coil_frac": float(res_frac[2]),
        "chain_mean_helix_frac": float(ss_frac[idx, 0].mean()),
        "chain_mean_strand_frac": float(ss_frac[idx, 1].mean()),
    }


def split_by_secondary_structure(dataset: Any, exclude_middle: float = 0.0) -> SSSplit:
    """Split chains into helix-rich and strand-rich halves.

    ``dataset``: a :class:`~superdiff_protein.frames.data.FrameDataset`, a loaded dataset dict or the path of
    a dataset file.

    Chains are ranked by ``helix_frac - strand_frac`` (P-SEA labels; ties broken by name) and cut
    at the median: the upper half is ``helix``, the lower half ``strand`` (for an odd count the
    middle chain goes to ``strand``).  ``exclude_middle`` in [0, 1) drops that fraction of all
    chains around the median so the halves differ more.  Indices refer to chain positions in the
    dataset file (``FrameDataset.chain_indices`` space), so they are independent of any subset.
    """
    if isinstance(dataset, dict):
        data = dataset
    elif isinstance(dataset, (str, os.PathLike)):
        data = load_dataset_file(dataset)
    else:  # a FrameDataset (or anything holding the loaded dict as ``.data``)
        data = dataset.data
    if not 0.0 <= exclude_middle < 1.0:
        raise DatasetError(f"exclude_middle must be in [0, 1), got {exclude_middle}")
    ss_frac = data["ss_frac"].numpy().astype(np.float64)
    n = ss_frac.shape[0]
    score = ss_frac[:, 0] - ss_frac[:, 1]
    names = np.array(data["names"], dtype=object)
    # descending score, ascending name
    order = np.array(sorted(range(n), key=lambda i: (-score[i], names[i])), dtype=np.int64)
    n_drop = int(round(exclude_middle * n))
    n_top = (n - n_drop) // 2
    helix = np.sort(order[:n_top])
    strand = np.sort(order[n_top + n_drop:])
    stats = {
        "method": "median of helix_frac - strand_frac (P-SEA)",
        "exclude_middle": exclude_middle,
        "excluded": int(n_drop),
        "helix": _half_stats(data, helix),
        "strand": _half_stats(data, strand),
        "score_threshold": float(score[order[n_top - 1]]) if n_top > 0 else None,
    }
    return SSSplit(helix=helix, strand=strand, stats=stats)


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------

_REQUIRED_KEYS = ("names", "lengths", "offsets", "coords_q", "coord_scale", "coord_center", "atom_mask",
                  "sequences", "ss", "chain_break", "ss_frac")


def load_dataset_file(path: str | os.PathLike) -> dict:
    """Load and validate a dataset file written by :func:`prepare_dataset` (allow-listed loader: no code runs)."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset file not found: {p}")
    try:
        data = load_checkpoint_file(p, "cpu")
    except CheckpointError as e:
        raise DatasetError(f"not a readable dataset file: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise DatasetError(f"{p}: not a superdiff_protein dataset file (missing format tag {FORMAT_NAME!r})")
    if data.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{p}: dataset format version {data.get('version')} unsupported (need {FORMAT_VERSION})")
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise DatasetError(f"{p}: dataset file lacks keys {missing}")
    return data
