"""Write a copy of a dataset file whose ``helix`` half leaves out its most helical chains (issue 17 experiment).

The helix model samples helix fractions of 0.65-0.74 against its half's 0.48 (models/checkpoints/README.md): it
piles onto the helical-bundle mode of the half. This writes ``OUTPUT`` with ``splits.ss.helix`` restricted to
chains whose P-SEA helix fraction is at most ``--max-helix``; the strand half, the chains and everything else
are unchanged, so ``data.path=OUTPUT data.subset=helix`` trains on the capped half.

    python scripts/cap_helix_half.py .gpu_data/pdownb.pt .gpu_data/pdownb_hcap.pt --max-helix 0.6

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


def cap_helix_half(data: dict, max_helix: float) -> dict:
    """``data`` with its ``helix`` half cut to chains of helix fraction <= ``max_helix`` (stats recorded)."""
    ss = data["splits"].get("ss")
    if ss is None or "helix" not in ss:
        raise UserError("the dataset file has no helix/strand split (prepare it with split=ss)")
    frac = np.asarray(data["ss_frac"], dtype=np.float64)
    idx = np.asarray(ss["helix"], dtype=np.int64)
    keep = idx[frac[idx, 0] <= max_helix]
    if len(keep) == 0:
        raise UserError(f"no chain of the helix half has a helix fraction <= {max_helix}")
    lengths = np.asarray(data["lengths"], dtype=np.float64)[keep]
    stats = dict(ss.get("stats", {}))
    stats["helix_cap"] = {
        "max_helix": max_helix, "chains_before": int(len(idx)), "chains": int(len(keep)),
        "chain_mean_helix_strand_coil": [round(float(v), 4) for v in frac[keep].mean(0)],
        "residue_weighted_helix_strand_coil": [round(float(v), 4)
                                               for v in (frac[keep] * lengths[:, None]).sum(0) / lengths.sum()],
    }
    out = dict(data)
    out["splits"] = dict(data["splits"])
    out["splits"]["ss"] = {**ss, "helix": torch.from_numpy(keep), "stats": stats}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--max-helix", type=float, default=0.6)
    a = p.parse_args(argv)
    try:
        if not 0.0 < a.max_helix <= 1.0:
            raise UserError("--max-helix must lie in (0, 1]")
        out = cap_helix_half(load_dataset_file(a.input), a.max_helix)
        with atomic_open(a.output, "wb") as fh:
            torch.save(out, fh)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    st = out["splits"]["ss"]["stats"]["helix_cap"]
    print(f"helix half: {st['chains_before']} -> {st['chains']} chains; chain-mean helix/strand/coil "
          f"{st['chain_mean_helix_strand_coil']}; residue-weighted {st['residue_weighted_helix_strand_coil']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
