"""Write a copy of a dataset file whose helix or strand half leaves out chains above a secondary-structure fraction
(issue 17 data experiments).

The helix model samples helix fractions of 0.65-0.74 against its half's 0.48 (models/checkpoints/README.md): it
piles onto the helical-bundle mode of the half, so ``--half helix --column helix --max 0.6`` drops the most helical
chains. The strand half is 60 % coil (P-SEA), and its model misses the geometry goals in loops, so ``--half strand
--column coil --max 0.7`` drops the chains with the most coil. Only ``splits.ss.<half>`` changes; the other half,
the chains and everything else are kept, so ``data.path=OUTPUT data.subset=<half>`` trains on the capped half.

    python scripts/cap_half.py .gpu_data/pdownb.pt .gpu_data/pdownb_hcap.pt --half helix --column helix --max 0.6
    python scripts/cap_half.py .gpu_data/pdownb.pt .gpu_data/pdownb_scap.pt --half strand --column coil --max 0.7

The input goes through the safe dataset loader; the output is written atomically.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from superdiff_protein.frames.dataset_file import load_dataset_file
from superdiff_protein.runs.atomic import atomic_open
from superdiff_protein.errors import UserError

COLUMNS = ("helix", "strand", "coil")          # the order of the dataset's ss_frac columns


def cap_half(data: dict, half: str, column: str, max_frac: float) -> dict:
    """``data`` with its ``half`` cut to chains whose ``column`` fraction is <= ``max_frac`` (stats recorded under
    ``splits.ss.stats.<half>_cap``)."""
    ss = data["splits"].get("ss")
    if ss is None or half not in ss:
        raise UserError(f"the dataset file has no {half} half (prepare it with split=ss)")
    if column not in COLUMNS:
        raise UserError(f"--column must be one of {', '.join(COLUMNS)}")
    frac = np.asarray(data["ss_frac"], dtype=np.float64)
    idx = np.asarray(ss[half], dtype=np.int64)
    keep = idx[frac[idx, COLUMNS.index(column)] <= max_frac]
    if len(keep) == 0:
        raise UserError(f"no chain of the {half} half has a {column} fraction <= {max_frac}")
    lengths = np.asarray(data["lengths"], dtype=np.float64)[keep]
    stats = dict(ss.get("stats", {}))
    stats[f"{half}_cap"] = {
        "column": column, "max": max_frac, "chains_before": int(len(idx)), "chains": int(len(keep)),
        "chain_mean_helix_strand_coil": [round(float(v), 4) for v in frac[keep].mean(0)],
        "residue_weighted_helix_strand_coil": [round(float(v), 4)
                                               for v in (frac[keep] * lengths[:, None]).sum(0) / lengths.sum()],
    }
    out = dict(data)
    out["splits"] = dict(data["splits"])
    out["splits"]["ss"] = {**ss, half: torch.from_numpy(keep), "stats": stats}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--half", choices=("helix", "strand"), default="helix")
    p.add_argument("--column", choices=COLUMNS, default="helix")
    p.add_argument("--max", type=float, default=0.6, dest="max_frac")
    a = p.parse_args(argv)
    try:
        if not 0.0 < a.max_frac <= 1.0:
            raise UserError("--max must lie in (0, 1]")
        out = cap_half(load_dataset_file(a.input), a.half, a.column, a.max_frac)
        with atomic_open(a.output, "wb") as fh:
            torch.save(out, fh)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    st = out["splits"]["ss"]["stats"][f"{a.half}_cap"]
    print(f"{a.half} half: {st['chains_before']} -> {st['chains']} chains; chain-mean helix/strand/coil "
          f"{st['chain_mean_helix_strand_coil']}; residue-weighted {st['residue_weighted_helix_strand_coil']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
