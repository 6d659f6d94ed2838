"""Training throughput of ``train_frame_model`` on the GPU: residues/s and steps/s per configuration.

Each *round* starts one training process per named configuration at the same time (``name@gpu:overrides``),
lets each run for ``--minutes`` (``max_minutes``, start-up included) and reads its ``metrics.csv``. The first
``--skip`` rows (start-up, lazily built tables) are dropped; the median and spread of ``residues_per_s`` over the
remaining rows are reported with steps/s from the step and ``train_min`` columns. Two processes on one GPU is how
the default models are trained (scripts/train_defaults.sh), so rounds usually pair them.

    python bench/bench_training.py --minutes 1.6 --data .gpu_data/pdownb.pt \\
        --round "small-a@0:model=small data.subset=helix" "small-b@0:model=small data.subset=strand" \\
        --round "bf16-a@0:model=medium trainer.precision=bf16-mixed data.subset=helix" ... \\
        --out $OUT/bench_training.json

With ``trainer.compile=true`` the first steps compile the network (about two minutes on an H200 for
``model=small``): give such rounds ``--minutes 6`` or more. Each record has ``first_row_train_min``, the training
minutes at the first metrics row, which holds the start-up and the compiling.

Every configuration starts from the recipe of scripts/train_defaults.sh (batch 64, crops of 160, TF32). The
results go to ``--out`` (JSON) and a markdown table on stdout. Not a test: nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ["model=small", "seed=0", "data.max_length=160", "data.batch_size=64", "data.num_workers=4",
          "max_steps=200000", "experiment.learning_rate=0.0003", "experiment.warmup_steps=300",
          "experiment.ema_decay=0.999", "experiment.grad_clip=1.0", "experiment.log_every=25",
          "experiment.eval_every=0", "experiment.ckpt_every_steps=1000000", "experiment.ckpt_every_minutes=1000",
          "trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=32-true", "trainer.tf32=true",
          "trainer.tensorboard=false"]


def _merge(base: list[str], extra: list[str]) -> list[str]:
    keys = {kv.split("=", 1)[0] for kv in extra}
    return [kv for kv in base if kv.split("=", 1)[0] not in keys] + extra


def _summary(metrics: Path, skip: int) -> dict:
    from models.framediff.metrics import read_metrics

    rows = [r for r in read_metrics(metrics) if r.get("residues_per_s") not in (None, "")]
    kept = rows[skip:]
    # the first row's time includes start-up and, with trainer.compile, the compiling of the network
    first = {"first_row_step": int(float(rows[0]["step"])), "first_row_train_min": float(rows[0]["train_min"])} \
        if rows else {}
    if len(kept) < 2:
        return {"rows": len(rows), **first, "last_step": int(float(rows[-1]["step"])) if rows else 0,
                "error": "too few metrics rows (raise --minutes)"}
    rps = [float(r["residues_per_s"]) for r in kept]
    cps = [float(r["chains_per_s"]) for r in kept]
    dstep = float(kept[-1]["step"]) - float(kept[0]["step"])
    dmin = float(kept[-1]["train_min"]) - float(kept[0]["train_min"])
    return {"rows": len(rows), **first, "rows_used": len(kept), "residues_per_s_median": statistics.median(rps),
            "residues_per_s_min": min(rps), "residues_per_s_max": max(rps),
            "chains_per_s_median": statistics.median(cps),
            "steps_per_s": dstep / (60 * dmin) if dmin > 0 else None, "last_step": int(float(rows[-1]["step"]))}


def run_round(specs: list[str], minutes: float, data: str, skip: int, work: Path) -> list[dict]:
    """Start every ``name@gpu:overrides`` at once; wait; summarise each."""
    procs = []
    for spec in specs:
        head, _, over = spec.partition(":")
        name, _, gpu = head.partition("@")
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        args = _merge(RECIPE, [f"data.path={data}", f"out_dir={out}", f"max_minutes={minutes}", "overwrite=true",
                               *over.split()])
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if gpu:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "train.log", "w")
        p = subprocess.Popen([sys.executable, "-m", "superdiff_protein.cli.train", *args], cwd=ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT)
        procs.append((name, gpu, over, args, out, p, log))
    res = []
    for name, gpu, over, args, out, p, log in procs:
        rc = p.wait()
        log.close()
        rec = {"name": name, "gpu": gpu, "overrides": over, "rc": rc, "minutes": minutes}
        if (out / "metrics.csv").is_file():
            rec.update(_summary(out / "metrics.csv", skip))
        if rc != 0 or "error" in rec:
            rec["log_tail"] = (out / "train.log").read_text(errors="replace").splitlines()[-8:]
        res.append(rec)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--round", nargs="+", action="append", required=True, metavar="NAME@GPU:OVERRIDES")
    ap.add_argument("--minutes", type=float, default=1.6)
    ap.add_argument("--skip", type=int, default=2, help="metrics rows dropped at the start of each run")
    ap.add_argument("--data", default=".gpu_data/pdownb.pt")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()
    records = []
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        for i, specs in enumerate(a.round):
            t0 = time.time()
            for r in run_round(specs, a.minutes, a.data, a.skip, Path(tmp)):
                r.update(round=i, device=dev, torch=torch.__version__, gpus=torch.cuda.device_count(),
                         date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         round_wall_s=round(time.time() - t0, 1))
                records.append(r)
                print(json.dumps(r), flush=True)
    print("\n| round | name | gpu | overrides | residues/s median (min–max) | steps/s | rows |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        if "residues_per_s_median" in r:
            print(f"| {r['round']} | {r['name']} | {r['gpu']} | `{r['overrides']}` | {r['residues_per_s_median']:,.0f} "
                  f"({r['residues_per_s_min']:,.0f}–{r['residues_per_s_max']:,.0f}) | {r['steps_per_s']:.2f} | "
                  f"{r['rows_used']} |")
        else:
            print(f"| {r['round']} | {r['name']} | {r['gpu']} | `{r['overrides']}` | failed (rc {r['rc']}) | | |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
