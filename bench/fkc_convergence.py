"""Error of the FKC product estimate against the number of particles per group (issue 15, docs/fkc.md).

Product of N(1, 0.25) and N(-1.5, 1) (exact: mean 0.5, variance 0.2) under the VP-SDE, groups of K particles
with systematic resampling at ESS < K/2, 200 steps. For each K, G independent groups each give a
self-normalised estimate of the mean; the root-mean-square error over groups is reported with its
standard error, next to the same drift without weights (which does not converge to the target).

    python bench/fkc_convergence.py --groups 16 --out bench/results/fkc_convergence.json --plot docs/img/fkc_convergence.png
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.analytic import gaussian_mixture_model  # noqa: E402
from superdiff_protein.core.fkc import ProductRule  # noqa: E402
from superdiff_protein.core.sampler import SamplerConfig, superpose  # noqa: E402
from superdiff_protein.core.smc import SMCConfig  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    m1 = gaussian_mixture_model([[1.0]], 0.25, name="a")
    m2 = gaussian_mixture_model([[-1.5]], 1.0, name="b")
    mu = (1.0 / 0.25 - 1.5) / (1 / 0.25 + 1.0)
    rows = []
    for k in a.ks:
        seeds = list(range(10_000, 10_000 + k * a.groups))
        out = {}
        for name, smc in (("fkc", SMCConfig(group_size=k)), ("no_weights", SMCConfig(group_size=k, resample="none"))):
            r = superpose(m1.space, [m1, m2], ProductRule(), SamplerConfig(num_steps=a.steps, min_t=1e-3), seeds,
                          {"x": (1,)}, smc=smc)
            x = r.x["x"][:, 0].reshape(a.groups, k)
            w = torch.softmax(r.log_weight.reshape(a.groups, k), -1) if name == "fkc" else torch.full_like(x, 1 / k)
            err2 = ((w * x).sum(-1) - mu) ** 2
            out[name] = {"rmse": math.sqrt(float(err2.mean())),
                         "rmse_se": float(err2.std() / math.sqrt(a.groups)) / (2 * math.sqrt(float(err2.mean())))}
        rows.append({"K": k, **out})
        print(f"K={k:4d}  FKC rmse {out['fkc']['rmse']:.4f}   no weights rmse {out['no_weights']['rmse']:.4f}")
    res = {"script": "bench/fkc_convergence.py", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
           "target_mean": mu, "groups": a.groups, "steps": a.steps, "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        ks = [r["K"] for r in rows]
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.errorbar(ks, [r["fkc"]["rmse"] for r in rows], yerr=[r["fkc"]["rmse_se"] for r in rows], marker="o",
                    label="FKC product (weights + resampling)")
        ax.errorbar(ks, [r["no_weights"]["rmse"] for r in rows], yerr=[r["no_weights"]["rmse_se"] for r in rows],
                    marker="s", label="same drift, no weights")
        ref = rows[0]["fkc"]["rmse"] * math.sqrt(ks[0])
        ax.plot(ks, [ref / math.sqrt(k) for k in ks], "k--", lw=0.8, label="1/sqrt(K)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("particles per group K")
        ax.set_ylabel("RMSE of the group's mean estimate")
        ax.set_title(f"product of two Gaussians, {a.groups} groups, {a.steps} steps", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110, metadata={"Software": None})
    return res


if __name__ == "__main__":
    main()
