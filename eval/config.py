"""Checks of the ``evaluate_backbones`` configuration, all before any work: value ranges and types
(:func:`validate_config`), the device, the output directory and the user-given files (:func:`check_inputs`).
Each refusal is one :class:`~eval.errors.BadInputError` line (exit code 2, nothing written)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from superdiff_protein.runs.checks import check_out_dir, resolve_device
from superdiff_protein.runs.safe_load import CheckpointError, safe_load

from .errors import BadInputError
from .fold import PRECISIONS
from .sc_results import SC_RESULTS_MODES, sc_results_mode

__all__ = ["validate_config", "resolve_eval_device", "check_inputs"]

_BOOL_KEYS = ("resume", "progress", "plots", "mpnn.enabled", "mpnn.ca_only", "fold.save_refolds", "fold.compile",
              "novelty.refold", "diversity.enabled")
#: key: (lowest, highest, null allowed)
_INT_KEYS = {"workers": (0, 4096, False), "seed": (0, 2**63 - 1, False), "mpnn.num_seqs": (1, 100_000, False),
             "mpnn.batch_size": (1, 100_000, False), "fold.batch_size": (1, 100_000, False),
             "fold.num_recycles": (0, 1000, True), "fold.chunk_size": (1, 1_000_000, True),
             "novelty.top_k": (1, 10**9, True), "diversity.max_samples": (0, 10**9, True)}
_CLUSTER_METHODS = ("greedy", "single", "average", "complete")


def _get(cfg: Any, dotted: str, default: Any) -> Any:
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError, IndexError):
            return default
    return node


def validate_config(cfg: Any) -> None:
    """Refuse out-of-range or mistyped options with one line (:class:`BadInputError`) before any work.
    Keys absent from ``cfg`` are not checked (the Python API may pass a partial config)."""
    missing = object()
    for k in _BOOL_KEYS:
        v = _get(cfg, k, missing)
        if v is not missing and not isinstance(v, bool):
            raise BadInputError(f"{k} must be true or false, got {v!r}")
    for k, (lo, hi, none_ok) in _INT_KEYS.items():
        v = _get(cfg, k, missing)
        if v is missing or (v is None and none_ok):
            continue
        ok = (isinstance(v, (int, np.integer)) and not isinstance(v, bool)) or (
            isinstance(v, float) and math.isfinite(v) and v == int(v))
        if not ok or not lo <= int(v) <= hi:
            what = " (0 = all cores)" if k == "workers" else ""
            raise BadInputError(f"{k} must be an integer in [{lo}, {hi}]{' or null' if none_ok else ''}{what}, "
                                f"got {v!r}")
    for k, hi in (("mpnn.temperature", math.inf), ("fold.designable_rmsd", math.inf),
                  ("diversity.cluster_tm_threshold", 1.0)):
        v = _get(cfg, k, missing)
        if v is missing:
            continue
        try:
            f = math.nan if isinstance(v, bool) else float(v)
        except (TypeError, ValueError):
            f = math.nan
        if not (math.isfinite(f) and 0.0 < f <= hi):
            rng = "in (0, 1]" if hi == 1.0 else "> 0"
            raise BadInputError(f"{k} must be a finite number {rng}, got {v!r}")
    v = _get(cfg, "sc_results", missing)
    if v is not missing and sc_results_mode(v) not in SC_RESULTS_MODES:
        raise BadInputError(f"sc_results must be one of {', '.join(SC_RESULTS_MODES)}, got {v!r}")
    v = _get(cfg, "fold.precision", missing)
    if v is not missing and not (isinstance(v, str) and v.lower() in PRECISIONS):
        raise BadInputError(f"fold.precision must be one of {', '.join(PRECISIONS)} (ESMFold trunk arithmetic; "
                            f"bf16 on CPU runs as CPU autocast, tf32 on CPU is plain fp32), got {v!r}")
    m = _get(cfg, "diversity.cluster_method", missing)
    if m is not missing and m not in _CLUSTER_METHODS:
        raise BadInputError(f"diversity.cluster_method must be one of {', '.join(_CLUSTER_METHODS)}, got {m!r}")
    w = _get(cfg, "mpnn.weights", None)
    if w not in (None, ""):
        wp = Path(str(w)).expanduser()
        if not wp.is_file():
            raise BadInputError(f"mpnn.weights {str(w)!r} is not a file"
                                f"{' (it is a directory)' if wp.is_dir() else ' (does it exist?)'}")


def resolve_eval_device(spec: str) -> str:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N``; CUDA requested but absent is bad input."""
    return str(resolve_device(spec, "device", BadInputError))


def check_inputs(cfg: Any) -> tuple[Path, str, Path]:
    """Every check on the configuration, in order, before anything is read or written: samples_dir, the
    option values, the device, out_dir, the reference and a user-given ProteinMPNN weights file (read with
    the allow-listed loader). Returns ``(samples_dir, device, out_dir)``."""
    if cfg.get("samples_dir") in (None, "", "???"):
        raise BadInputError("samples_dir is required: evaluate_backbones samples_dir=/path/to/backbones")
    samples_dir = Path(str(cfg.samples_dir)).expanduser()
    if not samples_dir.is_dir():
        raise BadInputError(f"samples_dir {str(samples_dir)!r} is not a directory (does it exist?)")
    validate_config(cfg)
    device = resolve_eval_device(cfg.get("device", "auto"))
    out_dir = check_out_dir(cfg.out_dir if cfg.get("out_dir") else samples_dir / "eval", "out_dir", BadInputError)
    reference = cfg.get("reference")
    if reference and not Path(str(reference)).expanduser().exists():
        raise BadInputError(f"reference {str(reference)!r} does not exist (a directory or tar archive of "
                            "PDB/mmCIF files, or a prepared .npz from `python -m eval.reference`)")
    weights = cfg.get("mpnn", {}).get("weights")
    if weights and cfg.mpnn.get("enabled", True):  # a user-given file is vetted before any work (exit 2)
        try:
            safe_load(str(weights), "cpu")
        except CheckpointError as exc:
            raise BadInputError(f"mpnn.weights: {exc}") from exc
    return samples_dir, device, out_dir
