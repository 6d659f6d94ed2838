"""Where a folder's CA clashes are: their sequence separation and distance (issue 17, session 17).

Counts the CA clashes of ``eval.metrics`` (two CAs at least ``CA_CLASH_SEP`` apart in sequence, closer than
``CA_CLASH_DIST``) in every ``*.pdb`` under each folder, and splits them by sequence separation |i - j|. Local
clashes (3-6) point at loop geometry; long-range ones (> 12) at segments passing through each other.

    python scripts/clash_separation.py runs/s17/eval_40_s0/samples/helix runs/s17/eval_40_s0/samples/strand

Prints one markdown row per folder: samples, clashes per sample, the share of clashes per separation class and
the median clash distance (Å).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.io import StructureReadError, read_backbone  # noqa: E402
from eval.metrics import CA_CLASH_SEP, ca_clash_pairs  # noqa: E402

#: separation classes (inclusive upper bounds; the last is open)
CLASSES = ((4, "3-4"), (6, "5-6"), (12, "7-12"), (None, ">12"))


def clash_pairs(ca: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sequence separations and distances of the CA clashes of one chain (``ca`` (N, 3), in chain order)."""
    i, j, d = ca_clash_pairs(ca)
    return j - i, d


def summarise(folder: Path) -> dict:
    """Clash counts of every PDB under ``folder`` by separation class."""
    files = sorted(folder.rglob("*.pdb"))
    if not files:
        raise StructureReadError(f"{folder}: no .pdb files")
    seps, dists = [], []
    for f in files:
        s, d = clash_pairs(read_backbone(f).ca)
        seps.append(s)
        dists.append(d)
    sep, dist = np.concatenate(seps), np.concatenate(dists)
    shares, lo = {}, CA_CLASH_SEP
    for hi, name in CLASSES:
        m = (sep >= lo) if hi is None else (sep >= lo) & (sep <= hi)
        shares[name] = float(m.mean()) if len(sep) else float("nan")
        lo = (hi or 0) + 1
    return {"samples": len(files), "clashes_per_sample": len(sep) / len(files), "shares": shares,
            "median_distance": float(np.median(dist)) if len(dist) else float("nan")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", type=Path, nargs="+")
    a = p.parse_args(argv)
    try:
        rows = [(folder, summarise(folder)) for folder in a.folders]
    except StructureReadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("| folder | samples | clashes / sample | " + " | ".join(f"separation {n}" for _, n in CLASSES)
          + " | median distance (Å) |")
    print("| --- " * (4 + len(CLASSES)) + "|")
    for folder, r in rows:
        shares = " | ".join(f"{r['shares'][n] * 100:.0f} %" for _, n in CLASSES)
        print(f"| {folder} | {r['samples']} | {r['clashes_per_sample']:.2f} | {shares} | {r['median_distance']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
