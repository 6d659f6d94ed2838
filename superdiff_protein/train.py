"""Train FrameDiff-architecture frame models by denoising score matching (``train_frame_model``).

The loss is FrameDiff's (jasonkyuyim/se3_diffusion @ 53359d7, ``experiments/train_se3_diffusion.py``
``loss_fn``), on the SE(3) diffusion of :mod:`superdiff_protein.se3` (the one every sampler here
uses):

* ``t ~ U(min_t, 1)`` per chain; frames noised with ``forward_marginal``;
* self-conditioning: with probability ``self_condition_prob`` (official 0.5) a first pass without
  gradient predicts CA positions that are fed to the second pass;
* rotation loss: FrameDiff's *separate* axis / angle loss on the rotation score, the angle part
  divided by ``rot_score_scaling`` and only for ``t > rot_loss_t_threshold``;
* translation loss: the score loss divided by ``trans_score_scaling`` for ``t > trans_x0_threshold``,
  otherwise the x0 loss in scaled (nm) coordinates (official default threshold 1.0: always x0);
* optional auxiliary losses (``aux_loss``) for ``t < 0.25``: idealised backbone atoms (N, CA, C, O,
  CB) and pairwise atom distances below 6 A.

Lightning runs the loop (CPU or GPU, bf16 / tf32, gradient clipping, LR warmup / cosine); weights
have an EMA copy.  Batches are length-bucketed and form an *infinite, step-indexed stream*: batch
``k`` is a pure function of ``(seed, k)``, as is the noise of step ``k``, so a run resumed from
``last.ckpt`` continues exactly where it stopped.

Output directory (``out_dir``): ``last.ckpt`` (Lightning, resumable), ``model.pth`` (official
FrameDiff container ``{model, conf, optimizer, epoch, step}``, EMA weights, loads with
``FrameDiffAdapter.from_checkpoint`` and the safe loader), ``metrics.csv``, ``config.yaml``,
``loss_curve.png``.  Documentation: ``docs/training.md``.

Only torch, numpy, (pytorch_)lightning and PyYAML are needed on the training path (no biotite,
Hydra optional, OmegaConf optional but needed for an official ``conf`` object in ``model.pth``).
"""
from __future__ import annotations

import copy
import csv
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ._cli import UserError, check_out_dir, guard

__all__ = [
    "TrainError",
    "compose_config",
    "finalize_config",
    "framediff_loss",
    "StepIndexedBatchSampler",
    "FrameDataModule",
    "FrameDiffusionModule",
    "official_conf",
    "export_official_checkpoint",
    "export_from_lightning_checkpoint",
    "plot_metrics",
    "train",
    "main",
]

_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
_CONFIG_NAME = "train_frame_model"
_PROCESS_START = time.time()


class TrainError(RuntimeError, UserError):
    """Bad training configuration, missing data or an unusable output directory (exit code 2 in the CLI)."""


def _import_lightning():
    """``lightning.pytorch`` or ``pytorch_lightning`` (whichever is installed)."""
    try:
        import pytorch_lightning as pl  # noqa: F401

        return pl
    except ImportError:
        try:
            import lightning.pytorch as pl  # type: ignore[no-redef]

            return pl
        except ImportError as e:  # pragma: no cover
            raise TrainError("training needs pytorch_lightning (or lightning) installed") from e


# ============================================================================ configuration
def _parse_value(text: str) -> Any:
    """Parse a command-line override value (Hydra-like: ints, floats, null, bools, lists, strings)."""
    import yaml

    t = text.strip()
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    try:
        return yaml.safe_load(t) if t else ""
    except yaml.YAMLError:
        return t


def _load_yaml(path: Path) -> dict:
    import yaml

    with open(path) as f:
        d = yaml.safe_load(f) or {}
    if not isinstance(d, dict):
        raise TrainError(f"{path}: expected a mapping")
    return d


def _deep_merge(base: dict, upd: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in upd.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _compose_plain(overrides: Sequence[str], config_dir: Path) -> dict:
    """Compose ``train_frame_model.yaml`` + its defaults list + overrides without Hydra."""
    primary = _load_yaml(config_dir / f"{_CONFIG_NAME}.yaml")
    defaults = primary.pop("defaults", [])
    groups: dict[str, str] = {}
    for d in defaults:
        if isinstance(d, Mapping):
            groups.update({str(k): str(v) for k, v in d.items()})
    plain: list[tuple[str, str, bool]] = []
    for o in overrides:
        if "=" not in o:
            raise TrainError(f"override {o!r} is not of the form key=value")
        key, val = o.split("=", 1)
        add = key.startswith("+")
        key = key.lstrip("+")
        if "." not in key and (config_dir / key).is_dir():
            if not (config_dir / key / f"{val}.yaml").is_file():
                opts = sorted(p.stem for p in (config_dir / key).glob("*.yaml"))
                raise TrainError(f"unknown {key} config {val!r}; available: {opts}")
            groups[key] = val
        else:
            plain.append((key, val, add))
    cfg: dict = {}
    for d in defaults:  # groups first, then _self_ (the primary config) on top
        if isinstance(d, Mapping):
            for g in d:
                cfg[g] = _load_yaml(config_dir / g / f"{groups[g]}.yaml")
    cfg = _deep_merge(cfg, primary)
    for key, val, add in plain:
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                if not add:
                    raise TrainError(f"unknown config key {key!r}")
                node[p] = {}
            node = node[p]
        if parts[-1] not in node and not add:
            raise TrainError(f"unknown config key {key!r} (use +{key}=... to add a new key)")
        node[parts[-1]] = _parse_value(val)
    return cfg


def compose_config(overrides: Sequence[str] = (), config_dir: str | os.PathLike | None = None,
                   use_hydra: Optional[bool] = None) -> dict:
    """The training config as a plain dict: yaml defaults + ``key=value`` overrides.

    Uses Hydra's compose API (full override grammar) when Hydra is installed, else an equivalent
    minimal composer (``key=value``, ``+key=value``, group selection ``model=tiny``).
    """
    cdir = Path(config_dir) if config_dir is not None else _CONFIG_DIR
    if not (cdir / f"{_CONFIG_NAME}.yaml").is_file():
        raise TrainError(f"config {cdir / (_CONFIG_NAME + '.yaml')} not found")
    if use_hydra is None:
        try:
            import hydra  # noqa: F401

            use_hydra = True
        except ImportError:
            use_hydra = False
    if not use_hydra:
        return finalize_config(_check_types(_compose_plain(list(overrides), cdir), cdir))
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(cdir.resolve()), version_base=None):
            c = compose(config_name=_CONFIG_NAME, overrides=list(overrides))
        d = OmegaConf.to_container(c, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:
        from ._cli import config_keys, hydra_error_line

        raise TrainError(hydra_error_line(e, config_keys(_CONFIG_NAME))) from e
    d.pop("hydra", None)
    return finalize_config(_check_types(d, cdir))


# numbers that may also be null (documented as "null = off")
_NULLABLE = {"experiment.grad_clip", "experiment.ema_decay"}
# values of other types by design (Lightning accepts "auto", lists, strings)
_ANY_TYPE = {"trainer.devices", "trainer.tensorboard", "trainer.precision", "trainer.accelerator"}


def _check_types(cfg: dict, config_dir: Path) -> dict:
    """Refuse a value whose type does not fit the default's (a word where a number belongs, a fraction for
    a count, NaN or infinity), naming the key. Keys whose default is null are checked by :func:`finalize_config`."""
    try:
        base = _compose_plain([], config_dir)
    except Exception:  # pragma: no cover - the defaults themselves are unreadable: nothing to compare with
        return cfg

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


# ============================================================================ loss
def _seq_idx(batch: Mapping[str, Tensor], mode: str) -> Tensor:
    mask = batch["res_mask"]
    if mode == "consecutive":
        return (torch.arange(1, mask.shape[1] + 1, device=mask.device)[None] * mask).long()
    rid = batch["res_ids"].long()
    return ((rid - rid[:, :1] + 1) * mask.long()).clamp_min(0)


def framediff_loss(
    pred_rotmats: Tensor, pred_trans: Tensor, pred_psi: Tensor,
    pred_rot_score: Tensor, pred_trans_score: Tensor,
    gt: Mapping[str, Tensor], noised: Any, t: Tensor, res_mask: Tensor, exp: Mapping[str, Any],
) -> dict[str, Tensor]:
    """FrameDiff's training loss, per chain (official ``loss_fn``; every input float32).

    Args:
        pred_*: network predictions (frames in Angstrom, psi (sin, cos)) and the scores derived from
            them by ``SE3Diffuser.scores_from_prediction``.
        gt: ``rotmats``, ``trans`` (Angstrom), ``psi`` (B, N, 2), ``psi_mask`` (B, N).
        noised: ``forward_marginal`` output (``rot_score``, ``trans_score``, ``*_score_scaling``).
        t: (B,) times; res_mask: (B, N).
        exp: the ``experiment`` config section (official weight names).

    Returns:
        dict of (B,) tensors ``loss``, ``rot_loss``, ``trans_loss``, ``bb_atom_loss``,
        ``dist_mat_loss`` (weighted, already gated by their t ranges), plus ``clash_loss`` when
        ``exp["clash_loss_weight"] > 0`` (our addition, :func:`ca_clash_loss`; included in ``loss``).
    """
    from .geometry import backbone_atoms_from_frames

    mask = res_mask.float()
    m3 = mask[..., None]
    n_res = mask.sum(-1)
    scale = float(exp["coordinate_scaling"])

    # translation: score loss above trans_x0_threshold, x0 loss (nm) below / at it
    ts_scal = noised.trans_score_scaling.float()
    trans_score_loss = (((noised.trans_score.float() - pred_trans_score * m3) ** 2) * m3).sum((-1, -2)) / (
        ts_scal ** 2) / (n_res + 1e-10)
    trans_x0_loss = (((gt["trans"] - pred_trans) * scale) ** 2 * m3).sum((-1, -2)) / (n_res + 1e-10)
    thr = float(exp["trans_x0_threshold"])
    trans_loss = trans_score_loss * (t > thr) + trans_x0_loss * (t <= thr)
    trans_loss = trans_loss * float(exp["trans_loss_weight"])

    # rotation
    gt_rs = noised.rot_score.float()
    pr_rs = pred_rot_score * m3
    rs_scal = noised.rot_score_scaling.float()
    gate = (t > float(exp["rot_loss_t_threshold"])).float()
    if exp["separate_rot_loss"]:
        gt_ang = gt_rs.norm(dim=-1, keepdim=True)
        pr_ang = pr_rs.norm(dim=-1, keepdim=True)
        axis_loss = (((gt_rs / (gt_ang + 1e-6) - pr_rs / (pr_ang + 1e-6)) ** 2) * m3).sum((-1, -2)) / (n_res + 1e-10)
        angle_loss = (((gt_ang - pr_ang) ** 2) * m3).sum((-1, -2)) / rs_scal ** 2 / (n_res + 1e-10)
        rot_loss = angle_loss * float(exp["rot_loss_weight"]) * gate + axis_loss
    else:
        rot_loss = (((gt_rs - pr_rs) ** 2) * m3).sum((-1, -2)) / rs_scal ** 2 / (n_res + 1e-10)
        rot_loss = rot_loss * float(exp["rot_loss_weight"]) * gate

    zero = torch.zeros_like(rot_loss)
    bb_atom_loss, dist_mat_loss = zero, zero
    if exp["aux_loss"]:
        # idealised backbone (N, CA, C, O, CB) from frames + psi, as official compute_backbone
        pred_atoms = backbone_atoms_from_frames(pred_rotmats, pred_trans, pred_psi, with_cb=True)
        gt_atoms = backbone_atoms_from_frames(gt["rotmats"], gt["trans"], gt["psi"], with_cb=True)
        atom_mask = mask[..., None].expand(*mask.shape, 5).clone()
        atom_mask[..., 3] = atom_mask[..., 3] * gt["psi_mask"].float()  # O unknown where O is missing
        bb_atom_loss = (((pred_atoms - gt_atoms) ** 2).sum(-1) * atom_mask).sum((-1, -2)) / (
            atom_mask.sum((-1, -2)) + 1e-10)
        bb_atom_loss = bb_atom_loss * float(exp["bb_atom_loss_weight"]) * (t < float(exp["bb_atom_loss_t_filter"]))
        bb_atom_loss = bb_atom_loss * float(exp["aux_loss_weight"])

        b, n = mask.shape
        gflat = gt_atoms.reshape(b, n * 5, 3)
        pflat = pred_atoms.reshape(b, n * 5, 3)
        fmask = atom_mask.reshape(b, n * 5)
        gd = torch.cdist(gflat, gflat) * fmask[..., None]
        pd = _safe_pdist(pflat) * fmask[..., None]
        pmask = fmask[..., None] * fmask[:, None, :] * (gd < 6).float()
        # official denominator: (#pairs - num_res); with single-protein batches num_res = real length
        dist_mat_loss = ((gd - pd) ** 2 * pmask).sum((1, 2)) / (pmask.sum((1, 2)) - n_res).clamp_min(1.0)
        dist_mat_loss = dist_mat_loss * float(exp["dist_mat_loss_weight"]) * (t < float(exp["dist_mat_loss_t_filter"]))
        dist_mat_loss = dist_mat_loss * float(exp["aux_loss_weight"])
    rot_loss = rot_loss * bool(exp.get("diffuse_rot", True))
    trans_loss = trans_loss * bool(exp.get("diffuse_trans", True))
    loss = rot_loss + trans_loss + bb_atom_loss + dist_mat_loss
    out = {"loss": loss, "rot_loss": rot_loss, "trans_loss": trans_loss,
           "bb_atom_loss": bb_atom_loss, "dist_mat_loss": dist_mat_loss}
    w_clash = float(exp.get("clash_loss_weight") or 0.0)
    if w_clash > 0:
        clash = ca_clash_loss(pred_trans, gt["trans"], mask, float(exp.get("clash_dist", 3.8)),
                              int(exp.get("clash_min_sep", 3)))
        clash = clash * w_clash * (t < float(exp.get("clash_loss_t_filter", 0.5)))
        out["clash_loss"] = clash
        out["loss"] = loss + clash
    return out


def ca_clash_loss(pred_ca: Tensor, gt_ca: Tensor, mask: Tensor, clash_dist: float = 3.8,
                  min_sep: int = 3) -> Tensor:
    """One-sided CA clash penalty per chain (not in official FrameDiff; off unless ``clash_loss_weight > 0``).

    For residue pairs ``|i - j| >= min_sep``: ``relu(min(d_gt, clash_dist) - d_pred)^2`` summed over pairs
    and divided by the number of residues (A^2). The threshold never exceeds the true distance, so the
    ground truth costs exactly zero; only predicted pairs closer than both the truth and ``clash_dist``
    are pushed apart. FrameDiff's distance loss only sees pairs closer than 6 A in the *truth*, so it
    never penalises two distant segments predicted on top of each other -- the clashes small models make.
    """
    m = mask.float()
    n = m.shape[-1]
    idx = torch.arange(n, device=m.device)
    far = ((idx[:, None] - idx[None, :]).abs() >= min_sep).to(m.dtype)
    pm = m[:, :, None] * m[:, None, :] * far
    gd = torch.cdist(gt_ca.float(), gt_ca.float())
    pd = _safe_pdist(pred_ca.float())
    thr = gd.clamp_max(clash_dist)
    pen = torch.relu(thr - pd) ** 2 * pm
    return pen.sum((1, 2)) / 2.0 / m.sum(-1).clamp_min(1.0)


def _safe_pdist(x: Tensor) -> Tensor:
    """Pairwise distances with a finite gradient at zero distance (diagonal)."""
    d2 = ((x[:, :, None, :] - x[:, None, :, :]) ** 2).sum(-1)
    return torch.sqrt(d2 + 1e-10) * (d2 > 0)


# ============================================================================ data
class _EpochItems(torch.utils.data.Dataset):
    """Wraps a :class:`FrameDataset` so that indices ``(i, epoch)`` select the crop of that epoch."""

    def __init__(self, ds: Any):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        i, epoch = key
        self.ds.set_epoch(epoch)
        return self.ds[i]


class StepIndexedBatchSampler:
    """Infinite length-bucketed batch stream; batch ``k`` depends only on ``(seed, k)``.

    Data epochs are :class:`~superdiff_protein.data.LengthBucketSampler` epochs concatenated;
    items are ``(index, epoch)`` pairs (see :class:`_EpochItems`).  Iteration starts at batch
    ``start_fn()`` (the number of batches already consumed, i.e. Lightning's ``global_step``), so
    a resumed run sees exactly the batches it would have seen without interruption.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, max_tokens: int | None = None, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, start_fn: Callable[[], int] = lambda: 0):
        from .data import LengthBucketSampler

        self._inner = LengthBucketSampler(lengths, batch_size, max_tokens=max_tokens, seed=seed,
                                          num_replicas=num_replicas, rank=rank)
        self.start_fn = start_fn
        self._cache: dict[int, list[list[int]]] = {}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Batches (lists of dataset indices) of data epoch ``epoch``."""
        if epoch not in self._cache:
            self._inner.set_epoch(epoch)
            self._cache = {epoch: self._inner._batches()}
        return self._cache[epoch]

    def position(self, k: int) -> tuple[int, int]:
        """(epoch, batch within epoch) of stream batch ``k``."""
        epoch = 0
        while True:
            n = len(self.epoch_batches(epoch))
            if n == 0:
                raise TrainError("the dataset yields no batch")
            if k < n:
                return epoch, k
            k -= n
            epoch += 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, j = self.position(int(self.start_fn()))
        while True:
            batches = self.epoch_batches(epoch)
            for b in batches[j:]:
                yield [(i, epoch) for i in b]
            epoch, j = epoch + 1, 0


def _psi_targets(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    from .geometry import psi_from_backbone

    a = batch["atoms"].float()
    psi = psi_from_backbone(a[..., 0, :], a[..., 1, :], a[..., 2, :], a[..., 3, :])
    ok = batch["atom_mask"][..., 3] & batch["atom_mask"][..., 0] & batch["atom_mask"][..., 2]
    psi = torch.where(ok[..., None], psi, torch.tensor([0.0, -1.0], device=psi.device))
    return torch.nan_to_num(psi), ok


def _make_datamodule_cls():
    pl = _import_lightning()

    class FrameDataModule(pl.LightningDataModule):
        """Length-bucketed, step-indexed batches of a :func:`prepare_dataset` file."""

        def __init__(self, cfg: dict):
            super().__init__()
            self.cfg = cfg
            self.dataset = None

        def setup(self, stage: Optional[str] = None) -> None:
            if self.dataset is not None:
                return
            from .data import DatasetError, FrameDataset

            d = self.cfg["data"]
            path = Path(d["path"])
            if not path.is_file():
                raise TrainError(f"dataset file {path} not found (make it with prepare_dataset; docs/data.md)")
            try:
                self.dataset = FrameDataset(str(path), subset=d["subset"], max_length=d["max_length"],
                                            crop=d["crop"], seed=int(self.cfg["seed"]), center=True)
            except DatasetError as e:
                raise TrainError(str(e)) from e
            if len(self.dataset) == 0:
                raise TrainError(f"dataset {path} subset {d['subset']!r} is empty")

        def train_dataloader(self):
            d = self.cfg["data"]
            trainer = self.trainer
            world = trainer.world_size if trainer is not None else 1
            rank = trainer.global_rank if trainer is not None else 0
            start = (lambda: int(trainer.global_step)) if trainer is not None else (lambda: 0)
            sampler = StepIndexedBatchSampler(self.dataset.lengths, int(d["batch_size"]), max_tokens=d["max_tokens"],
                                              seed=int(self.cfg["seed"]), num_replicas=world, rank=rank, start_fn=start)
            from .data import collate_frames

            nw = int(d["num_workers"])
            return torch.utils.data.DataLoader(_EpochItems(self.dataset), batch_sampler=sampler,
                                               collate_fn=collate_frames, num_workers=nw,
                                               pin_memory=torch.cuda.is_available(),
                                               persistent_workers=nw > 0)

    return FrameDataModule


# ============================================================================ Lightning module
def _build_network(cfg: dict):
    from models.framediff.config import FrameDiffConfig
    from models.framediff.network import FrameDiffScoreNetwork

    return FrameDiffScoreNetwork(FrameDiffConfig.from_dict(cfg["model"]))


_DIFFUSERS: dict[str, Any] = {}


def _build_diffuser(cfg: dict):
    """SE3Diffuser of the config (cached per diffuser section: its IGSO(3) tables fill lazily)."""
    import json

    from .se3 import SE3Diffuser

    key = json.dumps(cfg["diffuser"], sort_keys=True)
    if key not in _DIFFUSERS:
        _DIFFUSERS[key] = SE3Diffuser.from_conf(cfg)
    return _DIFFUSERS[key]


def _lr_lambda(exp: Mapping[str, Any], max_steps: int) -> Callable[[int], float]:
    warm = int(exp.get("warmup_steps") or 0)
    sched = exp["lr_schedule"]
    floor = float(exp.get("min_lr_ratio", 0.1))

    def f(step: int) -> float:
        w = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
        if sched == "cosine":
            p = min(1.0, max(0.0, (step - warm) / max(1, max_steps - warm)))
            return w * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))
        return w

    return f


def _make_module_cls():
    pl = _import_lightning()

    class FrameDiffusionModule(pl.LightningModule):
        """FrameDiff score network + EMA copy, trained with :func:`framediff_loss`."""

        def __init__(self, cfg: dict):
            super().__init__()
            self.cfg = cfg
            self.model = _build_network(cfg)
            decay = cfg["experiment"].get("ema_decay")
            self.ema = None
            if decay is not None:
                self.ema = copy.deepcopy(self.model)
                for p in self.ema.parameters():
                    p.requires_grad_(False)
            self.diffuser = _build_diffuser(cfg)
            self._acc: dict[str, list[float]] = {}
            self._last_log_time = time.time()
            self._examples = 0
            self._residues = 0
            self.metrics_path: Optional[Path] = None
            self.eval_batch: Optional[dict] = None
            self._time_offset = 0.0

        # -------------------------------------------------------------- core
        def _adapter(self, net):
            from models.framediff.adapter import FrameDiffAdapter

            return FrameDiffAdapter(net)

        def _generator(self, step: int, salt: int = 0) -> torch.Generator:
            g = torch.Generator(device=self.device)
            g.manual_seed((int(self.cfg["seed"]) * 1_000_003 + step * 7919 + salt * 104_729 + 12345) % (2 ** 63))
            return g

        def compute_loss(self, net, batch: dict, gen: torch.Generator, t: Optional[Tensor] = None,
                         self_condition: Optional[bool] = None) -> dict[str, Tensor]:
            """Mean (over chains) FrameDiff loss terms for one batch; noise drawn from ``gen``."""
            exp, dcfg = self.cfg["experiment"], self.cfg["data"]
            mask = batch["res_mask"].float()
            b = mask.shape[0]
            min_t = float(dcfg["min_t"])
            if t is None:
                t = min_t + (1.0 - min_t) * torch.rand(b, generator=gen, device=mask.device)
            rot0, trans0 = batch["rotmats"].float(), batch["trans"].float()
            noised = self.diffuser.forward_marginal(rot0, trans0, t, mask, generator=gen)
            seq_idx = _seq_idx(batch, dcfg["seq_idx"])
            adapter = self._adapter(net)
            sc = None
            coin = float(torch.rand((), generator=gen, device=mask.device))
            use_sc = (coin < float(exp["self_condition_prob"])) if self_condition is None else self_condition
            if use_sc and net.cfg.embed.embed_self_conditioning:
                with torch.no_grad():
                    sc = adapter(noised.rotmats_t, noised.trans_t, t, mask, None, seq_idx=seq_idx).self_cond_state
                sc = sc.detach().float()
            out = adapter(noised.rotmats_t, noised.trans_t, t, mask, sc, seq_idx=seq_idx)
            with torch.autocast(device_type=mask.device.type, enabled=False):
                pr, ptr, psi = out.rotmats.float(), out.trans.float(), out.psi.float()
                prs, pts = self.diffuser.scores_from_prediction(
                    noised.rotmats_t, noised.trans_t, pr, ptr, t, mask, pred_quats=out.quats.float())
                gt_psi, psi_mask = _psi_targets(batch)
                exp2 = dict(exp, diffuse_rot=self.cfg["diffuser"]["diffuse_rot"],
                            diffuse_trans=self.cfg["diffuser"]["diffuse_trans"])
                per = framediff_loss(pr, ptr, psi, prs.float(), pts.float(),
                                     {"rotmats": rot0, "trans": trans0, "psi": gt_psi, "psi_mask": psi_mask},
                                     noised, t, mask, exp2)
            nonempty = (mask.sum(-1) > 0).float()
            denom = nonempty.sum() + 1e-10
            return {k: (v * nonempty).sum() / denom for k, v in per.items()}

        def training_step(self, batch: dict, batch_idx: int) -> Tensor:
            gen = self._generator(int(self.global_step))
            losses = self.compute_loss(self.model, batch, gen)
            if not torch.isfinite(losses["loss"]):
                raise TrainError(f"non-finite loss at step {self.global_step}: "
                                 + ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items()))
            for k, v in losses.items():
                self._acc.setdefault(k, []).append(float(v.detach()))
            self._examples += int(batch["res_mask"].shape[0])
            self._residues += int(batch["res_mask"].sum())
            self.log("train/loss", losses["loss"].detach(), on_step=True, prog_bar=True, batch_size=len(batch["name"]))
            return losses["loss"]

        def on_before_optimizer_step(self, optimizer) -> None:
            if (int(self.global_step) + 1) % int(self.cfg["experiment"]["log_every"]) == 0:
                norms = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
                if norms:
                    self._acc.setdefault("grad_norm", []).append(float(torch.stack(norms).norm()))

        @torch.no_grad()
        def _update_ema(self) -> None:
            if self.ema is None:
                return
            decay = float(self.cfg["experiment"]["ema_decay"])
            step = int(self.global_step)
            d = min(decay, (1 + step) / (10 + step))  # warm-up: early averages are not dominated by init
            ema_p = [p for p in self.ema.parameters()]
            cur_p = [p.detach() for p in self.model.parameters()]
            torch._foreach_lerp_(ema_p, cur_p, 1.0 - d)
            for be, bc in zip(self.ema.buffers(), self.model.buffers()):
                be.copy_(bc)

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            self._update_ema()
            step = int(self.global_step)
            exp = self.cfg["experiment"]
            if step % int(exp["log_every"]) == 0:
                self._write_row(step)
            ev = int(exp.get("eval_every") or 0)
            if ev > 0 and step % ev == 0:
                self._evaluate(step)

        # -------------------------------------------------------------- logging
        def _write_row(self, step: int, extra: Optional[dict] = None) -> None:
            now = time.time()
            row: dict[str, Any] = {"step": step, "epoch": self._data_epoch(step),
                                   "train_min": round(self.train_minutes(), 3)}
            for k, v in self._acc.items():
                if v:
                    row[k] = float(np.mean(v))
            opt = self.optimizers()
            if not isinstance(opt, list):
                row["lr"] = opt.param_groups[0]["lr"]
            dt = max(now - self._last_log_time, 1e-9)
            if self._examples:
                row["chains_per_s"] = self._examples / dt
                row["residues_per_s"] = self._residues / dt
            if extra:
                row.update(extra)
            self._acc, self._examples, self._residues, self._last_log_time = {}, 0, 0, now
            if self.trainer.is_global_zero and self.metrics_path is not None:
                _append_metrics(self.metrics_path, row)
            for lg in self.trainer.loggers:
                lg.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)

        def _data_epoch(self, step: int) -> int:
            try:
                sampler = self.trainer.train_dataloader.batch_sampler
                return sampler.position(max(step - 1, 0))[0]
            except Exception:  # noqa: BLE001
                return -1

        @torch.no_grad()
        def _evaluate(self, step: int) -> None:
            if self.eval_batch is None:
                return
            batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in self.eval_batch.items()}
            b = batch["res_mask"].shape[0]
            tt = torch.linspace(float(self.cfg["data"]["min_t"]), 1.0, b + 2, device=self.device)[1:-1]
            res = {}
            nets = [("eval", self.model)] + ([("eval_ema", self.ema)] if self.ema is not None else [])
            for name, net in nets:
                was = net.training
                net.eval()
                ls = self.compute_loss(net, batch, self._generator(0, salt=1), t=tt, self_condition=False)
                net.train(was)
                res[f"{name}_loss"] = float(ls["loss"])
                res[f"{name}_rot_loss"] = float(ls["rot_loss"])
                res[f"{name}_trans_loss"] = float(ls["trans_loss"])
            row = {"step": step, "epoch": self._data_epoch(step), "train_min": round(self.train_minutes(), 3), **res}
            if self.trainer.is_global_zero and self.metrics_path is not None:
                _append_metrics(self.metrics_path, row)
            for lg in self.trainer.loggers:
                lg.log_metrics(res, step=step)

        # -------------------------------------------------------------- optim / ckpt
        def configure_optimizers(self):
            exp = self.cfg["experiment"]
            opt = torch.optim.AdamW(self.model.parameters(), lr=float(exp["learning_rate"]),
                                    weight_decay=float(exp.get("weight_decay") or 0.0)) \
                if float(exp.get("weight_decay") or 0.0) > 0 else \
                torch.optim.Adam(self.model.parameters(), lr=float(exp["learning_rate"]))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(exp, int(self.cfg["max_steps"])))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def on_train_start(self) -> None:
            self._fit_start = time.time()
            self._last_log_time = self._fit_start
            if int(self.global_step) == 0:
                self._evaluate(0)

        def train_minutes(self) -> float:
            """Training wall-clock minutes so far, summed over resumed chunks (startup excluded)."""
            start = getattr(self, "_fit_start", None)
            return (self._time_offset + (time.time() - start if start else 0.0)) / 60.0

        def on_save_checkpoint(self, checkpoint: dict) -> None:
            checkpoint["superdiff_config"] = copy.deepcopy(self.cfg)
            checkpoint["superdiff_train_seconds"] = 60.0 * self.train_minutes()

        def on_load_checkpoint(self, checkpoint: dict) -> None:
            self._time_offset = float(checkpoint.get("superdiff_train_seconds", 0.0))

    return FrameDiffusionModule


_CLASSES: dict[str, Any] = {}


def __getattr__(name: str) -> Any:  # lazy Lightning classes (the module imports without Lightning)
    if name == "FrameDataModule":
        _CLASSES.setdefault(name, _make_datamodule_cls())
        return _CLASSES[name]
    if name == "FrameDiffusionModule":
        _CLASSES.setdefault(name, _make_module_cls())
        return _CLASSES[name]
    raise AttributeError(name)


# ============================================================================ files
_METRIC_ORDER = ["step", "epoch", "train_min", "loss", "rot_loss", "trans_loss", "bb_atom_loss", "dist_mat_loss",
                 "clash_loss", "grad_norm", "lr", "chains_per_s", "residues_per_s", "eval_loss", "eval_rot_loss",
                 "eval_trans_loss", "eval_ema_loss", "eval_ema_rot_loss", "eval_ema_trans_loss"]


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _append_metrics(path: Path, row: dict) -> None:
    """Append a row to metrics.csv (rewriting the file if a new column appears)."""
    rows = None
    header = None
    if path.is_file():
        with open(path, newline="") as f:
            r = csv.reader(f)
            header = next(r, None)
    keys = list(row)
    if header is None or any(k not in header for k in keys):
        rows = _read_metrics(path)
        cols = [c for c in _METRIC_ORDER if c in set(keys) | set(header or [])]
        cols += [c for c in (header or []) + keys if c not in cols]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for old in rows + [row]:
                w.writerow({k: _fmt(v) for k, v in old.items() if k in cols})
        os.replace(tmp, path)
        return
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writerow({k: _fmt(v) for k, v in row.items()})


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after ``step`` (a resumed run re-does the steps after its last checkpoint)."""
    rows = _read_metrics(path)
    if not rows:
        return
    keep = [r for r in rows if r.get("step") not in (None, "") and int(float(r["step"])) <= step]
    if len(keep) == len(rows):
        return
    cols = list(rows[0].keys())
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(keep)
    os.replace(tmp, path)


def plot_metrics(metrics_csv: str | os.PathLike, out_png: str | os.PathLike) -> bool:
    """Loss curves (train losses smoothed, fixed-noise eval losses) -> PNG. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = _read_metrics(Path(metrics_csv))
    if not rows:
        return False

    def series(key: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for r in rows:
            v = r.get(key)
            if v not in (None, ""):
                xs.append(int(float(r["step"])))
                ys.append(float(v))
        return xs, ys

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "rot_loss", "trans_loss", "bb_atom_loss", "dist_mat_loss", "clash_loss"):
        x, y = series(key)
        if x:
            axes[0].plot(x, y, label=key, lw=1)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("training loss (mean over log_every steps)")
    for key in ("eval_loss", "eval_ema_loss", "eval_ema_rot_loss", "eval_ema_trans_loss"):
        x, y = series(key)
        if x:
            axes[1].plot(x, y, label=key, lw=1)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_title("fixed-noise evaluation loss")
    for ax in axes:
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)
    return True


def official_conf(cfg: Mapping[str, Any]):
    """The ``conf`` of an official FrameDiff container built from a training config.

    Sections ``data`` (incl. ``min_t``), ``diffuser``, ``model`` (official layout, sizes resolved)
    and ``experiment`` (loss weights, learning rate, ...), plus ``superdiff`` (our full config).
    An OmegaConf ``DictConfig`` when OmegaConf is installed (as the official files), else a dict.
    """
    plain = {
        "data": {"min_t": float(cfg["data"]["min_t"]), **copy.deepcopy(dict(cfg["data"]))},
        "diffuser": copy.deepcopy(dict(cfg["diffuser"])),
        "model": copy.deepcopy(dict(cfg["model"])),
        "experiment": copy.deepcopy(dict(cfg["experiment"])),
        "superdiff": {k: copy.deepcopy(v) for k, v in cfg.items() if k not in ("data", "diffuser", "model", "experiment")},
    }
    try:
        from omegaconf import OmegaConf
    except ImportError:
        return plain
    return OmegaConf.create(plain)


def _atomic_torch_save(obj: Any, path: Path) -> None:
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
    _atomic_torch_save({"model": sd, "conf": official_conf(cfg), "optimizer": optimizer or {},
                        "epoch": int(epoch), "step": int(step)}, path)
    return path


def _weights_from_lightning(ckpt: Mapping[str, Any], which: str) -> dict[str, Tensor]:
    sd = ckpt["state_dict"]
    prefix = "ema." if which == "ema" else "model."
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise TrainError(f"checkpoint has no {which!r} weights")
    return out


def _read_lightning_checkpoint(path: str | os.PathLike) -> dict:
    """A ``last.ckpt`` through the allow-listed loader (no code from the file runs)."""
    from .checkpoints import CheckpointError, load_checkpoint_file

    try:
        ck = load_checkpoint_file(path, "cpu")
    except CheckpointError as e:
        raise TrainError(f"resume: {e}") from e
    if not isinstance(ck, dict):
        raise TrainError(f"{path}: not a Lightning checkpoint (a {type(ck).__name__}, not a dict)")
    return ck


def _safe_checkpoint_io(pl: Any) -> Any:
    """Lightning's checkpoint I/O, reading through the allow-listed loader instead of ``torch.load``."""
    from .checkpoints import load_checkpoint_file

    class SafeCheckpointIO(pl.plugins.TorchCheckpointIO):
        def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None) -> dict:
            return load_checkpoint_file(path, "cpu")

    return SafeCheckpointIO()


def export_from_lightning_checkpoint(ckpt_path: str | os.PathLike, out_path: str | os.PathLike,
                                     which: Optional[str] = None) -> Path:
    """Turn a ``last.ckpt`` (made by this module) into an official ``model.pth``.

    Read with the allow-listed loader: our Lightning checkpoints hold only tensors and plain containers.
    """
    p = Path(ckpt_path)
    if not p.is_file():
        raise TrainError(f"checkpoint {p} not found")
    ck = _read_lightning_checkpoint(p)
    cfg = ck.get("superdiff_config")
    if cfg is None:
        raise TrainError(f"{p} was not written by superdiff_protein.train (no superdiff_config)")
    which = which or cfg["experiment"]["export_weights"]
    return export_official_checkpoint(_weights_from_lightning(ck, which), cfg, out_path,
                                      step=int(ck.get("global_step", 0)), epoch=int(ck.get("epoch", 0)))


def _dump_yaml(cfg: Mapping[str, Any], path: Path) -> None:
    import yaml

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)


# ============================================================================ callbacks / driver
def _make_budget_callback():
    pl = _import_lightning()

    class _SaveAndBudget(pl.Callback):
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
                per_step = float(np.median(self.step_times)) if self.step_times else 1.0
                margin = 3 * per_step + 2 * self.save_seconds + 10.0
                if now - self.start_time + margin > 60 * float(mm):
                    self.stopped_for_time = True
                    trainer.should_stop = True

        def on_train_end(self, trainer, module) -> None:
            module._write_row(int(trainer.global_step)) if module._acc else None
            self.save(trainer, module)
            if trainer.is_global_zero:
                plot_metrics(self.out / "metrics.csv", self.out / "loss_curve.png")

    return _SaveAndBudget


def _drop_advert(record: Any) -> bool:
    return "litlogger" not in str(record.msg).lower()


def _quiet_lightning() -> None:
    """Drop Lightning's advertisement for its cloud logger (an info line a user cannot act on)."""
    import logging

    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if _drop_advert not in lg.filters:
            lg.addFilter(_drop_advert)


def train(cfg: dict, start_time: Optional[float] = None) -> dict:
    """Run (or resume) a training job described by a composed config; returns a summary dict.

    ``max_minutes`` counts from ``start_time`` (default: now; the CLI passes the process start).
    """
    pl = _import_lightning()
    _quiet_lightning()
    start_time = time.time() if start_time is None else start_time
    # everything that can be refused is checked before the first file is written
    out = check_out_dir(cfg["out_dir"], "out_dir", TrainError)
    last = out / "last.ckpt"
    ckpt_path = None
    if last.is_file():
        if cfg.get("resume"):
            ckpt_path = str(last)
            resume_state = _read_lightning_checkpoint(last)
            prev = resume_state.get("superdiff_config", {})
            for sec in ("model", "diffuser"):
                if not isinstance(prev, Mapping) or prev.get(sec) != cfg[sec]:
                    raise TrainError(f"resume: the {sec!r} section differs from the one in {last}; "
                                     "use the same settings (or overwrite=true to start again)")
            try:
                prev_step = int(resume_state.get("global_step", 0))
            except (TypeError, ValueError):
                raise TrainError(f"resume: {last} has no valid global_step; use overwrite=true to start again") from None
        elif not cfg.get("overwrite"):
            raise TrainError(f"{last} exists: pass resume=true to continue it or overwrite=true to start again")
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

    dm = __getattr__("FrameDataModule")(cfg)
    dm.setup("fit")
    module = __getattr__("FrameDiffusionModule")(cfg)
    module.metrics_path = out / "metrics.csv"
    n_eval = int(cfg["experiment"].get("eval_size") or 0)
    if n_eval > 0 and int(cfg["experiment"].get("eval_every") or 0) > 0:
        from .data import collate_frames

        ds = dm.dataset
        ds.set_epoch(0)
        idx = np.linspace(0, len(ds) - 1, min(n_eval, len(ds))).round().astype(int)
        module.eval_batch = collate_frames([ds[int(i)] for i in idx])

    loggers: list = []
    tb = tr.get("tensorboard", "auto")
    if tb in (True, "auto", "true"):
        try:
            import tensorboard  # noqa: F401

            loggers.append(pl.loggers.TensorBoardLogger(str(out), name="tensorboard", version=""))
        except ImportError:
            if tb is True or tb == "true":
                raise TrainError("trainer.tensorboard=true but tensorboard is not installed")
    cb = _make_budget_callback()(cfg, out, start_time)
    try:
        trainer = pl.Trainer(
            accelerator=tr["accelerator"], devices=tr["devices"], precision=tr["precision"],
            max_steps=int(cfg["max_steps"]), max_epochs=-1, logger=loggers or False,
            enable_checkpointing=False, callbacks=[cb], gradient_clip_val=cfg["experiment"].get("grad_clip"),
            enable_progress_bar=bool(tr.get("progress_bar")), enable_model_summary=False,
            use_distributed_sampler=False, num_sanity_val_steps=0,
            log_every_n_steps=int(cfg["experiment"]["log_every"]), default_root_dir=str(out),
            plugins=[_safe_checkpoint_io(pl)],
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
    if ckpt_path is not None:
        _truncate_metrics(out / "metrics.csv", prev_step)
    else:
        for name in ("metrics.csv", "model.pth", "loss_curve.png", "last.ckpt"):
            (out / name).unlink(missing_ok=True)
    _dump_yaml(cfg, out / "config.yaml")
    t0 = time.time()
    start_step = 0
    if ckpt_path is not None:
        start_step = int(resume_state.get("global_step", 0))
    if start_step >= int(cfg["max_steps"]):
        return {"out_dir": str(out), "start_step": start_step, "step": start_step, "seconds": 0.0,
                "stopped_for_time": False, "done": True}
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*infinite.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        # Lightning's own use of a torch API torch deprecates (nothing a user can change)
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
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
    from models.framediff.adapter import FrameDiffAdapter

    from .geometry import so3_exp

    if threads:
        torch.set_num_threads(int(threads))
    net = _build_network(cfg).eval()
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


_USAGE = """usage:
  train_frame_model [key=value ...]                 train / resume (configs/train_frame_model.yaml)
  python -m superdiff_protein.train [key=value ...]  the same, without needing Hydra
  train_frame_model export CKPT OUT [ema|raw]        last.ckpt -> official model.pth
  train_frame_model plot OUT_DIR                     metrics.csv -> loss_curve.png
  train_frame_model --cfg [key=value ...]            print the composed config
  train_frame_model bench [key=value ...]            CPU forward time of the architecture (10 x 100 residues)
e.g. train_frame_model data.subset=helix out_dir=runs/helix max_steps=4000 resume=true
"""


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point ``train_frame_model`` (also ``python -m superdiff_protein.train``).

    Exit codes (``superdiff_protein._cli``): 0 done, 1 unexpected failure, 2 bad input (one line on stderr,
    nothing written), 130 interrupted.
    """
    from ._runtime import tune_malloc

    tune_malloc()  # CPU training allocates the same (B, N, N, C) edge tensors each step (docs/benchmarks.md)
    args = list(sys.argv[1:] if argv is None else argv)

    def run() -> None:
        if args and args[0] in ("-h", "--help"):
            print(_USAGE)
            return
        if args and args[0] == "export":
            if len(args) not in (3, 4):
                raise TrainError("export needs CKPT OUT [ema|raw]")
            p = export_from_lightning_checkpoint(args[1], args[2], args[3] if len(args) == 4 else None)
            print(f"wrote {p}")
            return
        if args and args[0] == "plot":
            if len(args) != 2:
                raise TrainError("plot needs OUT_DIR")
            d = Path(args[1])
            ok = plot_metrics(d / "metrics.csv", d / "loss_curve.png")
            print(f"wrote {d / 'loss_curve.png'}" if ok else "nothing to plot (no metrics.csv or no matplotlib)")
            return
        bad = [a for a in args if a.startswith("-") and a != "--cfg"]
        if bad:
            raise TrainError(f"unknown flag(s) {' '.join(bad)}; options are key=value (see train_frame_model --help)")
        if args and args[0] == "bench":
            r = bench_forward(compose_config(args[1:]))
            print(f"params {r['params']:,} | model.pth ~{r['model_pth_mib']:.1f} MiB | last.ckpt ~{r['last_ckpt_mib']:.1f} MiB"
                  f" | forward {r['batch']}x{r['length']} on {r['threads']} threads: median {r['forward_s_median']:.3f} s,"
                  f" min {r['forward_s_min']:.3f} s")
            return
        show = bool(args) and args[0] == "--cfg"
        cfg = compose_config(args[1:] if show else args)
        if show:
            import yaml

            print(yaml.safe_dump(cfg, sort_keys=False))
            return
        s = train(cfg, start_time=_PROCESS_START)
        why = "max_steps reached" if s["done"] else ("time budget (max_minutes) reached" if s["stopped_for_time"]
                                                     else "stopped")
        print(f"train_frame_model: steps {s['start_step']} -> {s['step']} in {s['seconds']:.0f} s ({why}); "
              f"outputs in {s['out_dir']}")

    code = guard("train_frame_model", run,
                 interrupted="interrupted (resume with resume=true from the last saved checkpoint)")
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
