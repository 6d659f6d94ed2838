"""Superposition sampling on a GPU with paper-size FrameDiff / Proteus networks (random weights).

One script, four questions (issue "Speed and scale"); pick them with ``--questions``:

* ``ito_vs_hutchinson``: time per step and peak memory of density tracking with the Itô estimator
  vs the Hutchinson divergence, for OR of two FrameDiff networks, lengths 100/200/300, batch 8.
  Three routes: SDE + Itô (the paper's method), ODE + Hutchinson (the route the paper compares
  against), and SDE with noise_scale 0.1 + Hutchinson (our unbiased option).
* ``overhead``: one OR step of two models vs the two models' forward passes alone, with a breakdown.
* ``throughput``: OR(FrameDiff, Proteus) at length 100, by batch size. It times ``--steps`` steps and
  scales the per-step time to 500 steps; the extrapolation is stated in the output. Batch 1 is our
  faithful per-sample loop.

Every figure is measured ``--repeats`` times (default 5) and reported as median, min, max and the raw
values. The overhead question pairs each OR step with a forward measurement taken just before it, and
flags launch-bound sizes (the batch's forwards cost under 1.5x one sample's).
* ``scaling``: time per step per sample vs length, and vs number of models.

    python bench/bench_superposition.py --proteus-keys .gpu_data/proteus_paper_keys.json --out res.json
"""
from __future__ import annotations

import argparse
import ast
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.frame_models import FrameScoreModel  # noqa: E402
from superdiff_protein.core.kappa import OrRule, SingleRule  # noqa: E402
from superdiff_protein.core.sampler import SamplerConfig, superpose  # noqa: E402
from superdiff_protein.frames.se3 import SE3Diffuser  # noqa: E402


class Autocast(nn.Module):
    """Runs a frame predictor under CUDA bf16 autocast; outputs come back as float32 tensors."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @property
    def config(self):
        return getattr(self.inner, "config", None)

    def forward(self, *a, **k):
        # no weight-cast cache: a CUDA graph capture must not keep autocast's cached casts (torch.cuda.graphs)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            out = self.inner(*a, **k)
        for f in ("rotmats", "trans", "quats", "psi", "backbone", "self_cond_state"):
            v = getattr(out, f, None)
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                try:
                    setattr(out, f, v.float())
                except AttributeError:
                    pass
        return out


def randomise_final_layers(net: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def make_model(kind: str, seed: int, dev, precision: str, proteus_keys: Path) -> FrameScoreModel:
    torch.manual_seed(seed)
    if kind == "framediff":
        from models.framediff import FrameDiffAdapter, FrameDiffConfig, FrameDiffScoreNetwork
        net = FrameDiffScoreNetwork(FrameDiffConfig())
        randomise_final_layers(net, seed)
        adapter = FrameDiffAdapter(net)
        diffuser = SE3Diffuser.framediff_default()
    else:
        from models.proteus import ProteusAdapter, ProteusNetwork
        d = json.loads(Path(proteus_keys).read_text())
        conf = d["model_config"]
        conf = ast.literal_eval(conf) if isinstance(conf, str) else conf
        net = ProteusNetwork(conf)
        randomise_final_layers(net, seed)
        adapter = ProteusAdapter(net, {"model": conf})
        diffuser = SE3Diffuser.proteus_default()
    adapter = adapter.to(dev).eval()
    pred = Autocast(adapter) if precision == "bf16" else adapter
    return FrameScoreModel(pred, diffuser, name=f"{kind}{seed}", kind=kind)


def set_precision(precision: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = precision in ("tf32", "bf16")
    torch.backends.cudnn.allow_tf32 = precision in ("tf32", "bf16")


def run(models, rule, n, batch, steps, dev, **cfg_kw):
    space = models[0].diffuser.space
    cfg = SamplerConfig(num_steps=steps, min_t=0.01, device=dev, dtype=torch.float32, **cfg_kw)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    res = superpose(space, models, rule, cfg, list(range(batch)), {"rot": (n,), "trans": (n, 3)})
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    ok = all(bool(torch.isfinite(v).all()) for v in res.x.values())
    return dt, (torch.cuda.max_memory_allocated() - base) / 2**20, ok


REPEATS = 5


def stats(values: list[float], scale: float = 1.0, nd: int = 2) -> dict:
    """Median and spread (min, max) of repeated measurements, plus the raw values."""
    v = sorted(x * scale for x in values)
    return {"median": round(statistics.median(v), nd), "min": round(v[0], nd), "max": round(v[-1], nd),
            "n": len(v), "values": [round(x * scale, nd) for x in values]}


def timed_steps(models, rule, n, batch, steps, dev, repeats: int | None = None, **kw):
    """Per-step times (one per repeat) from the difference of a long and a short run, which removes
    set-up and the FrameDiff extra first pass from the per-step figure."""
    run(models, rule, n, batch, 2, dev, **kw)  # warm-up (allocator, cuBLAS handles)
    out, peak, ok = [], 0.0, True
    for _ in range(repeats or REPEATS):
        short, _, _ = run(models, rule, n, batch, 2, dev, **kw)
        long_, pk, fin = run(models, rule, n, batch, steps + 2, dev, **kw)
        out.append((long_ - short) / steps)
        peak, ok = max(peak, pk), ok and fin
    return out, peak, ok


def forward_only(models, n, batch, dev, reps):
    """Mean time per model of ``reps`` calls at batch x n (scores included, no sampler)."""
    space = models[0].diffuser.space
    g = [torch.Generator(device=dev).manual_seed(i) for i in range(batch)]
    x = space.sample_prior(batch, {"rot": (n,), "trans": (n, 3)}, g, None, torch.float32, dev)
    t = torch.full((batch,), 0.5, device=dev)
    states = [m.init_state(batch, None) for m in models]
    with torch.no_grad():
        for i, m in enumerate(models):  # first calls (FrameDiff's extra pass) outside the timing
            states[i] = m(x, t, None, states[i]).state
        torch.cuda.synchronize()
        per_model = []
        for i, m in enumerate(models):
            t0 = time.perf_counter()
            for _ in range(reps):
                m(x, t, None, states[i])
            torch.cuda.synchronize()
            per_model.append((time.perf_counter() - t0) / reps)
    return per_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", nargs="+", default=["ito_vs_hutchinson", "overhead", "throughput", "scaling"])
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 128])
    p.add_argument("--repeats", type=int, default=5, help="independent repeats per configuration (median, spread)")
    p.add_argument("--proteus-keys", type=Path, default=Path("../shared/fixtures/official/proteus_paper_keys.json"))
    p.add_argument("--out", type=Path, default=Path("bench_superposition.json"))
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_superposition: needs a CUDA device", file=sys.stderr)
        return 2
    global REPEATS
    REPEATS = a.repeats
    dev = torch.device("cuda")
    set_precision(a.precision)
    rec: dict = {"precision": a.precision, "timed_steps": a.steps, "repeats": a.repeats,
                 "device": torch.cuda.get_device_name(0)}
    fd = [make_model("framediff", s, dev, a.precision, a.proteus_keys) for s in (1, 2)]

    def log(key, value):
        rec.setdefault(key, []).append(value)
        print(json.dumps({key: value}), flush=True)
        a.out.write_text(json.dumps(rec, indent=1))  # partial results survive a time-out

    if "ito_vs_hutchinson" in a.questions:
        for n in (100, 200, 300):
            for route, kw in [("sde_ito", dict(estimator="ito")),
                              ("ode_hutchinson", dict(sampling="ode", estimator="hutchinson")),
                              ("sde_eta0.1_hutchinson", dict(noise_scale=0.1, estimator="hutchinson"))]:
                try:
                    s, peak, ok = timed_steps(fd, OrRule(), n, 8, min(a.steps, 10), dev, **kw)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    log("ito_vs_hutchinson", dict(length=n, batch=8, route=route, error="out of memory"))
                    continue
                log("ito_vs_hutchinson", dict(length=n, batch=8, route=route, ms_per_step=stats(s, 1000),
                                              peak_mib=round(peak, 1), finite=ok))
    if "overhead" in a.questions:
        for n, b in ((100, 8), (100, 32), (100, 64), (300, 8)):
            one = [sum(forward_only(fd, n, 1, dev, 10)) for _ in range(a.repeats)]
            steps_, fwds, pct = [], [], []
            for _ in range(a.repeats):  # paired: forwards and the OR step measured back to back
                f = sum(forward_only(fd, n, b, dev, 10))
                s_or = timed_steps(fd, OrRule(), n, b, a.steps, dev, repeats=1)[0][0]
                steps_.append(s_or)
                fwds.append(f)
                pct.append(100 * (s_or - f) / f)
            # launch-bound: the batch's forwards cost less than 1.5x one sample's, so the GPU is not the limit
            log("overhead", dict(length=n, batch=b, or_step_ms=stats(steps_, 1000), forwards_ms=stats(fwds, 1000),
                                 forwards_batch1_ms=stats(one, 1000), overhead_pct=stats(pct, 1, 1),
                                 launch_bound=statistics.median(fwds) < 1.5 * statistics.median(one)))
    if "throughput" in a.questions:
        pr = make_model("proteus", 3, dev, a.precision, a.proteus_keys)
        pair = [fd[0], pr]
        for b in a.batches:
            try:
                s, peak, ok = timed_steps(pair, OrRule(), 100, b, a.steps, dev)
            except torch.OutOfMemoryError:
                log("throughput", dict(batch=b, error="out of memory"))
                torch.cuda.empty_cache()
                continue
            fwd = [sum(forward_only(pair, 100, b, dev, 5)) for _ in range(a.repeats)]
            per_hour = [3600 * b / (x * 500) for x in s]
            log("throughput", dict(length=100, batch=b, ms_per_step=stats(s, 1000),
                                   backbones_per_hour=stats(per_hour, 1, 0),
                                   forward_limit_backbones_per_hour=stats([3600 * b / (x * 500) for x in fwd], 1, 0),
                                   peak_mib=round(peak, 1), finite=ok))
        del pr
    if "scaling" in a.questions:
        for n in (50, 100, 200, 300, 400, 500):
            try:
                s, peak, ok = timed_steps(fd[:1], SingleRule(0), n, 8, min(a.steps, 10), dev)
                log("scaling_length", dict(length=n, batch=8, models=1, ms_per_step=stats(s, 1000),
                                           ms_per_step_per_sample=stats(s, 1000 / 8), peak_mib=round(peak, 1)))
            except torch.OutOfMemoryError:
                log("scaling_length", dict(length=n, batch=8, error="out of memory"))
                torch.cuda.empty_cache()
        more = fd + [make_model("framediff", s, dev, a.precision, a.proteus_keys) for s in (4, 5)]
        for m in (1, 2, 3, 4):
            rule = SingleRule(0) if m == 1 else OrRule()
            s, peak, ok = timed_steps(more[:m], rule, 100, 8, min(a.steps, 10), dev)
            log("scaling_models", dict(length=100, batch=8, models=m, ms_per_step=stats(s, 1000),
                                       peak_mib=round(peak, 1)))
    rec["meta"] = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, python=platform.python_version(),
                       date=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=" ".join(sys.argv))
    a.out.write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
