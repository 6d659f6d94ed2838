"""Time the backbone refinement: one chain at a time (``refine_backbone``) against one batched call
(``refine_backbones``) on the main job's 10 unrefined backbones of length 100.

Inputs: the README's main job (``generate_backbones``, default models, 10 x L100, refine off) is run once into a
temporary directory (or ``--pdb-dir`` names an existing run), and each written PDB is read back into frames
(``frames_from_backbone``) and psi: exactly what ``refine=true`` would refine, up to the PDB's 3 decimals. These
need real work (the models' C-N links are off, and some have clashes).

    python bench/bench_refine.py --repeats 5 --out bench/results/refine_batched_cpu.json

Sequential and batched runs alternate; each repeat refines all 10 chains. The script checks that both give the
same frames (the batched refinement is bitwise batch-independent) and prints the median and min-max of each, the
host's CPU model, the date and the load average (the host may be shared).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.io import read_backbone  # noqa: E402
from superdiff_protein.frames.geometry import frames_from_backbone, psi_from_backbone  # noqa: E402
from superdiff_protein.frames.refine import refine_backbone, refine_backbones  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


def load_chains(pdb_dir: Path) -> list[tuple]:
    chains = []
    for p in sorted(pdb_dir.glob("sample_*.pdb"), key=lambda q: int(q.stem.split("_")[1])):
        a = torch.tensor(read_backbone(p).atoms, dtype=torch.float64)
        R, T = frames_from_backbone(a[:, 0], a[:, 1], a[:, 2])
        chains.append((R, T, psi_from_backbone(a[:, 0], a[:, 1], a[:, 2], a[:, 3])))
    return chains


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pdb-dir", type=Path, default=None, help="length_100 folder of an unrefined run")
    ap.add_argument("--out", type=Path, default=None, help="append the record to this JSON list")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_refine_") as tmp:
        pdb_dir = args.pdb_dir
        if pdb_dir is None:
            subprocess.run([sys.executable, "-m", "superdiff_protein.cli.generate", f"out_dir={tmp}/job",
                            "progress=false", "plots=false"], cwd=ROOT, check=True, capture_output=True)
            pdb_dir = Path(tmp) / "job" / "length_100"
        chains = load_chains(pdb_dir)
    assert chains, f"no sample_*.pdb in {pdb_dir}"
    seq_t, bat_t = [], []
    for _ in range(args.repeats):
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        seq = [refine_backbone(*c) for c in chains]
        seq_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bat = refine_backbones(chains)
        bat_t.append(time.perf_counter() - t0)
        assert all(torch.equal(a.trans, b.trans) and a.iters == b.iters for a, b in zip(seq, bat))
        print(f"load {load:.2f}: sequential {seq_t[-1]:.2f} s, batched {bat_t[-1]:.2f} s", flush=True)
    rec = {
        "what": f"refine {len(chains)} chains of length {chains[0][1].shape[0]}: sequential vs batched",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
        "evaluations": [r.iters for r in bat], "converged": sum(r.converged for r in bat),
        "sequential_s": seq_t, "batched_s": bat_t,
        "sequential_median_s": statistics.median(seq_t), "batched_median_s": statistics.median(bat_t),
        "load_avg_1min_end": os.getloadavg()[0],
    }
    print(f"{rec['cpu']}, {rec['cores']} cores, torch {rec['torch']}, {rec['date']}: {args.repeats} repeats; "
          f"evaluations per chain {min(rec['evaluations'])}-{max(rec['evaluations'])}, "
          f"{rec['converged']}/{len(chains)} converged")
    print(f"sequential: median {rec['sequential_median_s']:.2f} s ({min(seq_t):.2f}-{max(seq_t):.2f})")
    print(f"batched:    median {rec['batched_median_s']:.2f} s ({min(bat_t):.2f}-{max(bat_t):.2f}); "
          f"speed-up {rec['sequential_median_s'] / rec['batched_median_s']:.1f}x")
    if args.out is not None:
        old = json.loads(args.out.read_text()) if args.out.is_file() else []
        args.out.write_text(json.dumps(old + [rec], indent=1) + "\n")


if __name__ == "__main__":
    main()
