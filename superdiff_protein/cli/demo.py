"""``superdiff_demo``: OR and AND of two exact 2-D models, pictured like Figure 2 of the paper (the official notebooks/superposition_edu.ipynb, docs/evaluation.md).

Two Gaussian mixtures in R^2 under FrameDiff's VP-SDE share one mode. The demo samples each model
alone, their average of scores, OR (l = 0) and AND, colours the samples by their final kappa of
model 1, and reports how far apart the two models' exact log-densities are at the samples.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("superdiff_demo")


def demo_models():
    """The two exact 2-D models of the demo."""
    from models.analytic import gaussian_mixture_model

    m1 = gaussian_mixture_model([[-2.5, 0.0], [0.0, 2.0]], [0.25, 0.15], name="model_1")
    m2 = gaussian_mixture_model([[2.5, 0.0], [0.0, 2.0]], [0.6, 0.15], name="model_2")
    return m1, m2


def run_demo(out: str | Path = "superdiff_demo.png", samples: int = 600, steps: int = 300, seed: int = 0,
             progress: bool = True) -> dict:
    """Sample every rule, save the picture and a JSON summary next to it; return the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    from superdiff_protein.core.kappa import AndRule, AverageRule, OrRule, SingleRule
    from superdiff_protein.core.sampler import SamplerConfig, superpose

    if samples < 1 or steps < 1:
        raise ValueError("samples and steps must be >= 1")
    # tiny tensors: intra-op threads only add synchronisation (10x slower on a busy 2-core machine)
    torch.set_num_threads(1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    m1, m2 = demo_models()
    rules = [("model 1", SingleRule(0)), ("model 2", SingleRule(1)), ("average of scores", AverageRule()),
             ("OR (T=1, l=0)", OrRule()), ("AND", AndRule())]
    seeds = [seed * 1_000_003 + i for i in range(samples)]
    cfg = SamplerConfig(num_steps=steps, min_t=1e-3, time_grid="quadratic")
    tend = torch.full((samples,), cfg.min_t, dtype=torch.float64)
    fig, axes = plt.subplots(1, len(rules), figsize=(3.6 * len(rules) + 1.2, 3.9), sharex=True, sharey=True,
                             layout="constrained")
    summary = {"samples": samples, "steps": steps, "seed": seed, "rules": {}}
    bar = tqdm(total=len(rules) * steps, desc="superdiff demo", disable=not progress)
    for ax, (title, rule) in zip(axes, rules):
        t0 = time.perf_counter()
        res = superpose(m1.space, [m1, m2], rule, cfg, seeds, {"x": (2,)}, callback=lambda s, n: bar.update(1))
        x = res.x["x"]
        exact = torch.stack([m.log_prob(res.x, tend)["x"] for m in (m1, m2)], -1)
        kappa1 = res.kappa_trace[-1, :, 0, 0]
        gap = (exact[:, 0] - exact[:, 1]).abs()
        summary["rules"][title] = {
            "median_abs_logq_gap": float(gap.median()),
            "fraction_left": float((x[:, 0] < -1.25).double().mean()),
            "fraction_right": float((x[:, 0] > 1.25).double().mean()),
            "fraction_shared_mode": float((x[:, 1] > 1.0).double().mean()),
            "seconds": time.perf_counter() - t0,
        }
        sc = ax.scatter(x[:, 0], x[:, 1], c=kappa1.clamp(-0.5, 1.5), cmap="coolwarm_r", s=6, vmin=-0.5, vmax=1.5)
        ax.set_title(f"{title}\nmedian |log q1 - log q2| = {float(gap.median()):.2f}", fontsize=10)
        ax.set_xlim(-5, 5)
        ax.set_ylim(-3, 4)
        ax.set_aspect("equal")
    bar.close()
    fig.colorbar(sc, ax=axes, shrink=0.9, label="final kappa of model 1", pad=0.01)
    fig.suptitle("Superposition of two exact models (colour: kappa of model 1)")
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    js = out.with_suffix(".json")
    tmpj = js.with_name(js.name + ".tmp")
    tmpj.write_text(json.dumps(summary, indent=2))
    os.replace(tmpj, js)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="superdiff_demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="superdiff_demo.png", help="output PNG (a JSON summary is written beside it)")
    p.add_argument("--samples", type=int, default=600)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        s = run_demo(a.out, a.samples, a.steps, a.seed, progress=not a.no_progress)
    except (ValueError, OSError) as e:
        print(f"superdiff_demo: error: {e}", file=sys.stderr)
        return 2
    for name, r in s["rules"].items():
        log.info("%-18s median|log q1 - log q2| = %6.3f   left %.2f  right %.2f  shared %.2f",
                 name, r["median_abs_logq_gap"], r["fraction_left"], r["fraction_right"], r["fraction_shared_mode"])
    log.info("wrote %s and %s", a.out, Path(a.out).with_suffix(".json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
