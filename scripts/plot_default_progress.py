"""Plot how the embedded default models moved across training rounds, against issue 17's goals.

    python scripts/plot_default_progress.py --out docs/img/defaults_progress.png \
        s19=runs/s19/eval_cand s20=runs/s20/eval_cb s21=runs/s21/eval

Each ``LABEL=PREFIX`` names one pair of checkpoints evaluated by ``scripts/eval_defaults.py`` into ``PREFIX_s<seed>``
(every seed found is pooled, equal weight per seed). ProteinMPNN per sample is read, where present, from
``<dir of PREFIX>/mpnn_full/<name of PREFIX>_s<seed>_<setting>/metrics.csv`` (the ``_evaluate`` call of the model
card's protocol). Three panels: clash-free share and CA-CA per setting, and ProteinMPNN with standard errors.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from eval.report import mean_se  # noqa: E402
from eval_defaults import SETTINGS  # noqa: E402  (the model card's six settings, defined once there)
GOALS = {"clash_free": {"helix": 0.8, "strand": 0.8, "other": 0.7}, "ca_ca": {"helix": 0.95, "strand": 0.95,
                                                                            "other": 0.93}}


def load(prefix: Path) -> dict:
    """Pooled metrics of every seed's ``results.json`` under ``prefix_s*`` (ValueError when none is found)."""
    dirs = sorted(p for p in prefix.parent.glob(f"{prefix.name}_s*") if (p / "results.json").is_file())
    if not dirs:
        raise ValueError(f"no {prefix}_s<seed>/results.json")
    res = [json.loads((d / "results.json").read_text()) for d in dirs]
    out: dict = {"seeds": [d.name.rsplit("_s", 1)[1] for d in dirs]}
    for s in SETTINGS:
        rows = [r[s] for r in res if s in r]
        if rows:
            out[s] = {k: sum(float(r[k]) for r in rows) / len(rows) for k in ("clash_free", "ca_ca")}
        mpnn: list[float] = []
        for seed in out["seeds"]:
            f = prefix.parent / "mpnn_full" / f"{prefix.name}_s{seed}_{s}" / "metrics.csv"
            if f.is_file():
                with open(f, newline="") as fh:
                    mpnn += [float(r["mpnn_ll"]) for r in csv.DictReader(fh) if r.get("mpnn_ll") not in (None, "", "nan")]
        if len(mpnn) > 1 and s in out:
            out[s]["mpnn"] = mean_se(np.asarray(mpnn, dtype=np.float64))
    return out


def plot(runs: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(runs)
    colour = {s: f"C{i}" for i, s in enumerate(SETTINGS)}     # one colour per setting in every panel
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, key, title in ((axes[0], "clash_free", "clash-free samples"), (axes[1], "ca_ca", "CA–CA in 3.6–4.0 Å")):
        for s in SETTINGS:
            xs = [i for i, lab in enumerate(labels) if s in runs[lab]]
            if xs:
                ax.plot(xs, [100 * runs[labels[i]][s][key] for i in xs], "o-", label=s, lw=1.2, color=colour[s])
        for g, style in ((GOALS[key]["helix"], "--"), (GOALS[key]["other"], ":")):
            ax.axhline(100 * g, color="grey", ls=style, lw=0.8)
        ax.set_title(f"{title}, %")
        ax.set_ylabel("goal: dashed alone, dotted superposed", fontsize=8)
        ax.set_xticks(range(len(labels)), labels)
    ax = axes[2]
    for s in SETTINGS:
        pts = [(i, *runs[lab][s]["mpnn"]) for i, lab in enumerate(labels) if "mpnn" in runs[lab].get(s, {})]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o-", capsize=3,
                        label=s, lw=1.2, color=colour[s])
    ax.axhline(-1.0, color="grey", ls="--", lw=0.8)
    ax.set_title("ProteinMPNN log-lik. per residue (± s.e.)")
    ax.set_ylabel("goal −1.0 (dashed)", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    axes[0].legend(fontsize=8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=PREFIX (eval_defaults.py output PREFIX_s<seed>)")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    a = ap.parse_args(argv)
    runs = {}
    for spec in a.runs:
        label, sep, prefix = spec.partition("=")
        if not sep or not label or not prefix:
            print(f"error: expected LABEL=PREFIX, got {spec!r}", file=sys.stderr)
            return 2
        try:
            runs[label] = load(Path(prefix))
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
            print(f"error: {label}: {e}", file=sys.stderr)
            return 2
    for label, r in runs.items():
        cells = [f"{s} {100 * r[s]['clash_free']:.0f} %" for s in SETTINGS if s in r]
        print(f"{label} (seeds {', '.join(r['seeds'])}): clash-free " + ", ".join(cells))
    plot(runs, a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
