"""What the Feynman–Kac weights and resampling add to a sampler step (issue 15: <= 2 % at 100 x 64 on a GPU).

Two paper-size FrameDiff networks (random weights, bench_superposition.make_model) at length 100. Per-step
time of: OR (the reference), ``product`` with weights only (``smc.resample=none``), and ``product`` with
groups of 8 resampling at every step (``ess_threshold=1``) and at the default ``ess_threshold=0.5`` (both gather
the state every step; systematic resampling needs no host sync). Each repeat times the three settings back to back (interleaved, so
clock drift hits them alike); per-step time = (long run - short run) / steps.

    python bench/bench_fkc.py --batch 64 --length 100 --steps 20 --repeats 5 --out fkc_overhead.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_superposition import make_model, set_precision, stats  # noqa: E402
from superdiff_protein.core.fkc import ProductRule  # noqa: E402
from superdiff_protein.core.kappa import OrRule  # noqa: E402
from superdiff_protein.core.sampler import SamplerConfig, superpose  # noqa: E402
from superdiff_protein.core.smc import SMCConfig  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def run_once(models, rule, smc, n, batch, steps, dev):
    space = models[0].diffuser.space
    cfg = SamplerConfig(num_steps=steps, min_t=0.01, device=dev, dtype=torch.float32)
    _sync(dev)
    t0 = time.perf_counter()
    superpose(space, models, rule, cfg, list(range(batch)), {"rot": (n,), "trans": (n, 3)}, smc=smc)
    _sync(dev)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--precision", default="tf32", choices=["fp32", "tf32", "bf16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="small networks (a CPU smoke test of this script)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        set_precision(a.precision)
    if a.tiny:
        from models.frame_models import FrameScoreModel
        from models.framediff import FrameDiffAdapter, FrameDiffConfig, FrameDiffScoreNetwork
        from superdiff_protein.frames.se3 import SE3Diffuser

        def mk(seed):
            torch.manual_seed(seed)
            from models.framediff.config import IpaConfig
            net = FrameDiffScoreNetwork(FrameDiffConfig(node_embed_size=32, edge_embed_size=16,
                                                        ipa=IpaConfig(c_s=32, c_z=16, c_hidden=16, c_skip=8,
                                                                      num_blocks=1)))
            return FrameScoreModel(FrameDiffAdapter(net).to(dev).eval(), SE3Diffuser.framediff_default(),
                                   name=f"tiny{seed}", kind="framediff")
        models = [mk(0), mk(1)]
    else:
        models = [make_model("framediff", s, dev, a.precision, Path("unused")) for s in (0, 1)]
    settings = {
        "or": (OrRule(), None),
        "product_weights_only": (ProductRule(), SMCConfig(group_size=a.group_size, resample="none")),
        "product_resample_every_step": (ProductRule(), SMCConfig(group_size=a.group_size, ess_threshold=1.0)),
        "product_resample_ess_half": (ProductRule(), SMCConfig(group_size=a.group_size, ess_threshold=0.5)),
    }
    with torch.no_grad():
        for rule, smc in settings.values():           # warm-up
            run_once(models, rule, smc, a.length, a.batch, 2, dev)
    per_step = {k: [] for k in settings}
    with torch.no_grad():
        for _ in range(a.repeats):
            for k, (rule, smc) in settings.items():
                short = run_once(models, rule, smc, a.length, a.batch, 2, dev)
                long_ = run_once(models, rule, smc, a.length, a.batch, a.steps + 2, dev)
                per_step[k].append((long_ - short) / a.steps)
    syncs = {}
    if dev.type == "cuda":      # host syncs inside the loop: torch's sync debug mode raises on the first one
        for k, (rule, smc) in settings.items():
            space = models[0].diffuser.space
            cfg = SamplerConfig(num_steps=6, min_t=0.01, device=dev, dtype=torch.float32, nan_check_every=1000)
            from superdiff_protein.core.sampler import Sampler
            from superdiff_protein.core.smc import SMCTracker
            sampler = Sampler(space, models, rule, cfg)
            seeds = list(range(a.batch))
            state = sampler.init_state(seeds, {"rot": (a.length,), "trans": (a.length, 3)})
            tracker = SMCTracker(smc, seeds, None, sampler.num_steps, dev) if smc is not None else None
            ts = sampler.ts.tolist()
            with torch.no_grad():
                state = sampler.step(state).state           # the first call (self-conditioning pass) outside
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    for i in range(1, 5):
                        state = sampler.step(state).state
                        if tracker is not None:
                            state = tracker.after_step(state, ts[i + 1], i)
                    syncs[k] = "none in steps 2-5"
                except RuntimeError as e:
                    syncs[k] = f"sync: {str(e).splitlines()[0][:200]}"
                finally:
                    torch.cuda.set_sync_debug_mode(0)
    ref = per_step["or"]
    res = {
        "script": "bench/bench_fkc.py", "argv": sys.argv[1:] if argv is None else argv,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "batch": a.batch, "length": a.length, "steps": a.steps, "repeats": a.repeats,
        "group_size": a.group_size, "precision": a.precision, "tiny": a.tiny,
        "ms_per_step": {k: stats(v, 1e3) for k, v in per_step.items()},
        # overhead per repeat against the OR step of the same repeat
        "host_syncs": syncs,
        "overhead_pct": {k: stats([100 * (x / r - 1) for x, r in zip(v, ref)], 1.0)
                         for k, v in per_step.items() if k != "or"},
    }
    print(json.dumps(res, indent=1))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
