#!/usr/bin/env python
"""Tables of the Feynman–Kac rules on the embedded default models (model card, "Feynman–Kac rules (issue 15)").

Evaluates the runs that ``scripts/fkc_model_card.sh gen ...`` wrote under ``<out>/samples/<setting>``, with
the same code as ``scripts/eval_defaults.py`` (the model card's other tables): ``evaluate_backbones`` on every
sample without ProteinMPNN (geometry, secondary structure, diversity), then ProteinMPNN (``v_48_020``, 8
sequences, T = 0.1) on samples 0..mpnn_n-1 of each setting. No folding model, no novelty. Adds what only the
Feynman–Kac runs have: the number of distinct t = 1 ancestors (resampling duplicates particles; diversity
counts the duplicates), the final effective sample size of each group, the resampling events, and the
self-normalised (importance-weighted) means of a few metrics within each group. Resumable (evaluation caches).

    python scripts/fkc_model_card.py --out runs/fkc_card [--mpnn-n 8] [--settings helix or ...]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from eval_defaults import _f, _pm, _read, evaluate_setting, summarise  # noqa: E402

ORDER = ["helix", "helix_ns05", "strand", "or", "or_ns05", "and", "product_k1", "product_k4", "product_k16",
         "anneal2_helix_k1", "anneal2_helix_k4", "anneal2_strand_k4", "anneal1.5_or_k4", "anneal2_or_k1", "anneal2_or_k4",
         "anneal3_or_k4", "anneal2_or_k16"]
LABELS = {
    "helix": ("default-helix alone", "single", "–"),
    "helix_ns05": ("default-helix, noise_scale 0.5", "single, noise_scale=0.5", "–"),
    "strand": ("default-strand alone", "single", "–"),
    "or": ("OR", "or", "–"),
    "or_ns05": ("OR, noise_scale 0.5 (the heuristic)", "or, noise_scale=0.5, hutchinson", "–"),
    "and": ("AND", "and", "–"),
    "product_k1": ("product helix × strand", "product", "1"),
    "product_k4": ("product helix × strand", "product", "4"),
    "product_k16": ("product helix × strand", "product", "16"),
    "anneal2_helix_k1": ("default-helix^2", "anneal β=2, models=[default-helix]", "1"),
    "anneal2_helix_k4": ("default-helix^2", "anneal β=2, models=[default-helix]", "4"),
    "anneal2_strand_k4": ("default-strand^2", "anneal β=2, models=[default-strand]", "4"),
    "anneal1.5_or_k4": ("OR^1.5", "anneal β=1.5, anneal_of=or", "4"),
    "anneal2_or_k1": ("OR^2", "anneal β=2, anneal_of=or", "1"),
    "anneal2_or_k4": ("OR^2", "anneal β=2, anneal_of=or", "4"),
    "anneal3_or_k4": ("OR^3", "anneal β=3, anneal_of=or", "4"),
    "anneal2_or_k16": ("OR^2", "anneal β=2, anneal_of=or", "16"),
}


def group_tm(ev: Path, csv_rows: list[dict]) -> tuple[float, float]:
    """Mean pairwise TM-score of two samples of the same group and of two samples of different groups
    (from evaluate_backbones' pairwise_tm.json; the mean of both normalisations)."""
    grp = {r["pdb_path"]: r["group"] for r in csv_rows}
    d = json.loads((ev / "pairwise_tm.json").read_text())
    within, across = [], []
    for key, tms in d["pairs"].items():
        a, b = (k.split("#")[0] for k in key.split("|"))
        if a in grp and b in grp:
            (within if grp[a] == grp[b] else across).append(float(np.mean(tms)))
    m = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return m(within), m(across)


def fkc_stats(samples: Path, rows: list[dict], sub_rows: list[dict], ev: Path | None = None) -> dict:
    """Distinct ancestors, final ESS / K per group, resampling events per group, weighted means."""
    csv_rows = _read(samples / "samples.csv")
    if not csv_rows or not csv_rows[0].get("group"):
        return {"ancestors": len(csv_rows), "ess": None, "resamplings": None, "weighted": {}}
    anc = {(r["group"], r["ancestor"]) for r in csv_rows}
    by_group: dict[str, list[dict]] = defaultdict(list)
    for r in csv_rows:
        by_group[r["group"]].append(r)
    ess, nres, wt, ess_steps = [], [], {}, []
    for g, rs in by_group.items():
        lw = np.array([_f(r["log_weight"]) for r in rs])
        w = np.exp(lw - lw.max())
        ess.append(float(w.sum() ** 2 / (w ** 2).sum()) / len(rs))
        tr = samples / rs[0]["traces_path"] if rs[0].get("traces_path") else None
        if tr is not None and tr.is_file():
            z = np.load(tr)
            if "resampled" in z:
                nres.append(int(np.asarray(z["resampled"]).sum()))
            if "ess" in z:
                ess_steps.append(float(np.mean(z["ess"])))
        for r, wi in zip(rs, w / w.sum()):
            wt[r["id"]] = float(wi)
    # self-normalised weights within each group, averaged over groups (each group estimates the target)
    G = len(by_group)

    def wmean(rs: list[dict], col: str) -> float:
        vals = [(wt.get(r["id"]), _f(r.get(col))) for r in rs]
        vals = [(w, v) for w, v in vals if w is not None and math.isfinite(v)]
        if not vals:
            return float("nan")
        # every group's weights sum to 1; with a subset, renormalise over the rows present
        tot = sum(w for w, _ in vals)
        return sum(w * v for w, v in vals) / tot if tot > 0 else float("nan")

    weighted = {c: wmean(rows, c) for c in ("ca_ca_valid_frac", "n_ca_clashes", "helix_frac", "strand_frac")}
    weighted["mpnn_ll"] = wmean(sub_rows, "mpnn_ll")
    tm_in, tm_across = group_tm(ev, csv_rows) if ev is not None else (float("nan"), float("nan"))
    return {"ancestors": len(anc), "groups": G, "ess": float(np.mean(ess)), "tm_within": tm_in,
            "tm_across": tm_across,
            "ess_steps": (float(np.mean(ess_steps)) if ess_steps else float("nan")),
            "resamplings": (float(np.mean(nres)) if nres else None), "weighted": weighted}


def markdown(res: dict, times: dict, args) -> str:
    out = [f"Samples: length {args.length}, {args.n_expected} per setting, 100 steps, seed 0, device=cpu; "
           f"ProteinMPNN on samples 0-{args.mpnn_n - 1} of each setting.", "",
           "| setting | rule | K | n | distinct ancestors | CA–CA in 3.6–4.0 Å | clash-free samples | CA clashes / sample "
           "| helix | strand | coil | pairwise TM | clusters (TM 0.5) | ProteinMPNN log-lik (n) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, s in res.items():
        lab, rule, K = LABELS.get(k, (k, "?", "?"))
        out.append(f"| {lab} | {rule} | {K} | {s['n']} | {s['fkc']['ancestors']} | {100 * s['ca_ca']:.1f} % | "
                   f"{100 * s['clash_free']:.0f} % | {s['clashes']:.1f} | {_pm(s['helix'])} | {_pm(s['strand'])} | "
                   f"{_pm(s['coil'])} | {s['pairwise_tm']:.2f} | {s['clusters']}/{s['n']} | "
                   f"{_pm(s['mpnn'])} ({s['n_sub']}) |")
    out += ["", "Feynman–Kac runs: weights and resampling. ESS / K: the group's effective sample size over K at each "
            "step (before resampling), mean over steps and groups; final: of the final weights. Weighted: the "
            "self-normalised importance weights of each group, groups pooled (results.json has more).", "",
            "| setting | K | groups | distinct ancestors | ESS / K, mean over steps | final ESS / K | resamplings per group "
            "| TM within a group | TM across groups | weighted CA–CA | weighted ProteinMPNN log-lik |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, s in res.items():
        f = s["fkc"]
        if f["ess"] is None:
            continue
        lab, _, K = LABELS.get(k, (k, "?", "?"))
        w = f["weighted"]
        rsp = "–" if f["resamplings"] is None else f"{f['resamplings']:.1f}"
        tin = "–" if math.isnan(f["tm_within"]) else f"{f['tm_within']:.2f}"
        out.append(f"| {lab} | {K} | {f['groups']} | {f['ancestors']} | {f['ess_steps']:.2f} | {f['ess']:.2f} | "
                   f"{rsp} | {tin} | {f['tm_across']:.2f} | {100 * w['ca_ca_valid_frac']:.1f} % | "
                   f"{w['mpnn_ll']:.2f} |")
    out += ["", "| setting | helix-like | strand-like | mixed | both ≥ 0.1 |", "| --- | --- | --- | --- | --- |"]
    for k, s in res.items():
        c = s["classes"]
        lab, _, K = LABELS.get(k, (k, "?", "?"))
        out.append(f"| {lab}{'' if K == '–' else f', K = {K}'} | {100 * c['helix-like']:.0f} % | "
                   f"{100 * c['strand-like']:.0f} % | {100 * c['mixed']:.0f} % | {100 * s['both']:.0f} % |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/fkc_card")
    p.add_argument("--settings", nargs="+", default=None, help="default: every finished run, in table order")
    p.add_argument("--mpnn-n", type=int, default=8, help="ProteinMPNN on samples 0..n-1 of each setting")
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--no-mpnn", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    from superdiff_protein.cli.runtime import tune_malloc

    tune_malloc()
    out = Path(args.out)
    names = args.settings or [k for k in ORDER if (out / "samples" / k / "samples.csv").is_file()]
    times = {}
    if (out / "times.tsv").is_file():
        for line in (out / "times.tsv").read_text().splitlines():
            parts = line.split("\t")
            times[parts[0]] = max(int(parts[1]), int(times.get(parts[0], 0)))  # a rerun of a finished run: ~0 s
    res = {}
    for name in names:
        d = out / "samples" / name
        rows, groups, sub_rows = evaluate_setting(d, out, name, subset_n=args.mpnn_n, subset_length=args.length,
                                                  mpnn=not args.no_mpnn, workers=args.workers)
        # the subset has no samples.csv: give its rows the ids of the run (sample_i.pdb -> L{length}_s{i})
        for r in sub_rows:
            r["id"] = f"L{args.length}_s{Path(r['path']).stem.split('_')[-1]}"
        s = summarise(rows, groups, sub_rows)
        s["fkc"] = fkc_stats(d, rows, sub_rows, out / "eval" / name)
        res[name] = s
        print(f"[fkc_model_card] {name}: CA-CA {100 * s['ca_ca']:.1f} %, clash-free {100 * s['clash_free']:.0f} %, "
              f"MPNN {s['mpnn'][0]:.2f}, ancestors {s['fkc']['ancestors']}", flush=True)
    args.n_expected = max((s["n"] for s in res.values()), default=0)
    md = markdown(res, times, args)
    tmp = out / "tables.md.tmp"
    tmp.write_text(md)
    tmp.replace(out / "tables.md")
    for k in res:
        res[k]["wall_s_shared_cpu"] = times.get(k)  # generation wall time on shared cores: not a benchmark
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
