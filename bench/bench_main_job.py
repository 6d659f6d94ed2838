"""Time the README's main job (plain ``generate_backbones``) on the CPU, with user/sys split and page faults.

Each repeat runs ``python -m superdiff_protein.cli.generate out_dir=<fresh tmp dir> progress=false [overrides]``
in a child process and reads the child's own resource usage (``os.wait4``): wall, user and system CPU
seconds, minor page faults, peak RSS. ``--forward`` also times one no-grad forward of the
``default-helix`` FrameDiff network at batch 10 x length 100 (the job's unit of work).

    python bench/bench_main_job.py --repeats 3 --label after --out bench/results/main_job_cpu.json
    python bench/bench_main_job.py --repeats 2 --label no-mallopt --env SUPERDIFF_NO_MALLOPT=1 --out ...
    python bench/bench_main_job.py --forward --repeats 0

Results are appended to ``--out`` (a JSON list of records) and printed as a markdown table. The host may
be shared: the load average before each run is recorded; report the best run and the spread.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_job(overrides: list[str], env_over: dict[str, str]) -> dict:
    """Run the job once in a child process; returns its wall time and rusage."""
    env = dict(os.environ)
    env.update(env_over)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_main_job_") as tmp:
        cmd = [sys.executable, "-m", "superdiff_protein.cli.generate", f"out_dir={tmp}/out", "progress=false",
               *overrides]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate()
        wall = time.perf_counter() - t0
        # communicate() reaped the child; its rusage is in RUSAGE_CHILDREN (delta taken by the caller)
        if proc.returncode != 0:
            raise RuntimeError(f"job failed ({proc.returncode}): {err.decode()[-2000:]}")
    return {"wall_s": wall, "load_avg_1min_before": load, "summary": out.decode().strip().splitlines()[-1:]}


def timed_job(overrides: list[str], env_over: dict[str, str]) -> dict:
    import resource

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    rec = run_job(overrides, env_over)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    rec.update(user_s=r1.ru_utime - r0.ru_utime, sys_s=r1.ru_stime - r0.ru_stime,
               minor_faults=r1.ru_minflt - r0.ru_minflt, max_rss_mb=r1.ru_maxrss / 1024)
    return rec


def forward_ms(reps: int = 10, batch: int = 10, length: int = 100) -> dict:
    """Mean no-grad forward time of default-helix (FrameScoreModel call: network + scores)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from superdiff_protein.cli.runtime import tune_malloc
    from superdiff_protein.frames.geometry import so3_exp
    from superdiff_protein.frames.registry import load_model

    tuned = tune_malloc()
    m = load_model("default-helix")
    g = torch.Generator().manual_seed(0)
    x = {"rot": so3_exp(torch.randn(batch, length, 3, generator=g, dtype=torch.float64)),
         "trans": torch.randn(batch, length, 3, generator=g, dtype=torch.float64)}
    t = torch.full((batch,), 0.5, dtype=torch.float64)
    with torch.no_grad():
        st = m(x, t, None, m.init_state(batch, None)).state
        m(x, t, None, st)
        t0 = time.perf_counter()
        for _ in range(reps):
            m(x, t, None, st)
        ms = (time.perf_counter() - t0) / reps * 1000
    return {"forward_ms": ms, "batch": batch, "length": length, "reps": reps, "mallopt": tuned,
            "threads": torch.get_num_threads()}


def _cpu_model() -> str:
    """Vendor, family/model and vector width of this CPU, from /proc/cpuinfo ('' elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    info: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = (x.strip() for x in line.split(":", 1))
            info.setdefault(k, v)
        elif info:
            break
    flags = info.get("flags", "").split()
    vec = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    return (f"{info.get('vendor_id', '?')} family {info.get('cpu family', '?')} model {info.get('model', '?')} "
            f"({info.get('model name', '?')}), {vec}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--label", default="")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the job's environment")
    p.add_argument("--forward", action="store_true", help="also time one model forward in this process")
    p.add_argument("--out", type=Path, default=None, help="append records to this JSON list")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for generate_backbones (default: none)")
    a = p.parse_args()
    env_over = dict(kv.split("=", 1) for kv in a.env)
    import torch

    meta = {"label": a.label, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "env": env_over, "overrides": a.overrides,
            "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True).stdout.strip()}
    runs = []
    for i in range(a.repeats):
        rec = timed_job(a.overrides, env_over)
        runs.append(rec)
        print(f"run {i + 1}: wall {rec['wall_s']:.1f} s  user {rec['user_s']:.1f} s  sys {rec['sys_s']:.1f} s  "
              f"minor faults {rec['minor_faults']:,}  peak RSS {rec['max_rss_mb']:.0f} MB  "
              f"(load before {rec['load_avg_1min_before']:.2f})", flush=True)
    record = dict(meta, runs=runs)
    if runs:
        walls = [r["wall_s"] for r in runs]
        record.update(best_wall_s=min(walls), worst_wall_s=max(walls))
        print(f"\n| label | runs | best wall s | spread s | user s | sys s | minor faults |\n|---|---|---|---|---|---|---|")
        b = min(runs, key=lambda r: r["wall_s"])
        print(f"| {a.label} | {len(runs)} | {b['wall_s']:.1f} | {min(walls):.1f}-{max(walls):.1f} | "
              f"{b['user_s']:.1f} | {b['sys_s']:.1f} | {b['minor_faults']:,} |")
    if a.forward:
        record["forward"] = forward_ms()
        print(f"forward (default-helix, batch 10 x 100, no grad): {record['forward']['forward_ms']:.1f} ms")
    if a.out:
        data = json.loads(a.out.read_text()) if a.out.is_file() else []
        data.append(record)
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
