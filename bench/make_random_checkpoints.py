"""Write random paper-size FrameDiff checkpoints in the official container (for GPU benchmarks).

    python bench/make_random_checkpoints.py OUT_DIR [--count 2]

The zero-initialised "final" layers get small random values, so the networks' outputs depend on
their trunks and two files give genuinely different models.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.framediff import FrameDiffConfig, FrameDiffScoreNetwork  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--count", type=int, default=2)
    a = p.parse_args()
    from omegaconf import OmegaConf

    a.out_dir.mkdir(parents=True, exist_ok=True)
    cfg = FrameDiffConfig()
    for i in range(a.count):
        torch.manual_seed(100 + i)
        net = FrameDiffScoreNetwork(cfg)
        g = torch.Generator().manual_seed(200 + i)
        with torch.no_grad():
            for prm in net.parameters():
                if prm.dim() >= 2 and not prm.any():
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.02)
        conf = OmegaConf.create({"model": cfg.to_dict(), "diffuser": {}, "data": {"min_t": 0.01}})
        path = a.out_dir / f"random_framediff_{i}.pth"
        torch.save({"model": net.state_dict(), "conf": conf, "optimizer": {}, "epoch": 0, "step": 0}, path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
