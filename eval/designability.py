"""Self-consistency (designability): ProteinMPNN designs -> ESMFold refolds -> compare with the input backbone.

For every designed sequence: ``sc_rmsd`` = CA RMSD after optimal superposition (residue i <-> residue i),
``sc_tm`` = TM-align TM-score normalised by the sample's length, ``plddt`` = mean CA pLDDT of the refold.
Per backbone: ``sc_rmsd`` = min over sequences, ``sc_tm`` = max over sequences, ``plddt`` / ``sc_best_seq`` /
``sc_best_index`` of the min-scRMSD sequence, ``designable`` = min scRMSD < ``threshold`` (2 A).
"""
from __future__ import annotations

import numpy as np

from .fold import Fold, fold_sequences
from .io import Backbone
from .metrics import superposed_rmsd, tm_align
from .mpnn import Design

DESIGNABLE_RMSD = 2.0


def compare_refold(bb: Backbone, fold: Fold, sequence: str) -> dict:
    """scRMSD / scTM of one refold against the input backbone."""
    ca, ref = bb.ca, fold.backbone[:, 1]
    return {
        "sc_rmsd": superposed_rmsd(ref, ca),
        "sc_tm": tm_align(ca, ref, sequence, sequence).tm_norm_1,
        "plddt": fold.plddt,
        "ptm": fold.ptm,
    }


def summarise(per_seq: list[dict], threshold: float = DESIGNABLE_RMSD) -> dict:
    """Best-over-sequences summary of per-sequence self-consistency records."""
    ok = [r for r in per_seq if np.isfinite(r.get("sc_rmsd", np.nan))]
    if not ok:
        return {"sc_rmsd": float("nan"), "sc_tm": float("nan"), "plddt": float("nan"), "designable": None}
    best = min(range(len(ok)), key=lambda i: ok[i]["sc_rmsd"])
    return {
        "sc_rmsd": float(ok[best]["sc_rmsd"]),
        "sc_tm": float(max(r["sc_tm"] for r in ok)),
        "plddt": float(ok[best]["plddt"]),
        "sc_best_index": int(ok[best]["index"]),
        "sc_best_seq": ok[best]["sequence"],
        "sc_rmsd_mean": float(np.mean([r["sc_rmsd"] for r in ok])),
        "designable": bool(ok[best]["sc_rmsd"] < threshold),
    }


def score_refolds(bb: Backbone, designs: list[Design], folds: list[Fold], threshold: float = DESIGNABLE_RMSD
                  ) -> tuple[dict, list[dict]]:
    """Compare the refolds of ``designs`` (same order) with ``bb``: (summary, per-sequence records)."""
    if len(folds) != len(designs):
        raise ValueError(f"{len(designs)} designs but {len(folds)} refolds")
    per_seq = []
    for k, (d, f) in enumerate(zip(designs, folds)):
        rec = {"index": k, "sequence": d.sequence, "mpnn_ll": d.log_likelihood}
        rec.update(compare_refold(bb, f, d.sequence))
        per_seq.append(rec)
    return summarise(per_seq, threshold), per_seq


def self_consistency(bb: Backbone, designs: list[Design], fold_model, batch_size: int = 4,
                     num_recycles: int | None = None, threshold: float = DESIGNABLE_RMSD,
                     precision: str | None = None) -> tuple[dict, list[dict], list[Fold]]:
    """Refold every design of one backbone; return (summary, per-sequence records, folds). ``eval.steps``
    folds the designs of many backbones together instead (batched by length) and scores with
    :func:`score_refolds`."""
    seqs = [d.sequence for d in designs]
    folds = fold_sequences(fold_model, seqs, batch_size=batch_size, num_recycles=num_recycles, precision=precision)
    summ, per_seq = score_refolds(bb, designs, folds, threshold)
    return summ, per_seq, folds
