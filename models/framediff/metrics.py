"""``metrics.csv`` and ``loss_curve.png`` of a FrameDiff training run (``docs/training.md``, "Output directory").

One row per ``log_every`` steps (training losses averaged over them, grad norm, lr, throughput) and one per
fixed-noise evaluation. A new column rewrites the file with a wider header; a resumed run first drops the rows
after its checkpoint's step (:func:`truncate_metrics`), so no step appears twice.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

__all__ = ["METRIC_ORDER", "read_metrics", "append_metrics", "truncate_metrics", "plot_metrics"]

METRIC_ORDER = ["step", "epoch", "train_min", "loss", "rot_loss", "trans_loss", "bb_atom_loss", "dist_mat_loss",
                 "clash_loss", "bond_loss", "grad_norm", "lr", "chains_per_s", "residues_per_s", "eval_loss", "eval_rot_loss",
                 "eval_trans_loss", "eval_ema_loss", "eval_ema_rot_loss", "eval_ema_trans_loss"]


def read_metrics(path: Path) -> list[dict]:
    """The rows of ``metrics.csv`` as dicts of strings (none if the file is absent)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_metrics(path: Path, row: dict) -> None:
    """Append a row to metrics.csv (rewriting the file if a new column appears)."""
    rows = None
    header = None
    if path.is_file():
        with open(path, newline="") as f:
            r = csv.reader(f)
            header = next(r, None)
    keys = list(row)
    if header is None or any(k not in header for k in keys):
        rows = read_metrics(path)
        cols = [c for c in METRIC_ORDER if c in set(keys) | set(header or [])]
        cols += [c for c in (header or []) + keys if c not in cols]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for old in rows + [row]:
                w.writerow({k: _fmt(v) for k, v in old.items() if k in cols})
        os.replace(tmp, path)
        return
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writerow({k: _fmt(v) for k, v in row.items()})


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after ``step`` (a resumed run re-does the steps after its last checkpoint)."""
    rows = read_metrics(path)
    if not rows:
        return
    keep = [r for r in rows if r.get("step") not in (None, "") and int(float(r["step"])) <= step]
    if len(keep) == len(rows):
        return
    cols = list(rows[0].keys())
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(keep)
    os.replace(tmp, path)


def plot_metrics(metrics_csv: str | os.PathLike, out_png: str | os.PathLike) -> bool:
    """Loss curves (train losses smoothed, fixed-noise eval losses) -> PNG. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = read_metrics(Path(metrics_csv))
    if not rows:
        return False

    def series(key: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for r in rows:
            v = r.get(key)
            if v not in (None, ""):
                xs.append(int(float(r["step"])))
                ys.append(float(v))
        return xs, ys

    panels = [
        (("loss", "rot_loss", "trans_loss", "bb_atom_loss", "dist_mat_loss", "clash_loss", "bond_loss"),
         "training loss (mean over log_every steps)"),
        (("eval_loss", "eval_ema_loss", "eval_ema_rot_loss", "eval_ema_trans_loss"), "fixed-noise evaluation loss"),
    ]
    self_keys = ("self_loss", "self_anchor", "self_clash", "self_bond", "self_rg")
    if any(series(k)[0] for k in self_keys):        # a run with experiment.self_state_weight > 0
        panels.append((self_keys, "self-state loss (the model's own sampled states)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    for ax, (keys, title) in zip(axes, panels):
        for key in keys:
            x, y = series(key)
            if x and max(y) > 0:                     # a term switched off (weight 0) logs zeros: no log-scale line
                ax.plot(x, y, label=key, lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
    for ax in axes:
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
    return True
