"""Eager vs torch.compile vs torch.compile + CUDA graphs for OR(FrameDiff, Proteus) at paper size (issue 16).

For each configuration ``precision x mode x batch`` (precision ``tf32`` = fp32 weights with TF32 matrix products,
``bf16`` = bf16 autocast in the networks, ``fp32``; mode ``eager``, ``default`` = ``torch.compile``,
``reduce-overhead`` = ``torch.compile`` with CUDA graphs) it measures, at length 100:

* ms/step of the real sampler (``superpose`` with ``FrameScoreModel`` s), from the difference of a
  ``steps + 2``-step run and a 2-step run (as ``bench_superposition.py``), ``--repeats`` times; backbones/h at
  500 steps;
* the forward limit: the two models' calls alone (scores included) at that batch;
* compile time: per network, the first compiled call (cold: an empty Inductor cache);
* max deviation vs eager: compiled vs eager predicted translations (Angstrom) and rotations on the same inputs,
  next to the eager run's own distance to a float64 copy of the networks (the rounding scale, docs/testing.md).

One worker process per plan entry (``precision:mode:batches``; one batch per compiled worker keeps the compile
phase short) compiles its shapes while the others compile theirs. Once all have compiled (a barrier), the workers
time one after another in plan order (the plan is the priority), so no timing shares the GPU or the CPU with
compiling. The merged JSON is rewritten every 10 s, so a command cut by its time limit keeps what was timed:

    python bench/bench_compile.py all --proteus-keys .gpu_data/proteus_paper_keys.json --out compile_h200.json \\
        --plan bf16:default:128 tf32:default:128 bf16:reduce-overhead:1 tf32:eager:1,16,128 ...

``--gpus N`` spreads the workers over N GPUs (worker i on GPU i mod N): the GPUs time side by side, the workers of
one GPU in plan order. A joined mode such as ``default+step-graph`` compiles once and times both modes (the full
matrix of docs/benchmarks.md was made this way, on 2 GPUs).

``--small`` uses the official small fixture checkpoints instead of paper-size networks (a CPU smoke test).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_superposition import Autocast, make_model, set_precision, stats  # noqa: E402
from models.frame_models import FrameScoreModel  # noqa: E402
from superdiff_protein.core.kappa import OrRule  # noqa: E402
from superdiff_protein.core.sampler import SamplerConfig, superpose  # noqa: E402
from superdiff_protein.frames.compiling import CompiledPredictor, compile_cache_dir, compile_models  # noqa: E402

LENGTH = 100
GFLOP_PER_SAMPLE_STEP = 54.2      # issue 16: FrameDiff 19.5 + Proteus 34.7 GFLOP per sample and OR step at L = 100
PEAK_TFLOPS = {"bf16": 790.0, "tf32": 395.0, "fp32": 67.0}   # measured bf16 matmul here (KINDS.md); TF32 = half; fp32 datasheet


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def build(a, dev: torch.device, mode: str) -> list:
    if a.small:
        fix = Path(a.small)
        models = [FrameScoreModel.from_checkpoint(fix / "framediff_small_public.pth", name="framediff"),
                  FrameScoreModel.from_checkpoint(fix / "proteus_small_public.pth", name="proteus")]
        for m in models:
            m.predictor = m.predictor.to(dev)
    else:
        models = [make_model("framediff", 1, dev, a.precision, a.proteus_keys),
                  make_model("proteus", 3, dev, a.precision, a.proteus_keys)]
    if mode not in ("eager", "eager-graph"):
        compile_models(models, "true", dev, mode, [m.name for m in models])
    return models


RUN_WARNINGS: dict = {}                       # fallback warnings of the sampler runs -> the worker's JSON
GRAPH_MODES = ("step-graph", "eager-graph")    # the whole sampler step as one CUDA graph (core/step_graph.py)
MODES = ("eager", "default", "reduce-overhead", *GRAPH_MODES)
#: steps of a short run: the graph modes run steps 0-1 eagerly, step 2 as the warm-up body, capture at step 3
BASE_STEPS = {"step-graph": 4, "eager-graph": 4}


def run(models, batch: int, steps: int, dev: torch.device, mode: str = "eager") -> float:
    space = models[0].diffuser.space
    graph = mode in GRAPH_MODES
    cfg = SamplerConfig(num_steps=steps, min_t=0.01, device=dev, dtype=torch.float32,
                        rng="counter" if graph else "stream", step_graph=graph)
    sync(dev)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        res = superpose(space, models, OrRule(), cfg, list(range(batch)), {"rot": (LENGTH,), "trans": (LENGTH, 3)})
    sync(dev)
    dt = time.perf_counter() - t0
    for w in wl:        # a step graph or compile that fell back: recorded, not hidden in the log
        if w.category.__name__ in ("StepGraphWarning", "CompileFallbackWarning"):
            RUN_WARNINGS[str(w.message)[:600]] = RUN_WARNINGS.get(str(w.message)[:600], 0) + 1
    if not all(bool(torch.isfinite(v).all()) for v in res.x.values()):
        raise RuntimeError("non-finite sampler state")
    return dt


def inputs(models, batch: int, dev: torch.device):
    space = models[0].diffuser.space
    g = [torch.Generator(device=dev).manual_seed(i) for i in range(batch)]
    x = space.sample_prior(batch, {"rot": (LENGTH,), "trans": (LENGTH, 3)}, g, None, torch.float32, dev)
    # t as the sampler passes it (an expanded 0-d tensor): at batch 1 its stride stays 0 through .contiguous(),
    # and another stride would make dynamo compile the network again
    return x, torch.tensor(0.5, device=dev).expand(batch)


def forward_limit(models, batch: int, dev: torch.device, reps: int) -> float:
    """Seconds per step of the two models' calls alone (scores included), steady state."""
    x, t = inputs(models, batch, dev)
    with torch.no_grad():
        states = [m(x, t, None, m.init_state(batch, None)).state for m in models]
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(reps):
            for m, s in zip(models, states):
                m(x, t, None, s)
        sync(dev)
    return (time.perf_counter() - t0) / reps


def _unwrap(pred):
    pred = pred.inner if isinstance(pred, CompiledPredictor) else pred
    return pred.inner if isinstance(pred, Autocast) else pred


def deviation(models, batch: int, dev: torch.device) -> dict:
    """Compiled vs eager (same precision) and eager vs a float64 copy, on the steady-state call's inputs."""
    x, t = inputs(models, batch, dev)
    out = {}
    with torch.no_grad():
        for m in models:
            R = x["rot"].float()
            T = (x["trans"] / m.diffuser.coordinate_scaling).float()
            mask = torch.ones(batch, LENGTH, device=dev)
            pred = m.predictor
            eager = pred.inner if isinstance(pred, CompiledPredictor) else pred
            cond = eager(R, T, t, mask, None).self_cond_state
            e = eager(R, T, t, mask, cond)
            rec = {}
            if isinstance(pred, CompiledPredictor):
                c = pred(R, T, t, mask, cond)
                rec["compiled_vs_eager_trans_A"] = float((c.trans.double() - e.trans.double()).abs().max())
                rec["compiled_vs_eager_rotmats"] = float((c.rotmats.double() - e.rotmats.double()).abs().max())
            if batch <= 16:                                    # the float64 copy: memory and time stay small
                net64 = copy.deepcopy(_unwrap(pred)).double()
                e64 = net64(R.double(), T.double(), t, mask.double(), cond.double())
                rec["eager_vs_float64_trans_A"] = float((e.trans.double() - e64.trans).abs().max())
                rec["eager_vs_float64_rotmats"] = float((e.rotmats.double() - e64.rotmats).abs().max())
                del net64
            out[m.name.rstrip("0123456789")] = rec
    return out


def _syncs(models, batch: int, steps: int, dev: torch.device) -> dict:
    """Synchronising CUDA operations of one sampler run, by the innermost project source line that caused them."""
    import traceback
    import warnings

    found: dict = {}

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        proj = [f for f in traceback.extract_stack()[:-1]
                if ("superdiff_protein" in f.filename or "/models/" in f.filename) and "compiling.py" not in f.filename]
        where = f"{Path(proj[-1].filename).name}:{proj[-1].lineno}: {proj[-1].line}" if proj else f"{filename}:{lineno}"
        found[where] = found.get(where, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode(1)
        try:
            run(models, batch, steps, dev)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return found


def probe_syncs(models, batch: int, dev: torch.device) -> dict:
    """Host syncs per sampler step: the difference of a 6-step and a 2-step run, divided by 4, per source line."""
    short, long_ = _syncs(models, batch, 2, dev), _syncs(models, batch, 6, dev)
    per_step = {k: (long_.get(k, 0) - short.get(k, 0)) / 4 for k in set(short) | set(long_)}
    return {"per_step": {k: v for k, v in sorted(per_step.items(), key=lambda kv: -kv[1]) if v},
            "run_2_steps": short}


def worker(a) -> int:
    dev = torch.device(a.device)
    torch._logging.set_logs(recompiles=True)           # a recompilation says why in the log
    set_precision(a.precision)
    modes = a.mode.split("+")     # e.g. default+step-graph: compile once, time both (they compile identically)
    bad = [m for m in modes if m not in MODES]
    if bad or len({"eager" in m for m in modes}) > 1:
        raise SystemExit(f"bench_compile: bad --mode {a.mode!r} (modes {MODES}; eager ones not mixed with compiled)")
    rec = {"precision": a.precision, "mode": a.mode, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
           "length": LENGTH, "repeats": a.repeats, "timed_steps": a.steps, "cache_dir": str(compile_cache_dir()),
           "rows": [], "run_warnings": RUN_WARNINGS}
    out = Path(a.out)

    def save():
        out.write_text(json.dumps(rec, indent=1))

    models, compiled = None, {}
    try:
        models = build(a, dev, modes[0])
        t0 = time.perf_counter()
        for b in a.batches:                          # compile (or warm up) every shape of this worker
            try:
                for mode in modes:                   # modes after the first reuse the compiled networks
                    run(models, b, BASE_STEPS.get(mode, 2) + 1, dev, mode)
                compiled[b] = {"ok": True}
            except Exception as e:  # noqa: BLE001 - recorded, the other shapes go on
                compiled[b] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        rec["warmup_s"] = round(time.perf_counter() - t0, 1)
        sess = next((m.predictor.session for m in models if isinstance(m.predictor, CompiledPredictor)), None)
        rec["compile_s"] = [dict(network=n, batch=s[0], seconds=round(dt, 1)) for n, s, dt in
                            (sess.warmups if sess else [])]
        rec["compile_failed"] = [m.name for m in models if getattr(m.predictor, "failed", False)]
        if a.probe_syncs and dev.type == "cuda" and compiled.get(a.batches[0], {}).get("ok"):
            try:
                rec["host_syncs"] = dict(batch=a.batches[0], **probe_syncs(models, a.batches[0], dev))
            except Exception as e:  # noqa: BLE001
                rec["host_syncs"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    except Exception as e:  # noqa: BLE001
        rec["error"] = f"{type(e).__name__}: {e}"[:1000]
        rec["traceback"] = traceback.format_exc()[-3000:]
    save()
    # barrier: every worker has compiled; then one worker at a time times its shapes
    if a.barrier:
        Path(a.barrier, f"ready.{os.getpid()}").touch()
        t_wait = time.perf_counter()
        while len(list(Path(a.barrier).glob("ready.*"))) < a.expect and time.perf_counter() - t_wait < a.barrier_timeout:
            time.sleep(0.5)
        rec["barrier_complete"] = len(list(Path(a.barrier).glob("ready.*"))) >= a.expect   # false: timed beside compiling
    if a.repeats < 1:
        rec["meta"] = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__)
        save()
        return 0
    if a.barrier:        # time in plan order (the plan's priority): wait for every earlier worker to be done
        t_wait = time.perf_counter()
        earlier = range(a.index) if a.turn_after is None else a.turn_after
        while any(not Path(a.barrier, f"done.{j}").exists() for j in earlier) and \
                time.perf_counter() - t_wait < a.turn_timeout:
            time.sleep(0.5)
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    try:
        rec["timed_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        t_timing = time.perf_counter()
        for b in a.batches:
            if models is None or not compiled.get(b, {}).get("ok"):
                rec["rows"].append(dict(batch=b, error=compiled.get(b, {}).get("error", rec.get("error"))))
                continue
            fwd = dev_rec = None
            for mode in modes:
                try:
                    row = _time_row(a, models, b, dev, mode, fwd, dev_rec)
                    fwd, dev_rec = row.pop("_fwd"), row["deviation"]
                except Exception as e:  # noqa: BLE001
                    row = dict(batch=b, error=f"{type(e).__name__}: {e}"[:500])
                row = {"mode": mode, **row} if len(modes) > 1 else row
                rec["rows"].append(row)
                print(json.dumps({"precision": a.precision, "mode": mode, **row}), flush=True)
                save()
        rec["timing_s"] = round(time.perf_counter() - t_timing, 1)
        # graphs dynamo compiled while timing (0 when every call hit the warmed-up graphs; see docs/benchmarks.md)
        rec["graphs_compiled_while_timing"] = counters["stats"]["unique_graphs"] - graphs_before
    finally:
        if a.barrier:
            Path(a.barrier, f"done.{a.index}").touch()
    rec["meta"] = dict(device=torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor() or "cpu",
                       torch=torch.__version__, python=platform.python_version(),
                       date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    save()
    return 0


def _time_row(a, models, b: int, dev: torch.device, mode: str, fwd: list | None, dev_rec: dict | None) -> dict:
    """One timed row: per-step time (difference of two runs), whole runs at batch 1 for graphed modes, the forward
    limit and the deviation (both shared between the modes of one worker: the same compiled networks)."""
    base = BASE_STEPS.get(mode, 2)
    run(models, b, base, dev, mode)               # allocator, cuBLAS handles
    per_step = []
    for _ in range(a.repeats):
        short = run(models, b, base, dev, mode)
        long_ = run(models, b, a.steps + base, dev, mode)
        per_step.append((long_ - short) / a.steps)
    # batch 1: whole 500-step runs, warm-up steps and the graph capture included (the latency goal)
    full = [run(models, 1, 500, dev, mode) for _ in range(a.repeats)] \
        if b == 1 and a.full_runs and mode in (*GRAPH_MODES, "reduce-overhead") else None
    fwd = fwd or [forward_limit(models, b, dev, 3) for _ in range(a.repeats)]
    med = statistics.median(per_step)
    limit_s = b * GFLOP_PER_SAMPLE_STEP / (PEAK_TFLOPS[a.precision] * 1e3)
    return dict(batch=b, ms_per_step=stats(per_step, 1000),
                backbones_per_hour=stats([3600 * b / (x * 500) for x in per_step], 1, 0),
                forward_ms=stats(fwd, 1000),
                forward_limit_backbones_per_hour=stats([3600 * b / (x * 500) for x in fwd], 1, 0),
                pct_of_forward_limit=round(100 * statistics.median(fwd) / med, 1),
                pct_of_compute_limit=round(100 * limit_s / med, 2),
                seconds_per_backbone_batch1=round(med * 500, 2) if b == 1 else None,
                full_500_step_run_s=stats(full, 1, 2) if full else None,
                deviation=dev_rec or deviation(models, b, dev), _fwd=fwd)


def run_all(a) -> int:
    """Start one worker per plan entry (``precision:mode:b1,b2,...``), then merge their JSON into ``--out``."""
    barrier = Path(tempfile.mkdtemp(prefix="bench_compile_"))
    work = Path(a.work_dir) if a.work_dir else barrier
    work.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, entry in enumerate(a.plan):
        prec, mode, batches = entry.split(":")
        cmd = [sys.executable, __file__, "worker", "--precision", prec, "--mode", mode, "--batches",
               *batches.split(","), "--repeats", str(a.repeats), "--steps", str(a.steps), "--device", a.device,
               "--proteus-keys", str(a.proteus_keys), "--barrier", str(barrier), "--expect", str(len(a.plan)),
               "--barrier-timeout", str(a.barrier_timeout), "--index", str(i),
               "--out", str(work / f"w{i}.json")] + (["--small", a.small] if a.small else []) + \
            (["--full-runs"] if a.full_runs else [])
        if mode == "eager" and not any(e.split(":")[1] == "eager" for e in a.plan[:i]):
            cmd.append("--probe-syncs")                # the first eager worker counts the host syncs of a step
        env = dict(os.environ)
        if a.gpus > 1:                                  # worker i on GPU i % gpus; it times after the earlier
            env["CUDA_VISIBLE_DEVICES"] = str(i % a.gpus)  # workers of its own GPU only
            cmd += ["--turn-after", *[str(j) for j in range(i % a.gpus, i, a.gpus)]]
        procs.append(subprocess.Popen(cmd, env=env))
    def on_term(signum, frame):                        # `timeout` ends the driver: keep what the workers saved
        merge(a, work, [p.poll() for p in procs])
        for p in procs:                                # and end the workers: left running, they would share the
            if p.poll() is None:                       # GPUs with whatever the machine runs next
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        sys.exit(124)

    signal.signal(signal.SIGTERM, on_term)
    while any(p.poll() is None for p in procs):         # partial results survive a time-out
        time.sleep(10)
        merge(a, work, [p.poll() for p in procs], quiet=True)
    rc = [p.wait() for p in procs]
    if a.rewarm:                                       # the same shapes again in a fresh process: the cache's effect
        prec, mode, batches = a.rewarm.split(":")
        cmd = [sys.executable, __file__, "worker", "--precision", prec, "--mode", mode, "--batches", *batches.split(","),
               "--repeats", "0", "--device", a.device, "--proteus-keys", str(a.proteus_keys),
               "--out", str(work / "rewarm.json")] + (["--small", a.small] if a.small else [])
        rc.append(subprocess.run(cmd).returncode)
    return merge(a, work, rc)


def merge(a, work: Path, rc: list | None = None, quiet: bool = False) -> int:
    """Merge the workers' JSON files ``w{i}.json`` of ``work`` (in plan order) into ``--out``."""
    rc = rc if rc is not None else []
    merged = {"plan": a.plan, "repeats": a.repeats, "timed_steps": a.steps, "length": LENGTH, "workers": [],
              "command": " ".join(sys.argv), "exit_codes": rc,
              "meta": dict(torch=torch.__version__, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                           gflop_per_sample_step=GFLOP_PER_SAMPLE_STEP, peak_tflops=PEAK_TFLOPS,
                           compile_threads=os.environ.get("TORCHINDUCTOR_COMPILE_THREADS"))}
    for i in range(len(a.plan)):
        f = work / f"w{i}.json"
        try:
            merged["workers"].append(json.loads(f.read_text()))
        except (OSError, ValueError):
            merged["workers"].append({"plan": a.plan[i], "error": "no output"})
    if (work / "rewarm.json").is_file():
        try:
            merged["rewarm"] = json.loads((work / "rewarm.json").read_text())
        except ValueError:
            pass
    Path(a.out).write_text(json.dumps(merged, indent=1))
    if not quiet:
        print(f"bench_compile: wrote {a.out}", flush=True)
    return 0 if all(r == 0 for r in rc) else 1


def fold_log(a) -> int:
    """``merge --from FILE --log LOG``: rows a worker printed to the log after the merged file's last periodic merge
    (a command cut by its time limit) are added to their worker, marked ``from_log``; nothing else changes."""
    d = json.loads(Path(a.from_json).read_text())
    added = 0
    for line in Path(a.log).read_text().splitlines():
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        prec, mode = row.pop("precision"), row.pop("mode")
        for entry, w in zip(d["plan"], d["workers"]):           # workers are in plan order
            p_, m_, batches = entry.split(":")
            if (p_, m_) == (prec, mode) and str(row["batch"]) in batches.split(",") and \
                    row["batch"] not in {r["batch"] for r in w.get("rows", [])}:
                w.setdefault("rows", []).append({**row, "from_log": True})
                added += 1
    d["folded_from_log"] = added
    Path(a.out).write_text(json.dumps(d, indent=1))
    print(f"bench_compile: {added} row(s) added from {a.log} -> {a.out}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["all", "worker", "merge"])
    p.add_argument("--plan", nargs="+", default=["bf16:default:128", "tf32:default:128", "bf16:reduce-overhead:1",
                                                  "tf32:reduce-overhead:1", "tf32:eager:1,16,128", "bf16:default:16",
                                                  "bf16:default:64", "tf32:default:16", "tf32:default:64",
                                                  "bf16:eager:1,16,128"],
                   help="precision:mode:batches, in priority order (the timing order)")
    p.add_argument("--precision", default="tf32", choices=["fp32", "tf32", "bf16"])
    p.add_argument("--mode", default="default",
                   help=f"one of {MODES}, or several joined by '+' (e.g. default+step-graph: compiled once, both timed)")
    p.add_argument("--full-runs", action="store_true", help="batch 1: also time whole 500-step runs")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 128])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat (difference of two runs)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--proteus-keys", type=Path, default=Path("../shared/fixtures/official/proteus_paper_keys.json"))
    p.add_argument("--small", default=None, help="folder of the official small fixture checkpoints (CPU smoke test)")
    p.add_argument("--probe-syncs", action="store_true")
    p.add_argument("--rewarm", default=None, help="precision:mode:batches compiled again at the end (warm cache)")
    p.add_argument("--barrier", default=None)
    p.add_argument("--expect", type=int, default=1)
    p.add_argument("--barrier-timeout", type=float, default=420.0)
    p.add_argument("--index", type=int, default=0, help="this worker's place in the plan: it times after 0..index-1")
    p.add_argument("--gpus", type=int, default=1,
                   help="all: spread the workers over this many GPUs (worker i on GPU i %% gpus); workers on "
                        "different GPUs time side by side, those on one GPU in plan order")
    p.add_argument("--turn-after", type=int, nargs="*", default=None,
                   help="worker: the plan indices to wait for before timing (default: all earlier ones)")
    p.add_argument("--turn-timeout", type=float, default=600.0, help="seconds to wait for the earlier workers")
    p.add_argument("--work-dir", default=None, help="where the workers write w{i}.json (kept: merge them later)")
    p.add_argument("--from", dest="from_json", default=None, help="merge: a merged file to complete from --log")
    p.add_argument("--log", default=None, help="merge: the run's log (its printed rows)")
    p.add_argument("--out", default="bench_compile.json")
    a = p.parse_args()
    if a.what != "merge" and a.device == "cuda" and not torch.cuda.is_available():
        print("bench_compile: needs a CUDA device (or --device cpu --small FIXTURE_DIR)", file=sys.stderr)
        return 2
    if a.what == "merge":
        return merge(a, Path(a.work_dir)) if a.work_dir else fold_log(a)
    return run_all(a) if a.what == "all" else worker(a)


if __name__ == "__main__":
    sys.exit(main())
