"""``prepare_dataset`` command line (Hydra, ``configs/prepare_dataset.yaml``): builds a dataset file with
:func:`superdiff_protein.frames.data.prepare_dataset`."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from ..frames.data import DatasetError, PrepareConfig, prepare_dataset
from .common import run_hydra

__all__ = ["main"]

_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _run_from_cfg(cfg) -> None:
    from omegaconf import OmegaConf

    opts = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    opts = {k: v for k, v in opts.items() if k != "hydra"}
    unknown = set(opts) - set(PrepareConfig.__dataclass_fields__)
    if unknown:
        raise DatasetError(f"unknown config key(s) {sorted(unknown)}")
    input_dir, output = opts.pop("input_dir", None), opts.pop("output", None)
    summary = prepare_dataset(input_dir or "", output or "", **opts)
    print(summary.text())


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``prepare_dataset`` (Hydra: ``prepare_dataset input_dir=... output=...``).

    Exit codes (``superdiff_protein.cli.common``): 0 done, 1 unexpected failure, 2 bad input (one line on stderr,
    nothing written), 130 interrupted.
    """
    sys.exit(run_hydra("prepare_dataset", "prepare_dataset", _run_from_cfg, argv=argv, node=PrepareConfig,
                       interrupted="interrupted; nothing written"))


if __name__ == "__main__":
    main()
