"""``generate_backbones`` with the Feynman–Kac rules (``rule=product|anneal|geometric``, docs/fkc.md): the rule
from the options, group-level resume, the ``samples.csv`` cells (log-weight, group, ancestor) and the plot of
the effective sample size and the weights."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from ..core.fkc import FKC_RULES, AnnealRule, GeometricRule, ProductRule
from .generate_config import Options

__all__ = ["FKC_COLUMNS", "is_fkc_run", "fkc_rule", "complete_groups", "fkc_cells", "plot_weights"]

#: the samples.csv columns of an FKC run (after the kappa/logq columns)
FKC_COLUMNS = ("log_weight", "group", "ancestor")


def is_fkc_run(opts: Options) -> bool:
    return opts.rule in FKC_RULES


def fkc_rule(opts: Options, num_models: int):
    """The FKC rule of the options (``ValueError`` on a bad combination, reported as ``rule: ...``)."""
    M = num_models
    if opts.rule == "product":
        return ProductRule(weights=opts.weights)
    if opts.rule == "geometric":
        if M != 2:
            raise ValueError(f"geometric needs exactly 2 models (q_1^(1-gamma) q_2^gamma), got {M}")
        return GeometricRule(gamma=opts.gamma)
    of = opts.anneal_of
    if of == "auto":
        of = "single" if M == 1 else "or"
    if of == "single":
        if opts.single_index >= M:
            raise ValueError(f"single_index {opts.single_index} out of range for {M} model(s)")
        return AnnealRule(beta=opts.beta, index=opts.single_index)
    if of == "product":
        return AnnealRule(beta=opts.beta, weights=opts.weights or [1.0] * M)
    return AnnealRule(beta=opts.beta, of="or", bias=opts.bias)


def complete_groups(done: Collection[tuple[int, int]], group_size: int) -> set[tuple[int, int]]:
    """The done samples whose whole group of ``group_size`` is done (a group is resumed as a whole: its
    particles interact through resampling)."""
    K = int(group_size)
    if K <= 1:
        return set(done)
    by_group: dict[tuple[int, int], int] = {}
    for L, i in done:
        by_group[(L, i // K)] = by_group.get((L, i // K), 0) + 1
    return {(L, i) for L, i in done if by_group[(L, i // K)] == K}


def fkc_cells(res: Any, b: int, batch: Sequence[tuple[int, int]], group_size: int) -> dict[str, str]:
    """``log_weight``, ``group`` (``L{length}_g{k}``) and ``ancestor`` (the sample index of the particle's
    t = 1 ancestor in its group) of batch row ``b``."""
    L, i = batch[b]
    a = int(res.ancestor[b])
    return {"log_weight": f"{float(res.log_weight[b]):.6g}", "group": f"L{L}_g{i // max(1, group_size)}",
            "ancestor": str(batch[a][1])}


def trace_arrays(res: Any, b: int) -> dict[str, np.ndarray]:
    """The sample's group ESS trace and resampling flags, for its traces file."""
    if res.ess_trace is None:
        return {}
    g = int(res.group[b])
    return {"ess": res.ess_trace[:, g].numpy(), "resampled": res.resampled[:, g].numpy(),
            "log_weight": np.array(float(res.log_weight[b]))}


def plot_weights(out_dir: Path, length: int, traces: Sequence[Path], rows: Sequence[Mapping[str, str]]) -> Path | None:
    """``length_{L}/fkc_weights.png``: each group's ESS / K over t, and the final log-weights."""
    from ..runs.plots import _pyplot, save_figure

    plt = _pyplot()
    ess, seen = [], set()
    t = None
    for p, r in zip(traces, rows):
        if r.get("group") in seen or not Path(p).is_file():
            continue
        with np.load(p) as z:
            if "ess" not in z:
                continue
            ess.append(z["ess"])
            t = z["t"][1:]
        seen.add(r.get("group"))
    if not ess:
        return None
    lw = [float(r["log_weight"]) for r in rows if r.get("log_weight") not in (None, "")]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for e in ess:
        ax[0].plot(t, e, lw=0.8)
    ax[0].set_xlim(1, 0)
    ax[0].set_xlabel("t")
    ax[0].set_ylabel("ESS / K (before resampling)")
    ax[0].set_title(f"length {length}: {len(ess)} group(s)")
    finite = [v for v in lw if math.isfinite(v)]
    ax[1].hist(finite, bins=max(5, min(40, len(finite) // 2 or 1)))
    ax[1].set_xlabel("final log-weight (since the last resampling)")
    ax[1].set_ylabel("samples")
    fig.tight_layout()
    out = save_figure(fig, out_dir / f"length_{length}" / "fkc_weights.png")
    plt.close(fig)
    return out
