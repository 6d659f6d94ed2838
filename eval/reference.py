"""Novelty reference sets: load from a directory of PDB/mmCIF files, a tar archive of them, or a prepared
``.npz`` file (see :func:`prepare_reference`), and the cheap per-chain shape descriptor used by the optional
heuristic prefilter.

Prepared file format (``numpy.savez``; all arrays):

* ``format``: ``"superdiff-reference-v1"``;
* ``names`` (N,) str; ``sequences`` (N,) str; ``lengths`` (N,) int64; ``offsets`` (N+1,) int64;
* ``ca`` (sum L, 3) float32: CA coordinates of all chains concatenated (chain i is
  ``ca[offsets[i]:offsets[i+1]]``);
* ``descriptors`` (N, D) float32: :func:`shape_descriptor` of each chain.

Usage: ``python -m eval.reference <dir|archive> <out.npz> [--workers N]``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInputError, StructureReadError
from .io import STRUCTURE_SUFFIXES, atomic_write_bytes, backbone_from_text, discover_structures, is_tar, \
    iter_tar_structures, read_backbone

FORMAT = "superdiff-reference-v1"
MIN_REFERENCE_LENGTH = 10
_DESC_BINS = np.arange(0.0, 42.0, 2.0)  # 0..40 A in 2 A bins (+ overflow)


def shape_descriptor(ca: np.ndarray) -> np.ndarray:
    """Cheap, alignment-free fold descriptor: the normalised histogram of CA-CA distances of residue pairs
    with ``|i-j| >= 3`` (2 A bins to 40 A plus overflow), followed by the radius of gyration divided by
    ``L ** 0.38`` (compactness) and the relative contact order at 8 A. Only used for the heuristic
    prefilter; it has no bearing on the exact mode."""
    x = np.asarray(ca, dtype=np.float64)
    x = x[np.isfinite(x).all(-1)]
    L = len(x)
    if L < 4:
        return np.zeros(len(_DESC_BINS) + 2, dtype=np.float32)
    i, j = np.triu_indices(L, k=3)
    d = np.linalg.norm(x[i] - x[j], axis=-1)
    h = np.histogram(np.minimum(d, _DESC_BINS[-1] + 1.0), bins=np.append(_DESC_BINS, np.inf))[0].astype(np.float64)
    h /= max(h.sum(), 1.0)
    rg = np.sqrt(((x - x.mean(0)) ** 2).sum(-1).mean())
    contact = d < 8.0
    co = float((j - i)[contact].sum() / (L * max(contact.sum(), 1)))
    return np.concatenate([h, [rg / L**0.38 / 10.0, co * 5.0]]).astype(np.float32)


@dataclass
class Reference:
    """A reference set of CA traces for novelty."""

    names: np.ndarray
    sequences: np.ndarray
    lengths: np.ndarray
    offsets: np.ndarray
    ca: np.ndarray
    descriptors: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    def chain(self, i: int) -> np.ndarray:
        return self.ca[self.offsets[i]:self.offsets[i + 1]].astype(np.float64)

    def fingerprint(self) -> str:
        """Content hash (changes when the reference changes; used for resume caches)."""
        h = hashlib.sha1()
        h.update(self.lengths.tobytes())
        h.update(np.ascontiguousarray(self.ca[:: max(1, len(self.ca) // 5000)]).tobytes())
        h.update("|".join(map(str, self.names)).encode())
        return h.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        import io

        buf = io.BytesIO()
        np.savez_compressed(buf, format=np.array(FORMAT), names=self.names.astype(str),
                            sequences=self.sequences.astype(str), lengths=self.lengths, offsets=self.offsets,
                            ca=self.ca, descriptors=self.descriptors)
        atomic_write_bytes(path, buf.getvalue())


def _from_chains(chains: list[tuple[str, str, np.ndarray]]) -> Reference:
    chains = [c for c in chains if len(c[2]) >= MIN_REFERENCE_LENGTH]
    if not chains:
        raise BadInputError("the reference set holds no readable protein chain (>= 10 residues with CA)")
    lengths = np.array([len(c[2]) for c in chains], dtype=np.int64)
    return Reference(
        names=np.array([c[0] for c in chains]),
        sequences=np.array([c[1] for c in chains]),
        lengths=lengths,
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        ca=np.concatenate([c[2] for c in chains]).astype(np.float32),
        descriptors=np.stack([shape_descriptor(c[2]) for c in chains]),
    )


def _parse_file(path: str) -> tuple[str, str, np.ndarray] | None:
    try:
        bb = read_backbone(path)
    except StructureReadError:
        return None
    ok = np.isfinite(bb.ca).all(-1)
    return Path(path).stem, "".join(np.asarray(list(bb.sequence))[ok]), bb.ca[ok]


def _parse_text(item: tuple[str, str, str]) -> tuple[str, str, np.ndarray] | None:
    name, suffix, text = item
    try:
        bb = backbone_from_text(text, suffix, name)
    except StructureReadError:
        return None
    ok = np.isfinite(bb.ca).all(-1)
    return Path(name).stem, "".join(np.asarray(list(bb.sequence))[ok]), bb.ca[ok]


def build_reference(source: str | os.PathLike, workers: int = 1, progress: bool = False) -> Reference:
    """Parse a directory (recursive) or tar archive of PDB/mmCIF files into a :class:`Reference`.
    Unreadable files are skipped."""
    src = Path(source)
    if is_tar(src) and src.is_file():
        items = list(iter_tar_structures(src))
        func, jobs = _parse_text, items
    elif src.is_dir():
        jobs = [str(p) for p in discover_structures(src)]
        func = _parse_file
    else:
        raise BadInputError(f"reference {str(src)!r} is not a directory, tar archive or prepared .npz file")
    if not jobs:
        raise BadInputError(f"reference {str(src)!r} holds no structure files ({', '.join(STRUCTURE_SUFFIXES)})")
    from tqdm.auto import tqdm

    if workers > 1 and len(jobs) > 32:
        with ProcessPoolExecutor(workers, mp_context=_mp_context()) as ex:
            results = list(tqdm(ex.map(func, jobs, chunksize=16), total=len(jobs), disable=not progress,
                                desc="reading reference", unit="chain"))
    else:
        results = [func(j) for j in tqdm(jobs, disable=not progress, desc="reading reference", unit="chain")]
    return _from_chains([r for r in results if r is not None])


def load_reference(path: str | os.PathLike, workers: int = 1, progress: bool = False) -> Reference:
    """Load a prepared ``.npz`` reference, or build one from a directory / tar archive."""
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"reference {str(p)!r} does not exist")
    if p.is_file() and p.suffix.lower() == ".npz":
        try:
            z = np.load(p, allow_pickle=False)
            if str(z["format"]) != FORMAT:
                raise BadInputError(f"reference {str(p)!r} has format {str(z['format'])!r}, expected {FORMAT!r}")
            return Reference(names=z["names"], sequences=z["sequences"], lengths=z["lengths"],
                             offsets=z["offsets"], ca=z["ca"], descriptors=z["descriptors"])
        except BadInputError:
            raise
        except Exception as exc:
            raise BadInputError(f"reference {str(p)!r} is not a prepared reference file ({exc})") from exc
    return build_reference(p, workers=workers, progress=progress)


def prepare_reference(source: str | os.PathLike, out: str | os.PathLike, workers: int = 1,
                      progress: bool = True) -> Reference:
    """Build a reference from ``source`` (directory or tar archive) and save it as a prepared ``.npz``."""
    ref = build_reference(source, workers=workers, progress=progress)
    ref.save(out)
    return ref


def _mp_context():
    import multiprocessing as mp

    return mp.get_context("spawn")


def main(argv: list[str] | None = None) -> int:
    """``python -m eval.reference SOURCE OUT.npz``: prepare a novelty reference file."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="directory or tar archive of PDB/mmCIF files")
    ap.add_argument("out", help="output .npz")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    try:
        ref = prepare_reference(args.source, args.out, workers=args.workers)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(ref)} chains, {int(ref.lengths.sum())} residues")
    return 0


if __name__ == "__main__":
    sys.exit(main())
