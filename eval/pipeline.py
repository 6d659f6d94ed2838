"""The ``evaluate_backbones`` pipeline: per-sample metrics with a resumable per-sample JSON cache, then
novelty, diversity, the grouped table, summary and plots. Entry point :func:`evaluate`.

The steps themselves are in :mod:`eval.steps` (read, structure, ProteinMPNN, ESMFold, novelty, diversity),
the checks of the configuration in :mod:`eval.config`, the samples and their cache in :mod:`eval.samples`
and the output files in :mod:`eval.report`.
"""
from __future__ import annotations

import time
from typing import Any

from omegaconf import OmegaConf

from .config import check_inputs, validate_config
from .errors import BadInputError
from .io import discover_structures
from .report import CONTRACT_COLUMNS, METRIC_COLUMNS, build_rows, write_metrics_csv, write_reports
from .samples import Sample, cache_file, group_of, log, read_samples_csv, safe_key
from .steps import EvalRun, create_out_dir, diversity_step, fold_step, mpnn_step, novelty_step, read_structures, \
    structure_step

__all__ = ["evaluate", "log", "cache_file", "validate_config", "read_samples_csv", "group_of", "write_metrics_csv",
           "CONTRACT_COLUMNS", "METRIC_COLUMNS"]


def collect_samples(cfg: Any) -> EvalRun:
    """Check the configuration (:func:`eval.config.check_inputs`), find the structure files under samples_dir
    (the output directory excluded) and match them to their ``samples.csv`` rows. Nothing is written."""
    samples_dir, device, out_dir = check_inputs(cfg)
    files = discover_structures(samples_dir, exclude=[out_dir])
    if not files:
        raise BadInputError(f"no structure files (*.pdb, *.cif, also .gz) found under {str(samples_dir)!r}")
    meta = read_samples_csv(samples_dir)
    samples: list[Sample] = []
    for p in files:
        rel = p.relative_to(samples_dir).as_posix()
        samples.append(Sample(path=p, rel=rel, key=safe_key(rel), meta=meta.get(str(p.resolve()), {})))
    return EvalRun(cfg=cfg, samples_dir=samples_dir, out_dir=out_dir, device=device, samples=samples,
                   progress=bool(cfg.get("progress", True)), resume=bool(cfg.get("resume", True)))


def evaluate(cfg: Any, mpnn_model: Any = None, fold_model: Any = None) -> dict:
    """Run the evaluation described by ``cfg`` (the Hydra config, or any attribute/dict-like object with the
    same keys). ``mpnn_model`` / ``fold_model`` override model loading (tests). Returns the summary dict.

    Bad input (:class:`~eval.errors.BadInputError`) is raised before anything is written: every check, then
    every structure file is read (:func:`eval.steps.read_structures`); only then is ``out_dir`` created."""
    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.create(cfg)
    t_start = time.time()
    run = collect_samples(cfg)
    read_structures(run)
    create_out_dir(run)
    structure_step(run)
    mpnn_step(run, mpnn_model)
    fold_step(run, fold_model)
    novelty_step(run)
    div_all, group_div = diversity_step(run)
    rows = build_rows(run.samples, div_all)
    return write_reports(rows, run.out_dir, cfg, div_all, group_div, run.status,
                         elapsed=time.time() - t_start, n_files=len(run.samples))
