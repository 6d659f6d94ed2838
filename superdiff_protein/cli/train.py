"""``train_frame_model``: the command line of FrameDiff-architecture training (``docs/training.md``).

Composes ``configs/train_frame_model.yaml`` (+ the ``model`` group ``configs/model/*.yaml``) and the
``key=value`` overrides with Hydra's compose API (``superdiff_protein.cli.common.compose_config``), checks every value (no side effects), checks ``out_dir``, then
calls the training code, which lives next to the network in ``models/framediff/``:

* ``losses.py``: FrameDiff's loss (and our optional CA clash loss);
* ``training.py``: the LightningModule (network + EMA, loss of a batch, logging, evaluation);
* ``datamodule.py``: the LightningDataModule (infinite step-indexed, length-bucketed batches);
* ``fit.py``: the Trainer, resume, the save-and-budget callback;
* ``checkpointing.py``: the official ``model.pth`` container, safe reading of ``last.ckpt``;
* ``metrics.py``: ``metrics.csv`` and ``loss_curve.png``.

Subcommands: ``export CKPT OUT [ema|raw]``, ``plot OUT_DIR``, ``bench [overrides]``, ``--cfg [overrides]``.
Errors print one line and exit with code 2 before anything is written (``superdiff_protein.cli.common``: the
shared wrapper ``run_command``).
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from models.framediff.checkpointing import export_from_lightning_checkpoint
from models.framediff.fit import bench_forward, fit
from models.framediff.metrics import plot_metrics
from models.framediff.training import TrainError

# moved to models.framediff; re-exported here for one release (import them from there)
from models.framediff.checkpointing import export_official_checkpoint, official_conf  # noqa: F401
from models.framediff.datamodule import FrameDataModule, StepIndexedBatchSampler  # noqa: F401
from models.framediff.losses import ca_clash_loss, framediff_loss  # noqa: F401
from models.framediff.training import FrameDiffusionModule  # noqa: F401

from .common import check_out_dir, compose_config as _compose_config, run_command

__all__ = ["TrainError", "compose_config", "finalize_config", "train", "main",
           # moved to models.framediff (re-exported here for one release)
           "framediff_loss", "ca_clash_loss", "StepIndexedBatchSampler", "FrameDataModule", "FrameDiffusionModule",
           "official_conf", "export_official_checkpoint", "export_from_lightning_checkpoint", "plot_metrics"]

_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
_CONFIG_NAME = "train_frame_model"
_PROCESS_START = time.time()


# ============================================================================ configuration
def _compose(overrides: Sequence[str], cdir: Path) -> dict:
    """Hydra's composition of the primary config, its defaults list and ``overrides``, as a plain dict."""
    return _compose_config(_CONFIG_NAME, overrides, config_dir=cdir, error=TrainError, as_dict=True)


def compose_config(overrides: Sequence[str] = (), config_dir: str | os.PathLike | None = None) -> dict:
    """The training config as a plain dict: yaml defaults + ``key=value`` overrides (Hydra's grammar: group
    selection ``model=tiny``, ``+key=value`` for a new key), checked and with derived values filled in.

    Raises :class:`TrainError` (one readable line) for an unknown key or group, a value of the wrong kind or
    out of range. Reads the config files only: no side effects.
    """
    cdir = Path(config_dir) if config_dir is not None else _CONFIG_DIR
    if not (cdir / f"{_CONFIG_NAME}.yaml").is_file():
        raise TrainError(f"config {cdir / (_CONFIG_NAME + '.yaml')} not found")
    cfg = _compose(overrides, cdir)
    return finalize_config(_check_types(cfg, _compose([], cdir)))


# numbers that may also be null (documented as "null = off")
_NULLABLE = {"experiment.grad_clip", "experiment.ema_decay"}
# values of other types by design (Lightning accepts "auto", lists, strings)
_ANY_TYPE = {"trainer.devices", "trainer.tensorboard", "trainer.precision", "trainer.accelerator"}


def _check_types(cfg: dict, base: Mapping[str, Any]) -> dict:
    """Refuse a value whose type does not fit the default's in ``base`` (a word where a number belongs, a fraction
    for a count, NaN or infinity), naming the key. Keys whose default is null are checked by :func:`finalize_config`."""

    def walk(node: Any, ref: Any, path: str) -> None:
        if isinstance(ref, Mapping) and isinstance(node, Mapping):
            for k, v in node.items():
                if k in ref:
                    walk(v, ref[k], f"{path}.{k}" if path else str(k))
            return
        if path in _ANY_TYPE or ref is None:
            return
        if node is None and path in _NULLABLE:
            return
        if isinstance(ref, bool):
            if not isinstance(node, bool):
                raise TrainError(f"{path} must be true or false, got {node!r}")
        elif isinstance(ref, (int, float)):
            if isinstance(node, bool) or not isinstance(node, (int, float)):
                raise TrainError(f"{path} must be a number, got {node!r}")
            if not math.isfinite(node):
                raise TrainError(f"{path} must be a finite number, got {node!r}")
            if isinstance(ref, int) and node != int(node):
                raise TrainError(f"{path} must be an integer, got {node!r}")
        elif isinstance(ref, str) and not isinstance(node, str):
            raise TrainError(f"{path} must be a text, got {node!r}")

    walk(cfg, base, "")
    return cfg


def finalize_config(cfg: dict) -> dict:
    """Fill derived values (official interpolations) and validate; returns a new dict."""
    try:
        return _finalize_config(cfg)
    except (TypeError, ValueError, KeyError) as e:   # a value of the wrong kind that _check_types cannot see
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise TrainError(f"invalid config value ({what})") from None


def _finalize_config(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    m = cfg.setdefault("model", {})
    ipa = m.setdefault("ipa", {})
    ipa["c_s"] = int(m.get("node_embed_size", 256))
    ipa["c_z"] = int(m.get("edge_embed_size", 128))
    ipa["coordinate_scaling"] = float(cfg["diffuser"]["r3"]["coordinate_scaling"])
    cfg["experiment"]["coordinate_scaling"] = ipa["coordinate_scaling"]
    d, e = cfg["data"], cfg["experiment"]
    if d.get("subset") not in (None, "helix", "strand") and not isinstance(d.get("subset"), list):
        raise TrainError(f"data.subset must be null, helix, strand or a list of indices, got {d.get('subset')!r}")
    if d.get("seq_idx") not in ("file", "consecutive"):
        raise TrainError(f"data.seq_idx must be 'file' or 'consecutive', got {d.get('seq_idx')!r}")
    if not 0.0 <= float(d["min_t"]) < 1.0:
        raise TrainError("data.min_t must lie in [0, 1)")
    if not 0.0 <= float(d.get("low_t_frac", 0.0)) <= 1.0:
        raise TrainError("data.low_t_frac must lie in [0, 1]")
    if float(d.get("low_t_frac", 0.0)) > 0 and not float(d["min_t"]) < float(d.get("low_t_max", 0.1)) <= 1.0:
        raise TrainError("data.low_t_max must lie in (data.min_t, 1] when data.low_t_frac > 0")
    if e.get("small_t_weight_cap") is not None and not float(e["small_t_weight_cap"]) >= 1.0:
        raise TrainError("experiment.small_t_weight_cap must be null or >= 1")
    if int(d["batch_size"]) < 1:
        raise TrainError("data.batch_size must be >= 1")
    if e["lr_schedule"] not in ("constant", "cosine"):
        raise TrainError(f"experiment.lr_schedule must be constant or cosine, got {e['lr_schedule']!r}")
    if e["export_weights"] not in ("ema", "raw"):
        raise TrainError("experiment.export_weights must be ema or raw")
    if e.get("ema_decay") is not None and not 0.0 < float(e["ema_decay"]) < 1.0:
        raise TrainError("experiment.ema_decay must be in (0, 1) or null")
    if e["export_weights"] == "ema" and e.get("ema_decay") is None:
        raise TrainError("experiment.export_weights=ema needs experiment.ema_decay")
    if float(e.get("clash_loss_weight") or 0.0) < 0 or float(e.get("clash_dist", 3.8)) <= 0:
        raise TrainError("experiment.clash_loss_weight must be >= 0 and experiment.clash_dist > 0")
    if float(e.get("bond_loss_weight") or 0.0) < 0 or not 0.0 <= float(e.get("bond_loss_t_filter", 0.1)) <= 1.0:
        raise TrainError("experiment.bond_loss_weight must be >= 0 and experiment.bond_loss_t_filter in [0, 1]")
    if min(float(e.get(k) or 0.0) for k in ("self_state_weight", "self_state_clash_weight",
                                             "self_state_bond_weight", "self_state_rg_weight",
                                             "self_state_rg_margin")) < 0:
        raise TrainError("experiment.self_state_weight, self_state_clash_weight, self_state_bond_weight, "
                         "self_state_rg_weight and self_state_rg_margin must be >= 0")
    ref = e.get("self_state_rg_ref")     # configs/train_frame_model.yaml defines it
    try:
        ok = ref is None or (len(ref) == 2 and float(ref[0]) > 0 and float(ref[1]) > 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise TrainError(f"experiment.self_state_rg_ref must be two positive numbers [a, b] (Rg = a n^b); got {ref!r}")
    if float(e.get("self_state_weight") or 0.0) > 0:
        if not e.get("self_state_path") or not Path(str(e["self_state_path"])).is_file():
            raise TrainError(f"experiment.self_state_weight > 0 needs experiment.self_state_path, a pool file written "
                             f"by scripts/collect_self_states.py; got {e.get('self_state_path')!r}")
        if int(e.get("self_state_batch") or 0) < 1:
            raise TrainError("experiment.self_state_batch must be >= 1")
    if int(cfg["max_steps"]) < 1:
        raise TrainError("max_steps must be >= 1")
    if cfg.get("max_minutes") is not None and float(cfg["max_minutes"]) <= 0:
        raise TrainError("max_minutes must be > 0 or null")
    if not float(e["learning_rate"]) > 0:
        raise TrainError(f"experiment.learning_rate must be > 0, got {e['learning_rate']!r}")
    if float(e.get("weight_decay") or 0.0) < 0:
        raise TrainError("experiment.weight_decay must be >= 0")
    if e.get("grad_clip") is not None and not float(e["grad_clip"]) > 0:
        raise TrainError("experiment.grad_clip must be > 0 or null")
    if not 0.0 <= float(e.get("self_condition_prob", 0.5)) <= 1.0:
        raise TrainError("experiment.self_condition_prob must lie in [0, 1]")
    if int(e.get("warmup_steps") or 0) < 0 or int(e.get("log_every", 1)) < 1:
        raise TrainError("experiment.warmup_steps must be >= 0 and experiment.log_every >= 1")
    if d.get("crop", "random") not in ("random", "first", "center"):
        raise TrainError(f"data.crop must be random, first or center, got {d.get('crop')!r}")
    if int(d.get("max_length", 1)) < 1 or int(d.get("num_workers") or 0) < 0:
        raise TrainError("data.max_length must be >= 1 and data.num_workers >= 0")
    return cfg


# ============================================================================ run
def train(cfg: dict, start_time: Optional[float] = None) -> dict:
    """Run (or resume) a training job described by a composed config; returns a summary dict.

    Checks ``out_dir`` (exists as a directory or can be created), then :func:`models.framediff.fit.fit`, which
    checks the rest before writing. ``max_minutes`` counts from ``start_time`` (default: now; the CLI passes the
    process start).
    """
    out = check_out_dir(cfg["out_dir"], "out_dir", TrainError)
    return fit(cfg, out, start_time=start_time)


_USAGE = """usage:
  train_frame_model [key=value ...]                 train / resume (configs/train_frame_model.yaml)
  python -m superdiff_protein.cli.train [key=value ...]  the same
  train_frame_model export CKPT OUT [ema|raw]        last.ckpt -> official model.pth
  train_frame_model plot OUT_DIR                     metrics.csv -> loss_curve.png
  train_frame_model --cfg [key=value ...]            print the composed config
  train_frame_model bench [key=value ...]            CPU forward time of the architecture (10 x 100 residues)
e.g. train_frame_model data.subset=helix out_dir=runs/helix max_steps=4000 resume=true
"""


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point ``train_frame_model`` (also ``python -m superdiff_protein.cli.train``).

    Exit codes (``superdiff_protein.cli.common``): 0 done, 1 unexpected failure, 2 bad input (one line on stderr,
    nothing written), 130 interrupted.
    """
    from .runtime import tune_malloc

    tune_malloc()  # CPU training allocates the same (B, N, N, C) edge tensors each step (docs/benchmarks.md)

    def export(args: list[str]) -> None:
        if len(args) not in (2, 3):
            raise TrainError("export needs CKPT OUT [ema|raw]")
        p = export_from_lightning_checkpoint(args[0], args[1], args[2] if len(args) == 3 else None)
        print(f"wrote {p}")

    def plot(args: list[str]) -> None:
        if len(args) != 1:
            raise TrainError("plot needs OUT_DIR")
        d = Path(args[0])
        ok = plot_metrics(d / "metrics.csv", d / "loss_curve.png")
        print(f"wrote {d / 'loss_curve.png'}" if ok else "nothing to plot (no metrics.csv or no matplotlib)")

    def run(args: list[str]) -> None:
        if args and args[0] == "bench":
            r = bench_forward(compose_config(args[1:]))
            print(f"params {r['params']:,} | model.pth ~{r['model_pth_mib']:.1f} MiB | last.ckpt ~{r['last_ckpt_mib']:.1f} MiB"
                  f" | forward {r['batch']}x{r['length']} on {r['threads']} threads: median {r['forward_s_median']:.3f} s,"
                  f" min {r['forward_s_min']:.3f} s")
            return
        show = bool(args) and args[0] == "--cfg"
        cfg = compose_config(args[1:] if show else args)
        if show:
            print(yaml.safe_dump(cfg, sort_keys=False))
            return
        s = train(cfg, start_time=_PROCESS_START)
        why = "max_steps reached" if s["done"] else ("time budget (max_minutes) reached" if s["stopped_for_time"]
                                                     else "stopped")
        print(f"train_frame_model: steps {s['start_step']} -> {s['step']} in {s['seconds']:.0f} s ({why}); "
              f"outputs in {s['out_dir']}")

    code = run_command("train_frame_model", run, argv=argv, usage=_USAGE, subcommands={"export": export, "plot": plot},
                       flags=("--cfg",), error=TrainError,
                       interrupted="interrupted (resume with resume=true from the last saved checkpoint)")
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
