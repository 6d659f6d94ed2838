#!/usr/bin/env python
"""Sample metrics of the embedded default models for their model card (models/checkpoints/README.md).

Generates the same seeds under six settings -- each model alone, average of scores, OR (l = 0 and
l = [1, 0]) and AND -- evaluates every sample with ``evaluate_backbones`` (geometry, secondary structure,
diversity; no folding model), then novelty against PDownB and ProteinMPNN log-likelihood on a subset, and
writes the tables as markdown. Every stage is resumable: finished settings and cached evaluations are reused.

    python scripts/eval_defaults.py --out runs/eval_defaults --reference /tmp/evalbench/pdownb_ref.npz

(the reference: ``python -m eval.reference ../shared/data/pdownb/pdownb_first_chain_pdb.tar.xz ref.npz``).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ["default-helix", "default-strand"]
SETTINGS = {  # name -> generate overrides
    "helix": dict(rule="single", single_index=0),
    "strand": dict(rule="single", single_index=1),
    "average": dict(rule="average"),
    "or": dict(rule="or"),
    "or_bias": dict(rule="or", bias=[1.0, 0.0]),
    "and": dict(rule="and"),
}
LABELS = {"helix": "default-helix alone", "strand": "default-strand alone", "average": "average of scores",
          "or": "OR, l = [0, 0]", "or_bias": "OR, l = [1, 0] (helix +1)", "and": "AND"}


def _generate(out: Path, name: str, args) -> Path:
    from superdiff_protein.frames.generation import generate

    d = out / "samples" / name
    want = len(args.lengths) * args.n
    if len(list(d.glob("length_*/sample_*.pdb"))) >= want:
        return d
    # generate() resumes: complete samples of an interrupted run are kept
    generate(models=list(args.models), lengths=args.lengths, samples_per_length=args.n, batch_size=args.n,
             num_steps=args.steps, time_grid=args.time_grid, min_t=args.min_t, seed=args.seed, out_dir=str(d),
             progress=False, clash_guidance={"weight": args.clash_guidance}, refine=args.refine,
             **SETTINGS[name])
    return d


def _evaluate(samples: Path, out_dir: Path, **over) -> dict:
    from omegaconf import OmegaConf

    from eval.pipeline import evaluate

    cfg = OmegaConf.load(ROOT / "configs" / "evaluate_backbones.yaml")
    cfg = OmegaConf.merge(cfg, OmegaConf.create(dict(samples_dir=str(samples), out_dir=str(out_dir), esmfold=None,
                                                     plots=False, progress=False, **over)))
    return evaluate(cfg)


def evaluate_setting(d: Path, out: Path, name: str, *, subset_n: int, subset_length: int,
                     reference: str | None = None, mpnn: bool = True,
                     workers: int = 1) -> tuple[list[dict], list[dict], list[dict]]:
    """Evaluate one setting's samples ``d``: geometry, SS and diversity on all of them (``out/eval/name``), then
    novelty and/or ProteinMPNN on samples ``0..subset_n-1`` of length ``subset_length`` (copied to
    ``out/subset/name``, results in ``out/eval_subset/name``). Returns (per-sample rows, per-length groups,
    subset rows); the subset is skipped (no rows) when neither a reference nor ProteinMPNN is asked for."""
    _evaluate(d, out / "eval" / name, mpnn={"enabled": False}, workers=workers)
    rows = _read(out / "eval" / name / "metrics.csv")
    groups = [g for g in json.loads((out / "eval" / name / "summary.json").read_text())["groups"]
              if str(g.get("length")).isdigit()]  # per-length groups only (not the pooled "all")
    sub_rows: list[dict] = []
    if reference or mpnn:
        sub = out / "subset" / name
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(subset_n):
            src = d / f"length_{subset_length}" / f"sample_{i}.pdb"
            if src.is_file() and not (sub / src.name).is_file():
                shutil.copy(src, sub / src.name)
        _evaluate(sub, out / "eval_subset" / name, reference=reference, mpnn={"enabled": mpnn},
                  diversity={"enabled": False}, workers=workers)
        sub_rows = _read(out / "eval_subset" / name / "metrics.csv")
    return rows, groups, sub_rows


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _mse(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the finite values (eval.report.mean_se; NaN where undefined)."""
    import numpy as np

    from eval.report import mean_se

    a = np.asarray(xs, dtype=np.float64)
    m, se, _ = mean_se(a[np.isfinite(a)])
    return (float("nan") if m is None else m), (float("nan") if se is None else se)


def ss_class(h: float, e: float) -> str:
    """helix-like: helix >= 0.3 and strand < 0.1; strand-like: strand >= 0.2 and helix < 0.1; else mixed."""
    if h >= 0.3 and e < 0.1:
        return "helix-like"
    if e >= 0.2 and h < 0.1:
        return "strand-like"
    return "mixed"


def summarise(rows: list[dict], groups: list[dict], sub_rows: list[dict], helix_model: str = MODELS[0]) -> dict:
    n = len(rows)
    L = [_f(r["length"]) for r in rows]
    valid = [_f(r["ca_ca_valid_frac"]) for r in rows]
    pooled = sum(v * (l - 1) for v, l in zip(valid, L)) / sum(l - 1 for l in L)
    cn = [_f(r.get("c_n_valid_frac")) for r in rows]
    cn_pooled = sum(v * (l - 1) for v, l in zip(cn, L)) / sum(l - 1 for l in L)
    clashes = [_f(r["n_ca_clashes"]) for r in rows]
    h = [_f(r["helix_frac"]) for r in rows]
    e = [_f(r["strand_frac"]) for r in rows]
    c = [_f(r["coil_frac"]) for r in rows]
    cls = [ss_class(a, b) for a, b in zip(h, e)]
    fm = [r.get("final_model") for r in rows]
    multi = any(r.get("rule") in ("or", "and") for r in rows)  # average: kappa fixed, no "largest"
    return {
        "n": n, "ca_ca": pooled, "c_n": cn_pooled,
        "clash_frac": sum(x > 0 for x in clashes) / n, "clashes": sum(clashes) / n,
        "clash_free": sum(x == 0 for x in clashes) / n,
        "bb_clashes": _mse([_f(r["n_bb_clashes"]) for r in rows])[0],
        "helix": _mse(h), "strand": _mse(e), "coil": _mse(c),
        "rg": _mse([_f(r["radius_of_gyration"]) for r in rows]),
        "final_helix": (sum(m == helix_model for m in fm) / n) if multi else None,
        "pairwise_tm": _mse([_f(g["pairwise_tm"]) for g in groups])[0],
        "clusters": sum(int(_f(g["n_clusters"])) for g in groups),
        "classes": {k: cls.count(k) / n for k in ("helix-like", "strand-like", "mixed")},
        "both": sum(a >= 0.1 and b >= 0.1 for a, b in zip(h, e)) / n,
        "novelty": _mse([_f(r["novelty_max_tm"]) for r in sub_rows]), "n_sub": len(sub_rows),
        "mpnn": _mse([_f(r["mpnn_ll"]) for r in sub_rows]),
        "per_length": {int(g["length"]): g for g in groups},
    }


def _pm(ms, digits=2) -> str:
    m, s = ms
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if not math.isnan(s) else f"{m:.{digits}f}"


def markdown(res: dict[str, dict], args) -> str:
    out = [f"Models: {' and '.join(map(str, args.models))}. "
           f"Samples: lengths {args.lengths} x {args.n} per setting, {args.steps} steps ({args.time_grid} grid), "
           f"min_t {args.min_t}, "
           + (f"clash_guidance.weight {args.clash_guidance} (guided), " if args.clash_guidance > 0 else "")
           + ("refine=true, " if args.refine else "") +
           f"seed {args.seed}; "
           f"novelty and ProteinMPNN on samples 0-{args.subset_n - 1} of length {args.subset_length}.", "",
           "| setting | n | CA–CA in 3.6–4.0 Å | clash-free samples | CA clashes / sample | helix | strand | coil "
           "| largest final κ: helix model | pairwise TM | clusters (TM 0.5) | novelty max TM | ProteinMPNN log-lik "
           "| C–N in 1.23–1.43 Å | backbone-atom clashes / sample |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, s in res.items():
        fh = "–" if s["final_helix"] is None else f"{100 * s['final_helix']:.0f} %"
        out.append(f"| {LABELS[k]} | {s['n']} | {100 * s['ca_ca']:.1f} % | {100 * s['clash_free']:.0f} % | "
                   f"{s['clashes']:.1f} | {_pm(s['helix'])} | {_pm(s['strand'])} | {_pm(s['coil'])} | {fh} | "
                   f"{s['pairwise_tm']:.2f} | {s['clusters']}/{s['n']} | {_pm(s['novelty'])} ({s['n_sub']}) | "
                   f"{_pm(s['mpnn'])} ({s['n_sub']}) | {100 * s['c_n']:.1f} % | {s['bb_clashes']:.1f} |")
    out += ["", "| setting | helix-like | strand-like | mixed | both ≥ 0.1 |", "| --- | --- | --- | --- | --- |"]
    for k, s in res.items():
        c = s["classes"]
        out.append(f"| {LABELS[k]} | {100 * c['helix-like']:.0f} % | {100 * c['strand-like']:.0f} % | "
                   f"{100 * c['mixed']:.0f} % | {100 * s['both']:.0f} % |")
    out += ["", "| setting | length | n | CA–CA in range (mean of samples) | helix | strand | coil | Rg (Å) "
            "| pairwise TM | clusters |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k, s in res.items():
        for length, g in sorted(s["per_length"].items()):
            out.append(f"| {LABELS[k]} | {length} | {g['n']} | {100 * _f(g['ca_ca_valid_frac']):.1f} % | "
                       f"{_f(g['helix_frac']):.2f} | {_f(g['strand_frac']):.2f} | {_f(g['coil_frac']):.2f} | "
                       f"{_f(g['radius_of_gyration']):.1f} | {_f(g['pairwise_tm']):.2f} | {g['n_clusters']} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/eval_defaults")
    p.add_argument("--reference", default=None, help="novelty reference (prepared .npz, dir or archive)")
    p.add_argument("--lengths", type=int, nargs="+", default=[60, 100, 150])
    p.add_argument("--n", type=int, default=8, help="samples per length")
    p.add_argument("--steps", type=int, default=100)
    from superdiff_protein.frames.generate_config import TIME_GRIDS

    p.add_argument("--time-grid", default="uniform", choices=list(TIME_GRIDS))
    p.add_argument("--min-t", type=float, default=None,
                   help="last time of the reverse process (default: generate_backbones' own default)")
    p.add_argument("--models", nargs=2, default=MODELS, metavar=("HELIX", "STRAND"),
                   help="the two models (registry names or model.pth paths; default: the embedded defaults)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clash-guidance", type=float, default=0.0, metavar="WEIGHT",
                   help="generate_backbones' clash_guidance.weight (default 0: off)")
    p.add_argument("--refine", action="store_true", help="generate_backbones' refine=true (refine written backbones)")
    p.add_argument("--subset-n", type=int, default=4)
    p.add_argument("--subset-length", type=int, default=100)
    p.add_argument("--no-mpnn", action="store_true")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    if args.min_t is None:
        from superdiff_protein.frames.generate_config import GenerateConfig
        args.min_t = GenerateConfig().min_t
    from superdiff_protein.cli.runtime import tune_malloc

    tune_malloc()  # as the CLIs do: big freed blocks are reused, not unmapped (docs/benchmarks.md)
    out = Path(args.out)
    res = {}
    for name in args.settings:
        d = _generate(out, name, args)
        rows, groups, sub_rows = evaluate_setting(d, out, name, subset_n=args.subset_n,
                                                  subset_length=args.subset_length, reference=args.reference,
                                                  mpnn=not args.no_mpnn, workers=args.workers)
        # the helix model's label: the first kappa.<label> column of the generator's samples.csv (models in order)
        gen_rows = _read(d / "samples.csv")
        kcols = [k[len("kappa."):] for k in gen_rows[0] if k.startswith("kappa.")] if gen_rows else []
        res[name] = summarise(rows, groups, sub_rows, helix_model=kcols[0] if kcols else MODELS[0])
        print(f"[eval_defaults] {name}: CA-CA {100 * res[name]['ca_ca']:.1f} %, clash-free "
              f"{100 * res[name]['clash_free']:.0f} %", flush=True)
    md = markdown(res, args)
    tmp = out / "tables.md.tmp"
    tmp.write_text(md)
    tmp.replace(out / "tables.md")
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
