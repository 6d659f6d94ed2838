"""Consecutive CA–CA distances in range (3.6–4.0 Å), split by the secondary structure of each pair (issue 17).

A pair (i, i+1) is "helix" when P-SEA calls both residues helix, "strand" when it calls both strand, and "other"
otherwise (coil, and the ends of elements); the range is ``eval.metrics.CA_CA_WINDOW``. The model card uses it to
separate a model's per-class accuracy from its composition: the embedded helix model draws helices almost
perfectly and coil much less well, so a model with less helix loses CA–CA even at the same per-class rates.

    python scripts/caca_by_ss.py runs/eval_ship_s0/samples/helix runs/eval_s15a_s0/samples/helix

Each argument is a folder searched recursively for ``*.pdb``. Prints one markdown row per folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.metrics import CA_CA_WINDOW, secondary_structure  # noqa: E402
from superdiff_protein.errors import UserError  # noqa: E402
from superdiff_protein.runs.structures import read_backbone  # noqa: E402

CLASSES = ("helix", "strand", "other")


def pair_counts(ca: np.ndarray, sse: str) -> dict[str, tuple[int, int]]:
    """(in range, total) consecutive CA–CA pairs per class, for one chain: ``ca`` (L, 3), ``sse`` P-SEA a/b/c/-."""
    ca = np.asarray(ca, dtype=np.float64)
    if len(sse) != len(ca):
        raise ValueError(f"{len(sse)} SS labels for {len(ca)} residues")
    d = np.linalg.norm(ca[1:] - ca[:-1], axis=-1)
    ok = (d >= CA_CA_WINDOW[0]) & (d <= CA_CA_WINDOW[1])   # NaN (missing CA) compares false: out of range
    a = np.frombuffer(sse.encode(), dtype="S1")
    same = a[:-1] == a[1:]
    cls = np.where(same & (a[:-1] == b"a"), 0, np.where(same & (a[:-1] == b"b"), 1, 2))
    return {name: (int(ok[cls == k].sum()), int((cls == k).sum())) for k, name in enumerate(CLASSES)}


def folder_counts(folder: Path) -> dict[str, tuple[int, int]]:
    """Summed :func:`pair_counts` over every ``*.pdb`` under ``folder``."""
    files = sorted(folder.rglob("*.pdb"))
    if not files:
        raise UserError(f"no .pdb files under {folder}")
    tot = {c: [0, 0] for c in CLASSES}
    for f in files:
        ca = np.asarray(read_backbone(f).atoms, dtype=np.float64)[:, 1]
        for c, (k, n) in pair_counts(ca, secondary_structure(ca)["sse"]).items():
            tot[c][0] += k
            tot[c][1] += n
    return {c: (v[0], v[1]) for c, v in tot.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path)
    a = p.parse_args(argv)
    print("| samples | helix pairs | strand pairs | other pairs | all | share of helix pairs |")
    print("| --- | --- | --- | --- | --- | --- |")
    try:
        for folder in a.folders:
            t = folder_counts(folder)
            n_all = sum(n for _, n in t.values())
            k_all = sum(k for k, _ in t.values())
            cells = [f"{100 * k / n:.1f} % ({n:,})" if n else "– (0)" for k, n in (t[c] for c in CLASSES)]
            print(f"| {folder} | {' | '.join(cells)} | {100 * k_all / n_all:.1f} % | "
                  f"{100 * t['helix'][1] / n_all:.0f} % |")
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
