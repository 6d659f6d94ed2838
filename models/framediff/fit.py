"""Running FrameDiff training: the Lightning Trainer, its save-and-budget callback, resume, ``config.yaml``.

:func:`fit` checks everything that can be refused (resume state, accelerator, dataset, Trainer options) before it
writes the first file, then trains (or resumes) until ``max_steps`` or the ``max_minutes`` budget. The command
line ``train_frame_model`` (``superdiff_protein/cli/train.py``) composes and validates the config and checks
``out_dir`` first. Output directory and recipe: ``docs/training.md``.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import yaml

from superdiff_protein.errors import UserError
from superdiff_protein.frames.geometry import so3_exp

from .adapter import FrameDiffAdapter
from .config import FrameDiffConfig
from .checkpointing import SafeCheckpointIO, export_official_checkpoint, read_lightning_checkpoint
from .datamodule import FrameDataModule
from .metrics import plot_metrics, truncate_metrics
from .training import FrameDiffusionModule, TrainError, build_network

__all__ = ["SaveAndBudget", "resume_state", "init_weights", "fit", "bench_forward"]


class SaveAndBudget(pl.Callback):
    """Periodic ``last.ckpt`` + ``model.pth``, and a clean stop before ``max_minutes``."""

    def __init__(self, cfg: dict, out_dir: Path, start_time: float):
        self.cfg, self.out, self.start_time = cfg, out_dir, start_time
        self.last_save = time.time()
        self.step_times: list[float] = []
        self._t_prev: Optional[float] = None
        self.save_seconds = 5.0
        self.stopped_for_time = False

    def save(self, trainer, module) -> None:
        t0 = time.time()
        tmp = self.out / f".last.ckpt.{os.getpid()}.tmp"
        trainer.save_checkpoint(tmp, weights_only=False)   # full state (resume); explicit: no log line
        if trainer.is_global_zero:
            os.replace(tmp, self.out / "last.ckpt")
            which = self.cfg["experiment"]["export_weights"]
            net = module.ema if which == "ema" else module.model
            export_official_checkpoint(net.state_dict(), self.cfg, self.out / "model.pth",
                                       step=int(trainer.global_step), epoch=module._data_epoch(int(trainer.global_step)))
        self.last_save = time.time()
        self.save_seconds = max(self.save_seconds * 0.5, time.time() - t0)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now = time.time()
        if self._t_prev is not None:
            self.step_times.append(now - self._t_prev)
            self.step_times = self.step_times[-50:]
        self._t_prev = now
        exp = self.cfg["experiment"]
        step = int(trainer.global_step)
        if step % int(exp["ckpt_every_steps"]) == 0 or now - self.last_save > 60 * float(exp["ckpt_every_minutes"]):
            self.save(trainer, module)
        mm = self.cfg.get("max_minutes")
        if mm is not None:
            # the fastest of the last few steps: compiling (trainer.compile: about a minute for each of the first
            # two steps) and checkpoint saves are slow outliers that would otherwise stop a short chunk early
            per_step = float(min(self.step_times[-5:])) if self.step_times else 1.0
            margin = 3 * per_step + 2 * self.save_seconds + 10.0
            if now - self.start_time + margin > 60 * float(mm):
                self.stopped_for_time = True
                trainer.should_stop = True

    def on_train_end(self, trainer, module) -> None:
        if module._acc:
            module._write_row(int(trainer.global_step))
        self.save(trainer, module)
        if trainer.is_global_zero:
            plot_metrics(self.out / "metrics.csv", self.out / "loss_curve.png")


def _drop_advert(record: Any) -> bool:
    return "litlogger" not in str(record.msg).lower()


def _quiet_lightning() -> None:
    """Drop Lightning's advertisement for its cloud logger (an info line a user cannot act on)."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if _drop_advert not in lg.filters:
            lg.addFilter(_drop_advert)


def _dump_yaml(cfg: Mapping[str, Any], path: Path) -> None:
    """``config.yaml``, written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


def resume_state(cfg: Mapping[str, Any], out: Path) -> Optional[dict]:
    """The checkpoint to resume from (``out/last.ckpt`` read safely) when ``resume=true``, else None.

    Refuses to clobber an existing run without ``resume``/``overwrite``, a checkpoint the safe loader refuses,
    and one whose ``model`` or ``diffuser`` section differs from ``cfg``'s.
    """
    last = out / "last.ckpt"
    if not last.is_file():
        return None
    if not cfg.get("resume"):
        if not cfg.get("overwrite"):
            raise TrainError(f"{last} exists: pass resume=true to continue it or overwrite=true to start again")
        return None
    state = read_lightning_checkpoint(last)
    prev = state.get("superdiff_config", {})
    for sec in ("model", "diffuser"):
        if not isinstance(prev, Mapping) or prev.get(sec) != cfg[sec]:
            raise TrainError(f"resume: the {sec!r} section differs from the one in {last}; "
                             "use the same settings (or overwrite=true to start again)")
    try:
        int(state.get("global_step", 0))
    except (TypeError, ValueError):
        raise TrainError(f"resume: {last} has no valid global_step; use overwrite=true to start again") from None
    return state


def init_weights(cfg: Mapping[str, Any]) -> Optional[dict]:
    """The state dict named by ``init_from`` (an official FrameDiff ``model.pth``), checked against ``cfg``.

    Read through the allow-listed loader. Refuses a missing or unsafe file, one whose architecture (``model``
    section) or forward process (``diffuser`` section) differs from the run's, and a key or shape mismatch.
    Returns None when ``init_from`` is unset.
    """
    src = cfg.get("init_from")
    if not src:
        return None
    from superdiff_protein.frames.checkpoints import CheckpointError, load_framediff_checkpoint, \
        load_state_dict_checked
    from superdiff_protein.frames.official_numerics import DiffuserConfigError, SE3DiffuserConfig

    path = Path(str(src)).expanduser()
    if not path.is_file():
        raise TrainError(f"init_from: {str(path)!r} is not a file (give an official FrameDiff model.pth)")
    try:
        ck = load_framediff_checkpoint(path)
        have, want = FrameDiffConfig.from_dict(ck.model_conf), FrameDiffConfig.from_dict(cfg["model"])
        have.ipa.trans_skip_t = want.ipa.trans_skip_t  # an output rule without parameters: may change on a fine-tune
        if have != want:
            raise TrainError(f"init_from: {path} has another architecture than model= of this run "
                             f"(node {have.node_embed_size}/edge {have.edge_embed_size}, "
                             f"{have.ipa.num_blocks} IPA blocks there; pick the matching model group)")
        if SE3DiffuserConfig.from_conf(ck.conf) != SE3DiffuserConfig.from_conf(dict(cfg)):
            raise TrainError(f"init_from: {path} was trained with another diffuser section than this run's")
        net = build_network(cfg)
        load_state_dict_checked(net, ck.state_dict, strict=True, source=str(path))
    except (CheckpointError, DiffuserConfigError) as e:
        raise TrainError(f"init_from: {e}") from None
    return net.state_dict()


def _loggers(tr: Mapping[str, Any], out: Path) -> list:
    """A TensorBoard logger when ``trainer.tensorboard`` asks for one and tensorboard (optional) is installed."""
    tb = tr.get("tensorboard", "auto")
    if tb in (True, "auto", "true"):
        try:
            import tensorboard  # noqa: F401

            return [pl.loggers.TensorBoardLogger(str(out), name="tensorboard", version="")]
        except ImportError:
            if tb is True or tb == "true":
                raise TrainError("trainer.tensorboard=true but tensorboard is not installed") from None
    return []


def fit(cfg: dict, out: str | os.PathLike, start_time: Optional[float] = None) -> dict:
    """Run (or resume) the training job of a composed, validated config in ``out``; returns a summary dict.

    ``out`` is the checked output directory (``check_out_dir``; created here once every check has passed).
    ``max_minutes`` counts from ``start_time`` (default: now; the CLI passes the process start).
    """
    _quiet_lightning()
    start_time = time.time() if start_time is None else start_time
    out = Path(out)
    # everything that can be refused is checked before the first file is written
    state = resume_state(cfg, out)
    tr = cfg["trainer"]
    acc = str(tr.get("accelerator", "auto")).lower()
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        raise TrainError(f"trainer.accelerator={tr['accelerator']}: no CUDA GPU is available "
                         "(torch.cuda.is_available() is False); use trainer.accelerator=auto or cpu")
    if tr.get("num_threads"):
        torch.set_num_threads(int(tr["num_threads"]))
    if tr.get("tf32"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pl.seed_everything(int(cfg["seed"]), workers=True, verbose=False)

    init = init_weights(cfg) if state is None else None   # a resumed run's weights live in last.ckpt
    dm = FrameDataModule(cfg)
    dm.setup("fit")
    module = FrameDiffusionModule(cfg)
    if init is not None:
        module.model.load_state_dict(init)
        if module.ema is not None:
            module.ema.load_state_dict(init)
    if tr.get("compile"):
        from superdiff_protein.runs.compile_cache import configure_compile_cache

        configure_compile_cache()  # one Inductor cache per CPU capability (runs/compile_cache.py says why)
        # in place (nn.Module.compile): the state_dict keys, checkpoints and the EMA copy stay as they are
        module.model.compile(dynamic=False)   # static: the data module pads every batch to one shape
    module.metrics_path = out / "metrics.csv"
    n_eval = int(cfg["experiment"].get("eval_size") or 0)
    if n_eval > 0 and int(cfg["experiment"].get("eval_every") or 0) > 0:
        module.eval_batch = dm.fixed_batch(n_eval)
    loggers = _loggers(tr, out)
    cb = SaveAndBudget(cfg, out, start_time)
    try:
        trainer = pl.Trainer(
            accelerator=tr["accelerator"], devices=tr["devices"], precision=tr["precision"],
            max_steps=int(cfg["max_steps"]), max_epochs=-1, logger=loggers or False,
            enable_checkpointing=False, callbacks=[cb], gradient_clip_val=cfg["experiment"].get("grad_clip"),
            enable_progress_bar=bool(tr.get("progress_bar")), enable_model_summary=False,
            use_distributed_sampler=False, num_sanity_val_steps=0,
            log_every_n_steps=int(cfg["experiment"]["log_every"]), default_root_dir=str(out),
            plugins=[SafeCheckpointIO()],
        )
    except Exception as e:   # Lightning's MisconfigurationException / ValueError for accelerator, devices, precision
        if isinstance(e, UserError):
            raise
        raise TrainError(f"trainer: {' '.join(str(e).split())} (trainer.accelerator={tr['accelerator']}, "
                         f"devices={tr['devices']}, precision={tr['precision']})") from None

    # all checks passed: write
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"out_dir: cannot create {str(out)!r} ({e.strerror or e})") from None
    start_step = int(state.get("global_step", 0)) if state is not None else 0
    if state is not None:
        truncate_metrics(out / "metrics.csv", start_step)
    else:
        for name in ("metrics.csv", "model.pth", "loss_curve.png", "last.ckpt"):
            (out / name).unlink(missing_ok=True)
    _dump_yaml(cfg, out / "config.yaml")
    t0 = time.time()
    if start_step >= int(cfg["max_steps"]):
        return {"out_dir": str(out), "start_step": start_step, "step": start_step, "seconds": 0.0,
                "stopped_for_time": False, "done": True}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*infinite.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        # Lightning's own use of a torch API torch deprecates (nothing a user can change)
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        trainer.fit(module, datamodule=dm, ckpt_path=str(out / "last.ckpt") if state is not None else None)
    step = int(trainer.global_step)
    return {"out_dir": str(out), "start_step": start_step, "step": step, "seconds": time.time() - t0,
            "stopped_for_time": cb.stopped_for_time, "done": step >= int(cfg["max_steps"]),
            "params": sum(p.numel() for p in module.model.parameters()),
            "train_minutes": module.train_minutes()}


def bench_forward(cfg: dict, batch: int = 10, length: int = 100, threads: Optional[int] = 2,
                  repeats: int = 5) -> dict:
    """CPU inference cost of the configured architecture: parameters, file size, forward seconds.

    One self-conditioned forward pass of a ``batch x length`` batch (what one sampler step costs
    for one model), median and min over ``repeats`` after a warm-up.
    """
    if threads:
        torch.set_num_threads(int(threads))
    net = build_network(cfg).eval()
    model = FrameDiffAdapter(net).eval()
    g = torch.Generator().manual_seed(0)
    rot = so3_exp(torch.randn(batch, length, 3, generator=g))
    tr = torch.randn(batch, length, 3, generator=g) * 10
    mask = torch.ones(batch, length)
    t = torch.full((batch,), 0.5)
    times = []
    with torch.inference_mode():
        out = model(rot, tr, t, mask)
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model(rot, tr, t, mask, out.self_cond_state)
            times.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in net.parameters())
    return {"params": n, "model_pth_mib": n * 4 / 2 ** 20, "last_ckpt_mib": n * 16 / 2 ** 20,
            "forward_s_median": float(np.median(times)), "forward_s_min": float(min(times)),
            "threads": torch.get_num_threads(), "batch": batch, "length": length}
