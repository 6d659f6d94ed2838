"""Outputs of ``evaluate_backbones``: metrics.csv (one flat row per sample, :func:`build_rows`), summary.json,
the grouped table (mean +- standard error, by method and length; its columns follow the official evaluation
script as mapped in docs/evaluation.md -- the paper's table itself was not verified here) as CSV and
markdown, and PNG plots."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from .io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .samples import Sample, group_of

CONTRACT_COLUMNS = ["path", "length", "novelty_max_tm", "helix_frac", "strand_frac", "coil_frac", "sc_rmsd",
                    "sc_tm", "designable"]
METRIC_COLUMNS = [
    "path", "id", "method", "length", "error",
    "novelty_max_tm", "novelty_best_ref", "novelty_refold_max_tm",
    "helix_frac", "strand_frac", "coil_frac",
    "sc_rmsd", "sc_tm", "plddt", "designable", "sc_rmsd_mean", "sc_best_seq",
    "mpnn_ll", "mpnn_ll_best", "mpnn_model",
    "ca_ca_mean", "ca_ca_std", "ca_ca_max", "ca_ca_valid_frac", "n_chain_breaks", "c_n_mean", "c_n_valid_frac",
    "n_ca_clashes", "n_bb_clashes", "radius_of_gyration", "full_backbone", "cluster",
]

#: (column in table, source column in metrics.csv, kind) -- kind "frac" uses the binomial standard error
TABLE_METRICS = [
    ("designable_frac", "designable", "frac"),
    ("sc_rmsd", "sc_rmsd", "mean"),
    ("sc_tm", "sc_tm", "mean"),
    ("plddt", "plddt", "mean"),
    ("novelty_max_tm", "novelty_max_tm", "mean"),
    ("novel_frac_tm05", "novelty_max_tm", "below0.5"),
    ("novelty_refold_max_tm", "novelty_refold_max_tm", "mean"),
    ("helix_frac", "helix_frac", "mean"),
    ("strand_frac", "strand_frac", "mean"),
    ("coil_frac", "coil_frac", "mean"),
    ("mpnn_ll", "mpnn_ll", "mean"),
    ("ca_ca_valid_frac", "ca_ca_valid_frac", "mean"),
    ("radius_of_gyration", "radius_of_gyration", "mean"),
]


def _num(x):
    if x is None:
        return None
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    return x


def build_rows(samples: list[Sample], div: dict) -> list[dict]:
    """One flat record per sample (for metrics.csv and the table)."""
    rows = []
    labels = div.get("labels_by_rel", {}) if div else {}
    for s in samples:
        sec = s.sections
        r: dict[str, Any] = {"path": s.rel, "id": s.meta.get("id", Path(s.rel).stem), "method": group_of(s.meta)}
        errors = [f"{k}: {v['error']}" for k, v in sec.items() if isinstance(v, dict) and "error" in v]
        r["error"] = "; ".join(errors) if errors else None
        st = sec.get("structure", {})
        for k in ("length", "helix_frac", "strand_frac", "coil_frac", "ca_ca_mean", "ca_ca_std", "ca_ca_max",
                  "ca_ca_valid_frac", "n_chain_breaks", "c_n_mean", "c_n_valid_frac", "n_ca_clashes", "n_bb_clashes",
                  "radius_of_gyration", "full_backbone"):
            r[k] = st.get(k)
        mp = sec.get("mpnn", {})
        for k in ("mpnn_ll", "mpnn_ll_best", "mpnn_model"):
            r[k] = mp.get(k)
        fo = sec.get("fold", {})
        for k in ("sc_rmsd", "sc_tm", "plddt", "designable", "sc_rmsd_mean", "sc_best_seq"):
            r[k] = fo.get(k)
        nv = sec.get("novelty", {})
        r["novelty_max_tm"] = nv.get("max_tm")
        r["novelty_best_ref"] = nv.get("best_ref")
        r["novelty_refold_max_tm"] = sec.get("novelty_refold", {}).get("max_tm")
        r["cluster"] = labels.get(s.rel)
        for k, v in s.meta.items():
            if k not in r and k not in ("pdb_path",):
                r[k] = v
        rows.append({k: _num(v) for k, v in r.items()})
    return rows


def write_metrics_csv(rows: list[dict], path: Path) -> None:
    """metrics.csv: contract columns first; empty cells where a metric was not computed."""
    extra = sorted({k for r in rows for k in r} - set(METRIC_COLUMNS))
    cols = METRIC_COLUMNS + extra
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in cols})
    atomic_write_text(path, buf.getvalue())


def _vals(rows: list[dict], col: str) -> np.ndarray:
    out = []
    for r in rows:
        v = r.get(col)
        if v is None or v == "":
            continue
        if isinstance(v, bool):
            v = float(v)
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            out.append(v)
    return np.asarray(out, dtype=np.float64)


def mean_se(x: np.ndarray, kind: str = "mean") -> tuple[float | None, float | None, int]:
    """Mean and standard error (sample std / sqrt(n); binomial sqrt(p(1-p)/n) for fractions)."""
    if kind.startswith("below"):
        x = (x < float(kind[5:])).astype(np.float64)
        kind = "frac"
    n = len(x)
    if n == 0:
        return None, None, 0
    m = float(x.mean())
    if kind == "frac":
        se = math.sqrt(m * (1 - m) / n)
    else:
        se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return m, se, n


def _fmt(m, se, digits=3) -> str:
    if m is None:
        return "–"
    return f"{m:.{digits}f}" if se is None else f"{m:.{digits}f} ± {se:.{digits}f}"


def build_table(rows: list[dict], group_div: dict) -> list[dict]:
    """Rows of the grouped table: one per (method, length) and one per method over all lengths."""
    ok = [r for r in rows if r.get("length") is not None]
    keys = sorted({(r["method"], int(r["length"])) for r in ok})
    methods = sorted({k[0] for k in keys})
    table = []
    for method in methods:
        lengths = sorted({k[1] for k in keys if k[0] == method})
        for length in lengths + [None]:
            sel = [r for r in ok if r["method"] == method and (length is None or int(r["length"]) == length)]
            if length is None and len(lengths) == 1:
                continue
            t: dict[str, Any] = {"method": method, "length": "all" if length is None else length, "n": len(sel)}
            for name, col, kind in TABLE_METRICS:
                m, se, n = mean_se(_vals(sel, col), kind)
                t[name], t[f"{name}_se"] = m, se
            gd = group_div.get((method, length), {})
            t["pairwise_tm"] = gd.get("pairwise_tm_mean")
            t["n_clusters"] = gd.get("n_clusters")
            t["cluster_fraction"] = gd.get("cluster_fraction")
            table.append(t)
    return table


def table_markdown(table: list[dict]) -> str:
    head = ["Method", "Length", "N", "Designable ↑", "scRMSD (Å) ↓", "scTM ↑", "pLDDT ↑", "Novelty max TM ↓",
            "Novel (TM<0.5) ↑", "Diversity pairwise TM ↓", "Clusters/samples ↑", "Helix", "Strand", "Coil",
            "MPNN log-lik ↑"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in table:
        def c(k, d=3):
            return _fmt(t.get(k), t.get(f"{k}_se"), d)

        pt = "–" if t.get("pairwise_tm") is None or not math.isfinite(t["pairwise_tm"]) else f"{t['pairwise_tm']:.3f}"
        cf = "–" if t.get("cluster_fraction") is None else f"{t['cluster_fraction']:.3f} ({t['n_clusters']}/{t['n']})"
        lines.append("| " + " | ".join([str(t["method"]), str(t["length"]), str(t["n"]), c("designable_frac"),
                                        c("sc_rmsd", 2), c("sc_tm"), c("plddt", 1), c("novelty_max_tm"),
                                        c("novel_frac_tm05"), pt, cf, c("helix_frac"), c("strand_frac"),
                                        c("coil_frac"), c("mpnn_ll")]) + " |")
    note = ("\nMean ± standard error over samples (binomial SE for fractions). Diversity and clusters are computed "
            "within each group (TM-score threshold in summary.json). – = not computed.\n")
    return "\n".join(lines) + "\n" + note


def _csv_text(rows: list[dict]) -> str:
    cols = list(rows[0].keys()) if rows else ["method", "length", "n"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in cols})
    return buf.getvalue()


def _savefig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def make_plots(rows: list[dict], div: dict, plot_dir: Path) -> list[str]:
    """PNG plots (matplotlib Agg); returns the file names written."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written = []
    panels = [(c, lbl) for c, lbl in [("sc_rmsd", "scRMSD (Å)"), ("sc_tm", "scTM"), ("plddt", "pLDDT"),
                                       ("novelty_max_tm", "novelty: max TM to reference"),
                                       ("mpnn_ll", "ProteinMPNN mean log-likelihood"),
                                       ("radius_of_gyration", "radius of gyration (Å)"),
                                       ("ca_ca_mean", "mean consecutive CA–CA (Å)"), ("helix_frac", "helix fraction"),
                                       ("strand_frac", "strand fraction")] if len(_vals(rows, c))]
    methods = sorted({r["method"] for r in rows if r.get("length") is not None})
    if panels:
        nc = 3
        nr = math.ceil(len(panels) / nc)
        fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 3.2 * nr), squeeze=False)
        for ax, (c, lbl) in zip(axes.flat, panels):
            for m in methods:
                v = _vals([r for r in rows if r["method"] == m], c)
                if len(v):
                    ax.hist(v, bins=20, alpha=0.6, label=m)
            ax.set_xlabel(lbl)
            ax.set_ylabel("samples")
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        if len(methods) > 1:
            axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        _savefig(fig, plot_dir / "metric_histograms.png")
        plt.close(fig)
        written.append("metric_histograms.png")
    if len(_vals(rows, "sc_tm")) and len(_vals(rows, "novelty_max_tm")):
        fig, ax = plt.subplots(figsize=(4.5, 4))
        for m in methods:
            sel = [r for r in rows if r["method"] == m and r.get("sc_tm") is not None and r.get("novelty_max_tm") is not None]
            ax.scatter([r["novelty_max_tm"] for r in sel], [r["sc_tm"] for r in sel], s=12, label=m)
        ax.axvline(0.5, ls="--", c="gray", lw=0.8)
        ax.axhline(0.5, ls="--", c="gray", lw=0.8)
        ax.set_xlabel("novelty: max TM to reference (↓ novel)")
        ax.set_ylabel("scTM (↑ designable)")
        ax.legend(fontsize=7)
        _savefig(fig, plot_dir / "novelty_vs_sctm.png")
        plt.close(fig)
        written.append("novelty_vs_sctm.png")
    if len(_vals(rows, "helix_frac")):
        fig, ax = plt.subplots(figsize=(4.5, 4))
        for m in methods:
            sel = [r for r in rows if r["method"] == m and r.get("helix_frac") is not None]
            ax.scatter([r["helix_frac"] for r in sel], [r["strand_frac"] for r in sel], s=12, label=m)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("helix fraction")
        ax.set_ylabel("strand fraction")
        ax.legend(fontsize=7)
        _savefig(fig, plot_dir / "secondary_structure.png")
        plt.close(fig)
        written.append("secondary_structure.png")
    if div and div.get("matrix") is not None and len(div["matrix"]) >= 2:
        t = np.asarray(div["matrix"])
        fig, ax = plt.subplots(figsize=(5, 4.2))
        order = np.argsort(div["labels"], kind="stable")
        im = ax.imshow(0.5 * (t + t.T)[np.ix_(order, order)], vmin=0, vmax=1, cmap="viridis")
        fig.colorbar(im, ax=ax, label="TM-score")
        ax.set_title(f"pairwise TM (sorted by cluster; {div['n_clusters']} clusters)", fontsize=9)
        _savefig(fig, plot_dir / "pairwise_tm.png")
        plt.close(fig)
        written.append("pairwise_tm.png")
    return written


def weighted_means(rows: list[dict]) -> dict | None:
    """Importance-weighted means of the table metrics for runs of the FKC rules (samples.csv columns
    ``log_weight`` and ``group``, docs/fkc.md): self-normalised weights within each group, groups averaged with
    equal weight. None when the rows carry no weights. The unweighted means stay in the summary beside them."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        lw, g = r.get("log_weight"), r.get("group")
        if lw is None or g in (None, ""):
            continue
        groups.setdefault(f"{r.get('method')}|{g}", []).append(r)
    if not groups:
        return None
    out: dict[str, Any] = {"n_groups": len(groups), "scheme": "self-normalised within group, groups equally"}
    for name, col, kind in TABLE_METRICS:
        if kind != "mean":
            continue
        per_group = []
        for members in groups.values():
            vals = [(float(m["log_weight"]), m.get(col)) for m in members]
            vals = [(lw, float(v)) for lw, v in vals if v is not None and math.isfinite(lw)]
            if not vals:
                continue
            lw = np.array([a for a, _ in vals])
            w = np.exp(lw - lw.max())
            per_group.append(float((w * np.array([b for _, b in vals])).sum() / w.sum()))
        out[f"{name}_mean"] = float(np.mean(per_group)) if per_group else None
    return out


def write_reports(rows: list[dict], out_dir: Path, cfg, div: dict, group_div: dict, status: dict,
                  elapsed: float, n_files: int) -> dict:
    """Write metrics.csv, summary.json, table.csv, table.md and plots/ (all atomically); return the summary."""
    write_metrics_csv(rows, out_dir / "metrics.csv")
    good = [r for r in rows if r.get("length") is not None]

    def m(col, kind="mean"):
        return mean_se(_vals(good, col), kind)[0]

    thr = float(cfg.diversity.cluster_tm_threshold)
    summary: dict[str, Any] = {
        "n_samples": len(rows),
        "n_files": n_files,
        "n_evaluated": len(good),
        "n_failed": sum(1 for r in rows if r.get("error")),
        "pairwise_tm_mean": div.get("pairwise_tm_mean") if div else None,
        "n_clusters": div.get("n_clusters") if div else None,
        "cluster_fraction": div.get("cluster_fraction") if div else None,
        "cluster_tm_threshold": thr,
        "cluster_method": str(cfg.diversity.cluster_method),
        "diversity_subsampled": div.get("subsampled") if div else None,
        "designable_fraction": m("designable", "frac"),
        "n_designability_evaluated": int(len(_vals(good, "designable"))),
        "sc_rmsd_mean": m("sc_rmsd"),
        "sc_tm_mean": m("sc_tm"),
        "plddt_mean": m("plddt"),
        "novelty_max_tm_mean": m("novelty_max_tm"),
        "novelty_frac_below_0.5": m("novelty_max_tm", "below0.5"),
        "novelty_frac_below_0.3": m("novelty_max_tm", "below0.3"),
        "novelty_refold_max_tm_mean": m("novelty_refold_max_tm"),
        "novelty_refold_frac_below_0.5": m("novelty_refold_max_tm", "below0.5"),
        "novelty_refold_frac_below_0.3": m("novelty_refold_max_tm", "below0.3"),
        "novelty_exact": cfg.novelty.get("top_k") in (None, 0),
        "helix_frac_mean": m("helix_frac"),
        "strand_frac_mean": m("strand_frac"),
        "coil_frac_mean": m("coil_frac"),
        "mpnn_ll_mean": m("mpnn_ll"),
        "ca_ca_valid_frac_mean": m("ca_ca_valid_frac"),
        "samples_with_ca_clash": int(sum(1 for r in good if (r.get("n_ca_clashes") or 0) > 0)),
        "status": status,
        "elapsed_s": round(elapsed, 2),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    weighted = weighted_means(good)
    if weighted is not None:
        summary["weighted"] = weighted
    table = build_table(rows, group_div)
    summary["groups"] = [{k: v for k, v in t.items()} for t in table]
    atomic_write_text(out_dir / "table.csv", _csv_text(table))
    atomic_write_text(out_dir / "table.md", table_markdown(table))
    plots = []
    if cfg.get("plots", True):
        try:
            plots = make_plots(rows, div, out_dir / "plots")
        except Exception as exc:  # plots are never fatal
            summary["status"]["plots"] = f"failed: {type(exc).__name__}: {exc}"
    summary["plots"] = plots
    atomic_write_json(out_dir / "summary.json", _clean(summary))
    return summary


def _clean(o):
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return None if not math.isfinite(float(o)) else float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o
