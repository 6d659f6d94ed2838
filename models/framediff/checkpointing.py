"""Checkpoints of FrameDiff training: the official ``model.pth`` container and safe reading of ``last.ckpt``.

* :func:`export_official_checkpoint` writes ``{model, conf, optimizer, epoch, step}`` as the official FrameDiff
  trainer does (``conf`` an OmegaConf ``DictConfig``), so ``FrameDiffAdapter.from_checkpoint`` and the
  allow-listed loader read it like the paper weights;
* ``last.ckpt`` (Lightning) holds only tensors and plain containers: :func:`read_lightning_checkpoint` and
  :class:`SafeCheckpointIO` (Lightning's reader on resume) go through ``superdiff_protein.frames.checkpoints``, so no code
  from the file runs (docs/security.md).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import Tensor

from superdiff_protein.frames.checkpoints import CheckpointError, load_checkpoint_file

from .training import TrainError

__all__ = ["official_conf", "atomic_torch_save", "export_official_checkpoint", "weights_from_lightning",
           "read_lightning_checkpoint", "SafeCheckpointIO", "export_from_lightning_checkpoint"]


def official_conf(cfg: Mapping[str, Any]):
    """The ``conf`` of an official FrameDiff container built from a training config.

    Sections ``data`` (incl. ``min_t``), ``diffuser``, ``model`` (official layout, sizes resolved)
    and ``experiment`` (loss weights, learning rate, ...), plus ``superdiff`` (our full config).
    An OmegaConf ``DictConfig``, as in the official files.
    """
    plain = {
        "data": {"min_t": float(cfg["data"]["min_t"]), **copy.deepcopy(dict(cfg["data"]))},
        "diffuser": copy.deepcopy(dict(cfg["diffuser"])),
        "model": copy.deepcopy(dict(cfg["model"])),
        "experiment": copy.deepcopy(dict(cfg["experiment"])),
        "superdiff": {k: copy.deepcopy(v) for k, v in cfg.items() if k not in ("data", "diffuser", "model", "experiment")},
    }
    return OmegaConf.create(plain)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export_official_checkpoint(state_dict: Mapping[str, Tensor], cfg: Mapping[str, Any], path: str | os.PathLike,
                               step: int, epoch: int = 0, optimizer: Optional[dict] = None) -> Path:
    """Write ``{model, conf, optimizer, epoch, step}`` (official FrameDiff container) atomically.

    ``optimizer`` defaults to ``{}`` (the resumable optimizer state lives in ``last.ckpt``; keeping
    it out of ``model.pth`` keeps the shipped file small).
    """
    path = Path(path)
    sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in state_dict.items()}
    atomic_torch_save({"model": sd, "conf": official_conf(cfg), "optimizer": optimizer or {},
                       "epoch": int(epoch), "step": int(step)}, path)
    return path


def weights_from_lightning(ckpt: Mapping[str, Any], which: str) -> dict[str, Tensor]:
    """The network weights (``ema`` or ``raw``) of a Lightning checkpoint, under the official key names."""
    sd = ckpt["state_dict"]
    prefix = "ema." if which == "ema" else "model."
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise TrainError(f"checkpoint has no {which!r} weights")
    return out


def read_lightning_checkpoint(path: str | os.PathLike) -> dict:
    """A ``last.ckpt`` through the allow-listed loader (no code from the file runs)."""
    try:
        ck = load_checkpoint_file(path, "cpu")
    except CheckpointError as e:
        raise TrainError(f"resume: {e}") from e
    if not isinstance(ck, dict):
        raise TrainError(f"{path}: not a Lightning checkpoint (a {type(ck).__name__}, not a dict)")
    return ck


class SafeCheckpointIO(pl.plugins.TorchCheckpointIO):
    """Lightning's checkpoint I/O, reading through the allow-listed loader instead of ``torch.load`` (resume)."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> dict:
        return load_checkpoint_file(path, "cpu")


def export_from_lightning_checkpoint(ckpt_path: str | os.PathLike, out_path: str | os.PathLike,
                                     which: Optional[str] = None) -> Path:
    """Turn a ``last.ckpt`` (made by ``train_frame_model``) into an official ``model.pth``.

    Read with the allow-listed loader: our Lightning checkpoints hold only tensors and plain containers.
    """
    p = Path(ckpt_path)
    if not p.is_file():
        raise TrainError(f"checkpoint {p} not found")
    ck = read_lightning_checkpoint(p)
    cfg = ck.get("superdiff_config")
    if cfg is None:
        raise TrainError(f"{p} was not written by superdiff_protein.cli.train (no superdiff_config)")
    which = which or cfg["experiment"]["export_weights"]
    return export_official_checkpoint(weights_from_lightning(ck, which), cfg, out_path,
                                      step=int(ck.get("global_step", 0)), epoch=int(ck.get("epoch", 0)))
