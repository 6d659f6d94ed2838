"""Where a paper-size network spends its GPU time (issue 16): per-module CUDA time (eager) and the top kernels.

For each network (``framediff``, ``proteus``) at ``--batch`` x 100 residues, random weights, with
self-conditioning input as in a sampler step:

* **per module** (eager): CUDA events around every child module of the trunk's blocks (module *type*, summed over
  blocks), so the table says e.g. how much of Proteus is its local triangle update, its IPA or its embedder;
* **top kernels** (eager and, with ``--compiled``, ``torch.compile``-d): ``torch.profiler`` CUDA time per kernel
  name over ``--calls`` calls, the 25 largest.

    python bench/profile_networks.py --precision bf16 --batch 128 --compiled --out $OUT/profile.json

A profile is a diagnosis, not a benchmark: the per-module events add a sync per module. Use bench_compile.py
for times.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_compile import LENGTH, _unwrap, inputs  # noqa: E402
from bench_superposition import make_model, set_precision  # noqa: E402


def _clock(dev: torch.device):
    """A start/stop pair: CUDA events on a GPU, perf_counter on the CPU (smoke runs); returns ms."""
    if dev.type == "cuda":
        start = _record()

        def stop() -> float:
            end = _record()
            end.synchronize()
            return start.elapsed_time(end)
        return stop
    t0 = time.perf_counter()
    return lambda: 1000 * (time.perf_counter() - t0)


def _record():
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def _parts(net: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The network's parts, each counted once: every module held in a ModuleDict/ModuleList (the blocks' parts),
    and every container-free module whose parent holds containers (embedders, heads). Pre-order, so a module
    inside an already chosen one is skipped."""
    containers = (torch.nn.ModuleDict, torch.nn.ModuleList, torch.nn.Sequential)
    mods = dict(net.named_modules())
    holds = {n: any(isinstance(c, containers) for c in m.modules()) for n, m in mods.items()}
    chosen: list[str] = []
    for name, mod in mods.items():
        if not name or isinstance(mod, containers) or any(name.startswith(c + ".") for c in chosen):
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if isinstance(mods[parent], containers) or (not holds[name] and holds[parent]):
            chosen.append(name)
    return [(n, mods[n]) for n in chosen]


def module_times(net: torch.nn.Module, call, reps: int, dev: torch.device,
                 parts: list[tuple[str, torch.nn.Module]] | None = None) -> dict:
    """Device ms per call by part (``parts``, default ``_parts(net)``; block copies summed), and ``TOTAL`` for the
    whole call."""
    acc: dict = defaultdict(float)
    hooks, open_ = [], {}

    def pre(mod, _inp):
        open_[id(mod)] = _clock(dev)

    def post(mod, _inp, _out):
        acc[keys[id(mod)]] += open_.pop(id(mod))()

    keys = {}
    # blocks summed: trunk.ipa_0..3 -> trunk.ipa; Sequential layers -> their parent
    for name, mod in (parts if parts is not None else _parts(net)):
        keys[id(mod)] = re.sub(r"_\d+$|\.\d+$", "", name).replace("network.", "", 1)
        hooks.append(mod.register_forward_pre_hook(pre))
        hooks.append(mod.register_forward_hook(post))
    try:
        call()
        acc.clear()
        for _ in range(reps):
            stop = _clock(dev)
            call()
            acc["TOTAL"] += stop()
    finally:
        for h in hooks:
            h.remove()
    return {k: round(v / reps, 3) for k, v in sorted(acc.items(), key=lambda kv: -kv[1])}


def top_kernels(call, calls: int, dev: torch.device) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    call()
    sync()
    act = ProfilerActivity.CUDA if dev.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[act]) as prof:
        for _ in range(calls):
            call()
        sync()
    rows = []
    for ev in prof.key_averages():
        t = (getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)) if dev.type == "cuda" \
            else ev.self_cpu_time_total
        if t:
            rows.append(dict(name=ev.key[:160], ms_per_call=round(t / 1000 / calls, 3), count=ev.count // calls))
    rows.sort(key=lambda r: -r["ms_per_call"])
    total = round(sum(r["ms_per_call"] for r in rows), 3)
    return [dict(total_ms_per_call=total, kernels_per_call=sum(r["count"] for r in rows))] + rows[:25]


def esmfold_parts(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """ESMFold's parts: the language model, each folding block's children (summed over the 48 blocks), and the
    trunk's and model's other direct children (structure module, recycling embeddings, heads)."""
    parts = [(f"trunk.blocks.{name}", mod) for blk in model.trunk.blocks for name, mod in blk.named_children()]
    parts += [(f"trunk.{name}", mod) for name, mod in model.trunk.named_children() if name != "blocks"]
    parts += [(name, mod) for name, mod in model.named_children() if name != "trunk"]
    return parts


def profile_esmfold(a, dev: torch.device) -> dict:
    """ESMFold (esmfold_v1 sizes, random weights) folding ``--batch`` random sequences of ``--length`` through the
    project's ``eval.fold.fold_sequences``, at ``--fold-precision``: per part and top kernels, eager and (with
    ``--compiled``) with every folding block compiled."""
    from bench_eval import esmfold_real_size
    from eval.fold import compile_folding_blocks, fold_sequences, prepare_esmfold
    import numpy as np
    model = prepare_esmfold(esmfold_real_size(dev.type, tiny=a.tiny_esmfold), dev, chunk_size=None,
                            precision=a.fold_precision)
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ARNDCQEGHILKMFPSTWYV"), a.length)) for _ in range(a.batch)]
    call = lambda: fold_sequences(model, seqs, batch_size=a.batch)  # noqa: E731
    rec = {"fold_precision": a.fold_precision, "length": a.length,
           "modules_ms": module_times(model, call, 2, dev, esmfold_parts(model)),
           "eager_kernels": top_kernels(call, a.calls, dev)}
    if a.compiled:
        t0 = time.perf_counter()
        compile_folding_blocks(model)   # fold.compile's own path
        call()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rec["compile_s"] = round(time.perf_counter() - t0, 1)
        rec["compiled_kernels"] = top_kernels(call, a.calls, dev)
    return rec


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="bf16", choices=["tf32", "bf16"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--compiled", action="store_true", help="also profile torch.compile-d networks")
    p.add_argument("--networks", nargs="+", default=["proteus", "framediff"],
                   help="proteus, framediff, esmfold (esmfold: --length, --fold-precision)")
    p.add_argument("--length", type=int, default=100, help="esmfold only: sequence length")
    p.add_argument("--fold-precision", default="fp32", choices=["fp32", "tf32", "bf16"], help="esmfold only")
    p.add_argument("--tiny-esmfold", action="store_true", help="esmfold only: a tiny model (CPU smoke run)")
    p.add_argument("--proteus-keys", type=Path, default=Path("../shared/fixtures/official/proteus_paper_keys.json"))
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (CPU times, CPU ops)")
    p.add_argument("--out", default="profile_networks.json")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("profile_networks: needs a CUDA device (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    set_precision(a.precision)
    res = {"precision": a.precision, "batch": a.batch, "length": LENGTH,
           "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "networks": {}}
    for kind in a.networks:
        if kind == "esmfold":
            with torch.no_grad():
                res["networks"][kind] = rec = profile_esmfold(a, dev)
            Path(a.out).write_text(json.dumps(res, indent=1))
            print(json.dumps({kind: {k: v for k, v in rec.items() if k in ("modules_ms", "compile_s")}}), flush=True)
            for key in ("eager_kernels", "compiled_kernels"):
                for r in rec.get(key, [])[:15]:
                    print(kind, key, json.dumps(r), flush=True)
            continue
        m = make_model(kind, 1 if kind == "framediff" else 3, dev, a.precision, a.proteus_keys)
        x, t = inputs([m], a.batch, dev)
        R = x["rot"].float()
        T = (x["trans"] / m.diffuser.coordinate_scaling).float()
        mask = torch.ones(a.batch, LENGTH, device=dev)
        pred = m.predictor
        with torch.no_grad():
            cond = pred(R, T, t, mask, None).self_cond_state
            call = lambda f=pred: f(R, T, t, mask, cond)  # noqa: E731
            rec = {"modules_ms": module_times(_unwrap(pred), call, 3, dev),
                   "eager_kernels": top_kernels(call, a.calls, dev)}
            if a.compiled:
                inner = _unwrap(pred)
                t0 = time.perf_counter()
                inner.compile()
                call()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                rec["compile_s"] = round(time.perf_counter() - t0, 1)
                rec["compiled_kernels"] = top_kernels(call, a.calls, dev)
        res["networks"][kind] = rec
        Path(a.out).write_text(json.dumps(res, indent=1))
        print(json.dumps({kind: {k: (v if k != "modules_ms" else v) for k, v in rec.items()
                                 if k in ("modules_ms", "compile_s")}}), flush=True)
        for key in ("eager_kernels", "compiled_kernels"):
            for r in rec.get(key, [])[:12]:
                print(kind, key, json.dumps(r), flush=True)
        del m, pred
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
