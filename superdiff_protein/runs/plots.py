"""Every plot of a generation run: kappa and log-density traces per length, and a sample's CA trace.

Figures are rendered with matplotlib's Agg backend into memory and written atomically
(:func:`superdiff_protein.runs.atomic.atomic_open`), without the PNG's "Software" metadata, so the same
traces give the same bytes.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .atomic import atomic_open

__all__ = ["plot_length_traces", "plot_ca", "plot_ca_trace", "save_figure"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG (dpi 110, no "Software" metadata) atomically; returns the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    with atomic_open(path, "wb", encoding=None) as fh:
        fh.write(buf.getvalue())
    return Path(path)


def _sample_index(p: Path) -> int:
    """The sample index of a trace file: ``sample_3_traces.npz`` or ``sample_3/traces.npz``."""
    m = re.search(r"sample_(\d+)", p.name) or re.fullmatch(r"sample_(\d+)", p.parent.name)
    return int(m.group(1)) if m else -1


def plot_length_traces(length_dir: str | os.PathLike, traces: Sequence[str | os.PathLike]) -> list[Path]:
    """``kappa_traces.png`` and ``logq_traces.png`` in ``length_dir`` from its samples' trace files (the
    ``.npz`` files of :func:`superdiff_protein.runs.rundir.write_traces`); returns the files written."""
    plt = _pyplot()
    length_dir = Path(length_dir)
    data = [np.load(p, allow_pickle=False) for p in sorted(map(Path, traces), key=_sample_index)]
    if not data:
        return []
    labels = [str(s) for s in data[0]["models"]]
    comps = [str(s) for s in data[0]["components"]]
    scope = str(data[0]["kappa_scope"])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []
    panels = [("joint", 0)] if scope == "joint" else [(c, i) for i, c in enumerate(comps)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, ci) in zip(axes[0], panels):
        for d in data:
            t = d["t"][:-1]
            for mi, lab in enumerate(labels):
                ax.plot(t, d["kappa"][:, ci, mi], color=colors[mi % len(colors)], lw=0.8, alpha=0.6,
                        label=lab if d is data[0] else None)
        ax.set_xlim(float(data[0]["t"][0]), float(data[0]["t"][-1]))
        ax.set_xlabel("t (sampling runs 1 -> min_t)")
        ax.set_ylabel("kappa")
        ax.set_title(f"kappa ({title}), {len(data)} samples")
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(save_figure(fig, length_dir / "kappa_traces.png"))
    plt.close(fig)

    ncol = 2 if len(labels) > 1 else 1
    fig, axes = plt.subplots(1, ncol, figsize=(5.5 * ncol, 3.8), squeeze=False)
    for d in data:
        t = d["t"]
        tot = d["logq"].sum(1)                                         # (S+1, M)
        for mi, lab in enumerate(labels):
            axes[0, 0].plot(t, tot[:, mi], color=colors[mi % len(colors)], lw=0.8, alpha=0.6,
                            label=lab if d is data[0] else None)
            if ncol == 2 and mi > 0:
                axes[0, 1].plot(t, tot[:, mi] - tot[:, 0], color=colors[mi % len(colors)], lw=0.8, alpha=0.6,
                                label=f"{lab} - {labels[0]}" if d is data[0] else None)
    axes[0, 0].set_ylabel("log q_t (sum over components)")
    axes[0, 0].set_title("log-density of each model along the path")
    if ncol == 2:
        axes[0, 1].set_ylabel("log q_i - log q_1")
        axes[0, 1].set_title("log-density differences")
    for ax in axes[0]:
        ax.set_xlim(float(data[0]["t"][0]), float(data[0]["t"][-1]))
        ax.set_xlabel("t (sampling runs 1 -> min_t)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(save_figure(fig, length_dir / "logq_traces.png"))
    plt.close(fig)
    return written


def plot_ca(ca: np.ndarray, png_path: str | os.PathLike, title: str) -> Path:
    """Render a CA trace ``ca`` (L, 3), Angstrom, as a 3-D line plot (PNG, matplotlib Agg), coloured from N- to
    C-terminus (:func:`plot_ca_trace` draws a PDB file with it)."""
    plt = _pyplot()
    ca = np.asarray(ca, dtype=np.float64)
    ca = ca - ca.mean(0)
    fig = plt.figure(figsize=(5, 5))
    ax = fig.add_subplot(projection="3d")
    cmap = plt.get_cmap("viridis")
    n = len(ca)
    for k in range(n - 1):
        ax.plot(*ca[k:k + 2].T, color=cmap(k / max(1, n - 2)), lw=2.2)
    ax.scatter(*ca.T, c=np.arange(n), cmap="viridis", s=9, depthshade=False)
    r = np.abs(ca).max()
    for setter in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
        setter(-r, r)
    ax.set_box_aspect((1, 1, 1))
    ax.set_xlabel("x (A)")
    ax.set_ylabel("y (A)")
    ax.set_zlabel("z (A)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, Path(png_path))
    plt.close(fig)
    return out


def plot_ca_trace(pdb_path: str | os.PathLike, png_path: str | os.PathLike, title: str | None = None) -> Path:
    """Render the CA trace of a backbone PDB as a 3-D line plot (PNG, matplotlib Agg), coloured from
    N- to C-terminus: a quick look at a sample without a molecular viewer."""
    from .structures import read_backbone

    ca = np.asarray(read_backbone(pdb_path).atoms[:, 1], dtype=np.float64)
    return plot_ca(ca, png_path, title or f"{Path(pdb_path).name}: CA trace, {len(ca)} residues "
                                          "(N -> C: purple -> yellow)")
