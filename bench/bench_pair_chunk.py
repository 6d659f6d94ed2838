"""CPU no-grad forward of an embedded default network against the pair-block size of its edge transitions.

``models.framediff.fast_paths.CPU_PAIR_CHUNK`` sets how many (i, j) pairs the CPU no-grad edge transition runs
through its MLP at a time (``0`` here: all at once, the code before blocking). For each repeat, every size is
timed once, in turn (so drift of a shared host spreads over all of them); each timing is the mean of ``--calls``
forwards of ``default-helix`` at ``--batch`` x ``--length`` after one warm-up call. Also prints the largest
difference of each size's translation score from the first size's (float32 rounding at most; 0 where the blocks
give the same bits).

    python bench/bench_pair_chunk.py --sizes 0 512 1024 2048 4096 8192 --repeats 5 --out bench/results/pair_chunk_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_main_job import _cpu_model  # noqa: E402

import models.framediff.fast_paths as net_mod  # noqa: E402
from superdiff_protein.cli.runtime import tune_malloc  # noqa: E402
from superdiff_protein.frames.geometry import so3_exp  # noqa: E402
from superdiff_protein.frames.registry import load_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[0, 1024, 2048, 4096])
    p.add_argument("--model", default="default-helix")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--label", default="")
    p.add_argument("--out", type=Path, default=None, help="append the record to this JSON list")
    a = p.parse_args()
    tuned = tune_malloc()
    m = load_model(a.model)
    g = torch.Generator().manual_seed(0)
    x = {"rot": so3_exp(torch.randn(a.batch, a.length, 3, generator=g, dtype=torch.float64)),
         "trans": torch.randn(a.batch, a.length, 3, generator=g, dtype=torch.float64) * 10}
    t = torch.full((a.batch,), 0.5, dtype=torch.float64)

    def call():
        return m(x, t, None, state)

    times: dict[int, list[float]] = {s: [] for s in a.sizes}
    outs = {}
    with torch.no_grad():
        state = m(x, t, None, m.init_state(a.batch, None)).state
        for rep in range(a.repeats):
            for s in a.sizes:
                net_mod.CPU_PAIR_CHUNK = s if s > 0 else 1 << 62
                out = call()
                t0 = time.perf_counter()
                for _ in range(a.calls):
                    call()
                times[s].append((time.perf_counter() - t0) / a.calls * 1000)
                if rep == 0:
                    outs[s] = out.scores["trans"]
            print(f"repeat {rep + 1}: " + "  ".join(f"{s}: {times[s][-1]:.0f} ms" for s in a.sizes), flush=True)
    ref = outs[a.sizes[0]]
    dev = {s: float((o - ref).abs().max()) for s, o in outs.items()}
    rows = []
    print(f"\n{_cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{a.model} {a.batch} x {a.length}\n")
    print("| pairs per block | median ms | min–max ms | max dev of the translation score vs the first size |")
    print("| --- | --- | --- | --- |")
    for s in a.sizes:
        v = times[s]
        rows.append({"chunk": s, "ms": v, "median_ms": statistics.median(v), "max_dev": dev[s]})
        print(f"| {s if s else 'all (unblocked)'} | {statistics.median(v):.0f} | {min(v):.0f}–{max(v):.0f} | "
              f"{dev[s]:.1e} |")
    if a.out:
        rec = {"label": a.label, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "cpu": _cpu_model(), "host": platform.node(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "mallopt": tuned, "model": a.model, "batch": a.batch,
               "length": a.length, "calls": a.calls, "rows": rows}
        data = json.loads(a.out.read_text()) if a.out.exists() else []
        data.append(rec)
        a.out.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
