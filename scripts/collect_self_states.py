"""Record a frame model's own sampled states for training on them (models/framediff/self_states.py).

    python scripts/collect_self_states.py models/checkpoints/default_strand.pt .gpu_data/pool_strand.pt \\
        --lengths 50 60 70 80 90 100 110 120 130 140 150 160 --per-length 32 --keep 8 --device cuda

Runs the checkpoint alone with ``generate_backbones``' sampler (reverse SDE, cosine grid, ``min_t`` 0.002 by
default) and writes, atomically, a pool of the network's inputs and predictions at ``t <= --t-max``. Train on it
with ``experiment.self_state_weight=W experiment.self_state_path=POOL`` (docs/training.md). ``--refine`` adds a
refined target per state (models/framediff/self_state_targets.py), which the loss then anchors to. It prints how
many states were kept, the share of them whose predicted CA trace has a clash (two CAs at ``|i - j| >= 3`` closer
than 3.0 Angstrom) and the shares of CA-CA and C-N distances in window, for the predictions and the targets. Bad
input: a message and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.framediff.adapter import FrameDiffAdapter  # noqa: E402
from models.framediff.self_states import save_pool  # noqa: E402
from models.framediff.self_state_targets import refine_targets, target_stats  # noqa: E402
from models.self_state_pool import collect_self_states  # noqa: E402
from superdiff_protein.frames.checkpoints import CheckpointError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="FrameDiff checkpoint (model.pth / default_*.pt)")
    p.add_argument("out", type=Path, help="pool file to write")
    p.add_argument("--lengths", type=int, nargs="+", default=[60, 80, 100, 120, 140, 160])
    p.add_argument("--per-length", type=int, default=16)
    p.add_argument("--keep", type=int, default=8, help="states kept per trajectory (0: all)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--time-grid", default="cosine")
    p.add_argument("--min-t", type=float, default=0.002)
    p.add_argument("--t-max", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--refine", action="store_true",
                   help="add refined targets (clashes and bonds repaired; models/framediff/self_state_targets.py)")
    p.add_argument("--refine-steps", type=int, default=300)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if (min(a.lengths) < 4 or a.per_length < 1 or a.keep < 0 or a.steps < 1 or not 0 < a.t_max <= 1
            or a.refine_steps < 1):
        print("error: lengths >= 4, --per-length >= 1, --keep >= 0, --steps >= 1, --refine-steps >= 1 and "
              "0 < --t-max <= 1",
              file=sys.stderr)
        return 2
    if not a.out.parent.is_dir():
        print(f"error: output folder {a.out.parent} does not exist", file=sys.stderr)
        return 2
    try:
        adapter = FrameDiffAdapter.from_checkpoint(a.checkpoint, device=a.device)
    except (OSError, CheckpointError) as e:
        print(f"error: {a.checkpoint}: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    pool = collect_self_states(adapter, a.lengths, a.per_length, seed=a.seed, num_steps=a.steps,
                               time_grid=a.time_grid, min_t=a.min_t, t_max=a.t_max,
                               keep_per_trajectory=a.keep or None, batch_size=a.batch_size, device=a.device,
                               progress=True)
    print(f"collected {pool['t'].shape[0]} states of {len(a.lengths) * a.per_length} trajectories, t <= {a.t_max}, "
          f"in {time.perf_counter() - t0:.1f} s")
    print("predictions:", _fmt(target_stats(pool)))
    if a.refine:
        t1 = time.perf_counter()
        pool.update(refine_targets(pool, steps=a.refine_steps, device=a.device, progress=True))
        print(f"refined targets ({time.perf_counter() - t1:.1f} s):",
              _fmt(target_stats(pool, rot_key="target_rot", trans_key="target_trans")))
        moved = ((pool["target_trans"] - pool["pred_trans"]).norm(dim=-1) * pool["mask"]).sum() / pool["mask"].sum()
        print(f"mean CA displacement of the targets: {float(moved):.3f} A")
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    save_pool(pool, a.out, meta)
    print(f"wrote {a.out}")
    return 0


def _fmt(st: dict) -> str:
    return (f"{100 * st['clashed']:.1f} % of states with a CA clash; "
            f"CA-CA in window {100 * st['ca_ca_in_window']:.1f} %, "
            f"C-N in window {100 * st['c_n_in_window']:.1f} % (states with t <= 0.1)")


if __name__ == "__main__":
    sys.exit(main())
