"""CIFAR-10 from the standard python-pickle archive, and Lightning training of a diffusers DDPM UNet.

The archive is the one users download as ``cifar-10-python.tar.gz``: members
``cifar-10-batches-py/data_batch_1..5``, ``test_batch`` and ``batches.meta``, each a pickled dict with
``b'data'`` (uint8, (N, 3072), channel-major RGB 32x32) and ``b'labels'`` (list of ints); the meta file
has ``b'label_names'``. The pickles are read with a restricted unpickler that only reconstructs plain
containers and numpy arrays (a pickle can execute code; an archive from elsewhere must not).

The paper's CIFAR experiment trains two models on two halves of the classes and superposes them with
OR; :func:`train_ddpm` trains one such model (``classes=[0, 1, 2, 3, 4]``) and saves it in the
diffusers ``DDPMPipeline`` layout (``unet/``, ``scheduler/``, ``model_index.json``) that
:class:`~models.image.pipeline.SuperDiffPipeline` loads.
"""
from __future__ import annotations

import copy
import io
import os
import pickle
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .adapters import ImageModelError

__all__ = ["CIFAR_CLASSES", "read_cifar_archive", "write_cifar_archive", "TrainConfig", "DDPMModule", "train_ddpm"]

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def _load_pickle(data: bytes) -> dict:
    """One archive member through the allow-listed unpickler (plain data and numpy arrays only)."""
    from superdiff_protein.runs.safe_load import CheckpointError, safe_unpickle

    try:
        return safe_unpickle(data, encoding="bytes")
    except CheckpointError as e:
        raise pickle.UnpicklingError(str(e)) from e


def _class_ids(classes: Sequence[int | str] | None) -> list[int] | None:
    if classes is None:
        return None
    out = []
    for c in classes:
        if isinstance(c, str) and not c.isdigit():
            if c not in CIFAR_CLASSES:
                raise ImageModelError(f"unknown CIFAR-10 class {c!r}; names: {CIFAR_CLASSES}")
            out.append(CIFAR_CLASSES.index(c))
        else:
            i = int(c)
            if not 0 <= i < 10:
                raise ImageModelError(f"CIFAR-10 class index {i} out of range 0..9")
            out.append(i)
    if not out:
        raise ImageModelError("classes is empty")
    return sorted(set(out))


def read_cifar_archive(path: str | os.PathLike, classes: Sequence[int | str] | None = None,
                       split: str = "train") -> tuple[Tensor, Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) of ``split`` (``train``: data_batch_1..5, ``test``:
    test_batch), restricted to ``classes`` (indices or names). Also accepts the extracted directory."""
    if split not in ("train", "test"):
        raise ImageModelError(f"split must be 'train' or 'test', got {split!r}")
    names = _TRAIN if split == "train" else ["test_batch"]
    p = Path(path)
    blobs: dict[str, bytes] = {}
    if p.is_dir():
        for n in names:
            hits = list(p.rglob(n))
            if hits:
                blobs[n] = hits[0].read_bytes()
    elif p.is_file():
        try:
            with tarfile.open(p, "r:*") as tf:
                for m in tf.getmembers():
                    base = os.path.basename(m.name)
                    if m.isfile() and base in names:
                        blobs[base] = tf.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ImageModelError(f"{p}: not a readable tar archive ({e})") from e
    else:
        raise ImageModelError(f"CIFAR archive not found: {p} (download cifar-10-python.tar.gz and pass its path)")
    missing = [n for n in names if n not in blobs]
    if missing:
        raise ImageModelError(f"{p}: missing CIFAR-10 member(s) {missing}; expected the python-pickle archive "
                              "cifar-10-python.tar.gz (cifar-10-batches-py/data_batch_1..5, test_batch)")
    xs, ys = [], []
    for n in names:
        try:
            d = _load_pickle(blobs[n])
            data = np.asarray(d[b"data"], dtype=np.uint8)
            labels = np.asarray(d[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
            raise ImageModelError(f"{p}:{n}: not a CIFAR-10 python batch ({e})") from e
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise ImageModelError(f"{p}:{n}: expected data (N, 3072) and N labels, got {data.shape} / {len(labels)}")
        xs.append(data)
        ys.append(labels)
    x = torch.from_numpy(np.concatenate(xs)).reshape(-1, 3, 32, 32)
    y = torch.from_numpy(np.concatenate(ys))
    ids = _class_ids(classes)
    if ids is not None:
        keep = torch.isin(y, torch.tensor(ids))
        x, y = x[keep], y[keep]
        if len(y) == 0:
            raise ImageModelError(f"no images of classes {ids} in {p}")
    return x, y


def write_cifar_archive(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray, test_images: np.ndarray,
                        test_labels: np.ndarray) -> Path:
    """Write a (synthetic) archive in the exact CIFAR-10 python format (tests, demos)."""
    path = Path(path)
    chunks = np.array_split(np.arange(len(images)), 5)

    def add(tf, name, obj):
        data = pickle.dumps(obj, protocol=2)
        info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tf:
        for i, idx in enumerate(chunks, 1):
            add(tf, f"data_batch_{i}", {b"batch_label": f"training batch {i} of 5".encode(),
                                         b"labels": [int(v) for v in labels[idx]],
                                         b"data": np.ascontiguousarray(images[idx].reshape(len(idx), 3072), dtype=np.uint8)})
        add(tf, "test_batch", {b"labels": [int(v) for v in test_labels],
                               b"data": np.ascontiguousarray(test_images.reshape(len(test_images), 3072), dtype=np.uint8)})
        add(tf, "batches.meta", {b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_vis": 3072})
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """Options of :func:`train_ddpm` (also the Hydra config ``train_image_model``)."""

    archive: str = "???"
    output: str = "???"
    classes: list = field(default_factory=lambda: [0, 1, 2, 3, 4])
    max_steps: int = 100000
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 1000
    ema_decay: float = 0.9999        # 0 disables EMA; the saved UNet is the EMA one when enabled
    hflip: bool = True
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    block_out_channels: list = field(default_factory=lambda: [128, 256, 256, 256])
    layers_per_block: int = 2
    attention_levels: list = field(default_factory=lambda: [1])   # indices of down/up blocks with attention
    norm_num_groups: int = 32
    dropout: float = 0.1
    seed: int = 0
    num_workers: int = 2
    accelerator: str = "auto"
    devices: int = 1
    precision: str = "32-true"
    log_every_n_steps: int = 50
    progress: bool = True


def build_unet(cfg: TrainConfig):
    from diffusers import UNet2DModel

    n = len(cfg.block_out_channels)
    att = set(int(i) for i in cfg.attention_levels)
    down = tuple("AttnDownBlock2D" if i in att else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if (n - 1 - i) in att else "UpBlock2D" for i in range(n))
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=cfg.layers_per_block,
                       block_out_channels=tuple(cfg.block_out_channels), down_block_types=down, up_block_types=up,
                       norm_num_groups=cfg.norm_num_groups, dropout=cfg.dropout)


def _lightning():
    try:
        import pytorch_lightning as pl
    except ImportError:  # pragma: no cover
        import lightning.pytorch as pl  # type: ignore
    return pl


pl = _lightning()


class DDPMModule(pl.LightningModule):
    """DDPM training (noise or v regression at uniformly drawn timesteps) with an optional EMA copy."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        from diffusers import DDPMScheduler

        self.cfg = cfg
        self.unet = build_unet(cfg)
        self.scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                                       prediction_type=cfg.prediction_type)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False) if cfg.ema_decay > 0 else None

    def training_step(self, batch, batch_idx):
        x0 = batch[0]
        x0 = x0.float() / 127.5 - 1.0
        if self.cfg.hflip:
            flip = torch.rand(x0.shape[0], device=x0.device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise = torch.randn_like(x0)
        ts = torch.randint(0, self.cfg.num_train_timesteps, (x0.shape[0],), device=x0.device)
        xt = self.scheduler.add_noise(x0, noise, ts)
        target = noise if self.cfg.prediction_type == "epsilon" else self.scheduler.get_velocity(x0, noise, ts)
        pred = self.unet(xt, ts, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        self.log("loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is None:
            return
        d = min(self.cfg.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.unet.parameters()):
                pe.lerp_(p.detach(), 1 - d)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.unet.parameters(), lr=self.cfg.lr)
        w = max(1, int(self.cfg.warmup_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / w))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train_ddpm(cfg: TrainConfig) -> Path:
    """Train on ``cfg.classes`` of the archive and save the (EMA) UNet + scheduler in the diffusers layout
    at ``cfg.output`` (written to a temporary sibling directory, then moved into place)."""
    from .tiny import save_components

    if cfg.prediction_type not in ("epsilon", "v_prediction"):
        raise ImageModelError(f"prediction_type must be epsilon or v_prediction, got {cfg.prediction_type!r}")
    x, _ = read_cifar_archive(cfg.archive, cfg.classes, "train")
    pl.seed_everything(int(cfg.seed), workers=True)
    ds = torch.utils.data.TensorDataset(x)
    dl = torch.utils.data.DataLoader(ds, batch_size=min(int(cfg.batch_size), len(ds)), shuffle=True, drop_last=True,
                                     num_workers=int(cfg.num_workers), persistent_workers=int(cfg.num_workers) > 0)
    module = DDPMModule(cfg)
    trainer = pl.Trainer(max_steps=int(cfg.max_steps), accelerator=cfg.accelerator, devices=cfg.devices,
                         precision=cfg.precision, logger=False, enable_checkpointing=False,
                         enable_progress_bar=bool(cfg.progress), log_every_n_steps=int(cfg.log_every_n_steps),
                         enable_model_summary=False)
    trainer.fit(module, dl)
    out = Path(cfg.output)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    unet = (module.ema if module.ema is not None else module.unet).cpu().eval()
    save_components(tmp, {"unet": unet, "scheduler": module.scheduler})
    meta = {"classes": _class_ids(cfg.classes), "steps": int(trainer.global_step), "ema": module.ema is not None}
    (tmp / "superdiff_train.json").write_text(__import__("json").dumps(meta, indent=2))
    if out.exists():
        old = out.with_name(out.name + f".old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out
