"""Local geometry of a frame model's clean predictions from real chains, before any sampling (issue 17).

Noises real chains of a prepared dataset to fixed times t with the SE(3) forward marginal, predicts the clean
frames once without and once with self-conditioning (the second call fed the first's output, as the sampler
does), and counts the predicted consecutive CA–CA distances within ``eval.metrics.CA_CA_WINDOW`` (3.6–4.0 Å).
Only residue pairs that are neighbours in the file's numbering count. Two minutes on one CPU core for 48 chains
at five times; the model card's sampled CA–CA follows the t ≈ 0.002 column (docs/training.md, "Session 16").

    python scripts/bond_check.py .gpu_data/pdownb.pt strand models/checkpoints/default_strand.pt runs/x/model.pth

Prints one markdown row per checkpoint: the in-range share of the predictions (with self-conditioning) at each t,
and the mean signed bond error (Å) at the smallest t.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.metrics import CA_CA_WINDOW  # noqa: E402
from superdiff_protein.errors import UserError  # noqa: E402


def neighbour_pairs(mask: torch.Tensor, res_ids: torch.Tensor) -> torch.Tensor:
    """(B, N-1) bool: residues i and i+1 both present and consecutive in the file's numbering."""
    m = mask > 0
    return m[:, 1:] & m[:, :-1] & ((res_ids[:, 1:] - res_ids[:, :-1]) == 1)


def in_range_share(ca: torch.Tensor, pairs: torch.Tensor) -> float:
    """Share of the selected consecutive CA–CA distances within the evaluation's window (bounds included)."""
    d = (ca[:, 1:].double() - ca[:, :-1].double()).norm(dim=-1)[pairs]
    if d.numel() == 0:
        raise ValueError("no consecutive residue pairs to count")
    return float(((d >= CA_CA_WINDOW[0]) & (d <= CA_CA_WINDOW[1])).double().mean())


def check(checkpoint: str, batch: dict, times: list[float], seed: int = 0) -> dict:
    """In-range shares of one checkpoint's predictions at each t: ``{"t": [...], "plain": [...], "sc": [...],
    "bond_error": mean signed (pred - true) bond length at times[0], self-conditioned}``."""
    from models.framediff.adapter import FrameDiffAdapter
    from models.framediff.losses import seq_idx
    from superdiff_protein.frames.se3 import SE3Diffuser

    ad = FrameDiffAdapter.from_checkpoint(checkpoint)
    dif = SE3Diffuser.framediff_default()
    mask = batch["res_mask"].float()
    pairs = neighbour_pairs(mask, batch["res_ids"].long())
    sidx = seq_idx(batch, "file")
    rot0, tr0 = batch["rotmats"].float(), batch["trans"].float()
    g = torch.Generator().manual_seed(seed)
    out = {"t": list(times), "plain": [], "sc": [], "bond_error": float("nan")}
    for k, t in enumerate(times):
        tt = torch.full((mask.shape[0],), float(t))
        nm = dif.forward_marginal(rot0, tr0, tt, mask, generator=g)
        with torch.no_grad():
            first = ad(nm.rotmats_t, nm.trans_t, tt, mask, None, seq_idx=sidx)
            second = ad(nm.rotmats_t, nm.trans_t, tt, mask, first.self_cond_state, seq_idx=sidx)
        out["plain"].append(in_range_share(first.trans, pairs))
        out["sc"].append(in_range_share(second.trans, pairs))
        if k == 0:
            dp = (second.trans[:, 1:] - second.trans[:, :-1]).double().norm(dim=-1)
            dg = (tr0[:, 1:] - tr0[:, :-1]).double().norm(dim=-1)
            out["bond_error"] = float((dp - dg)[pairs].mean())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", help="a prepare_dataset .pt file")
    p.add_argument("subset", help="a split half stored in the file (helix / strand), or 'all'")
    p.add_argument("checkpoints", nargs="+", help="FrameDiff model.pth files")
    p.add_argument("--t", type=float, nargs="+", default=[0.002, 0.01, 0.03, 0.1, 0.2])
    p.add_argument("--n", type=int, default=48, help="chains, evenly spaced over the subset")
    p.add_argument("--max-length", type=int, default=128, help="centre crop")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from superdiff_protein.frames.data import FrameDataset, collate_frames

    try:
        ds = FrameDataset(args.dataset, subset=None if args.subset == "all" else args.subset,
                          max_length=args.max_length, crop="center", seed=args.seed)
        step = max(1, len(ds) // max(1, args.n))
        batch = collate_frames([ds[i] for i in range(0, len(ds), step)[: args.n]])
        print("| checkpoint | " + " | ".join(f"t = {t:g}" for t in args.t) + f" | bond error at t = {args.t[0]:g} |")
        print("|---" * (len(args.t) + 2) + "|")
        for ck in args.checkpoints:
            r = check(ck, batch, args.t, seed=args.seed)
            cells = " | ".join(f"{100 * s:.1f} %" for s in r["sc"])
            print(f"| {ck} | {cells} | {r['bond_error']:+.3f} Å |", flush=True)
    except (UserError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
