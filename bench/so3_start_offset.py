"""Numbers behind docs/superposition.md, "Start values on SO(3), and what they do to OR and AND"
(issue 13), and its discretisation-trap paragraph. CPU, float64, fixed seeds.

    python bench/so3_start_offset.py            # densities, start gaps, schedule numbers (a few CPU minutes)
    python bench/so3_start_offset.py --or-check # also OR with a bias from both start values (slow)

Prints one line per number. Everything uses the exact models of ``models/analytic.py``.
"""
from __future__ import annotations

import argparse
import math

import torch

from models.analytic import AnalyticModel, SO3PointMixture, frame_mixture_model
from superdiff_protein.frames.geometry import so3_log
from superdiff_protein.core.igso3 import igso3_log_density, sample_uniform_so3
from superdiff_protein.core.kappa import OrRule
from superdiff_protein.core.sampler import SamplerConfig, step_sizes, superpose, time_grid
from superdiff_protein.core.spaces import LinearVPSchedule, LogLinearSigmaSchedule, ProductSpace, SO3Space

F64 = torch.float64


def densities(g: torch.Generator) -> None:
    s = torch.tensor(1.5, dtype=F64)
    ends = igso3_log_density(torch.tensor([1e-6, math.pi], dtype=F64), s).exp()
    print(f"IGSO3(1.5) density w.r.t. Haar: {ends[0]:.4f} at angle 0, {ends[1]:.4f} at angle pi")
    om = so3_log(sample_uniform_so3((400_000,), generator=g)).norm(dim=-1)
    h = igso3_log_density(om, s)
    print(f"over 4e5 Haar draws: density {h.exp().min():.4f}..{h.exp().max():.4f}, mean {h.exp().mean():.4f}, "
          f"sd of log f {h.std():.4f}")
    mu1, mu2, r = (sample_uniform_so3((400_000,), generator=g) for _ in range(3))
    d = igso3_log_density(so3_log(mu1.transpose(-1, -2) @ r).norm(dim=-1), s) - \
        igso3_log_density(so3_log(mu2.transpose(-1, -2) @ r).norm(dim=-1), s)
    print(f"per-residue start gap (independent Haar centres): sd {d.std():.4f} (sqrt(2) sd log f = "
          f"{math.sqrt(2) * h.std():.4f}); sqrt(N) prediction: " +
          ", ".join(f"N={n}: {d.std() * math.sqrt(n):.3f}" for n in (1, 3, 10, 30, 100)))
    a = LinearVPSchedule().alpha(torch.tensor(1.0, dtype=F64)).item()
    print(f"VP: alpha(1) = {a:.4g}, alpha_bar(1) = {a * a:.4g}")


def model_pairs(g: torch.Generator, pairs: int = 20, n: int = 20_000) -> None:
    for N in (1, 3, 10, 30, 100):
        sd_r, sd_t = [], []
        for _ in range(pairs):
            mus = sample_uniform_so3((2, N), generator=g)
            means = torch.randn(2, N, 3, generator=g, dtype=F64)
            ms = [frame_mixture_model(mus[i:i + 1], means[i:i + 1], 0.05) for i in range(2)]
            x = {"rot": sample_uniform_so3((n, N), generator=g), "trans": torch.randn(n, N, 3, generator=g, dtype=F64)}
            one = torch.ones(n, dtype=F64)
            lq = [m.log_prob(x, one) for m in ms]
            sd_r.append((lq[0]["rot"] - lq[1]["rot"]).std().item())
            sd_t.append((lq[0]["trans"] - lq[1]["trans"]).std().item())
        r = torch.tensor(sd_r)
        print(f"N={N}: rotation start gap sd over {pairs} point-mass frame pairs {r.min():.3f}..{r.max():.3f} "
              f"(rms {r.pow(2).mean().sqrt():.3f}, /sqrt(N) {r.pow(2).mean().sqrt() / math.sqrt(N):.3f}); "
              f"translation start gap sd {sum(sd_t) / pairs:.4f}")


def schedule_numbers() -> None:
    sch = LogLinearSigmaSchedule()
    ts = time_grid(200, 0.01, "uniform")
    dtau = step_sizes(ts)[-1]
    for t in (ts[-1], ts[-2]):
        print(f"t={float(t):.5f}: sigma {float(sch.sigma(t)):.4f}, sigma^2 {float(sch.sigma(t)) ** 2:.4f}, "
              f"g^2 dtau {float(sch.g2(t)) * dtau:.5f} (dtau {dtau:.5f})")


def or_check(n_res: int = 10, n: int = 4000, l: float = 1.0) -> None:
    sch = LogLinearSigmaSchedule()
    space = ProductSpace({"rot": SO3Space(sch)})
    g = torch.Generator().manual_seed(0)
    mus = sample_uniform_so3((2, n_res), generator=g)
    ms = [AnalyticModel(space, {"rot": SO3PointMixture(mus[i:i + 1], None, sch)}, name=f"m{i}") for i in range(2)]
    R = sample_uniform_so3((400_000, n_res), generator=g)
    one = torch.ones(R.shape[0], dtype=F64)
    k1 = torch.sigmoid(l + ms[0].log_prob({"rot": R}, one)["rot"] - ms[1].log_prob({"rot": R}, one)["rot"])
    print(f"OR, N={n_res}, l={l}: predicted share of model 1: prior start {1 / (1 + math.exp(-l)):.4f}, "
          f"model start E_Haar[kappa_1(x_1)] = {k1.mean():.4f}")
    for init in ("prior", "model"):
        cfg = SamplerConfig(num_steps=200, min_t=0.05, time_grid="quadratic", init_logq=init)
        r = superpose(space, ms, OrRule(bias=[l, 0.0]), cfg, list(range(n)), {"rot": (n_res,)})
        tend = torch.full((n,), 0.05, dtype=F64)
        lq = torch.stack([m.log_prob(r.x, tend)["rot"] for m in ms], -1)
        f1 = (lq[:, 0] > lq[:, 1]).double().mean().item()
        print(f"  init_logq={init}: share {f1:.4f} +- {math.sqrt(f1 * (1 - f1) / n):.4f}, "
              f"log-odds {math.log(f1 / (1 - f1)):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--or-check", action="store_true", help="also run OR from both start values (slow)")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    densities(g)
    model_pairs(torch.Generator().manual_seed(1))
    schedule_numbers()
    if args.or_check:
        or_check()


if __name__ == "__main__":
    main()
