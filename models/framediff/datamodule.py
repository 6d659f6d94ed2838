"""The data of FrameDiff training: a LightningDataModule over a ``prepare_dataset`` file.

Batches form an *infinite, step-indexed stream*: length-bucketed epochs (:class:`LengthBucketSampler`, seeded by
``seed`` and the epoch) are concatenated, so batch ``k`` is a pure function of ``(seed, k)`` and the random crop
of a chain depends on its data epoch. A run resumed at ``global_step`` sees exactly the batches it would have seen
without interruption. Reading the file, cropping and padding: :mod:`superdiff_protein.frames.data`
(``FrameDataset``, ``collate_frames``). Documentation: ``docs/training.md``, "Batches, randomness, resume".
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch

from superdiff_protein.frames.data import DatasetError, FrameDataset, LengthBucketSampler, collate_frames

from .training import TrainError

__all__ = ["EpochItems", "StepIndexedBatchSampler", "FrameDataModule"]


class EpochItems(torch.utils.data.Dataset):
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

    Data epochs are :class:`~superdiff_protein.frames.data.LengthBucketSampler` epochs concatenated;
    items are ``(index, epoch)`` pairs (see :class:`EpochItems`).  Iteration starts at batch
    ``start_fn()`` (the number of batches already consumed, i.e. Lightning's ``global_step``), so
    a resumed run sees exactly the batches it would have seen without interruption.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, max_tokens: int | None = None, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, start_fn: Callable[[], int] = lambda: 0,
                 drop_last: bool = False):
        self._inner = LengthBucketSampler(lengths, batch_size, max_tokens=max_tokens, seed=seed,
                                          num_replicas=num_replicas, rank=rank, drop_last=drop_last)
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
                raise TrainError("the dataset yields no batch (with trainer.compile=true only full batches are used: "
                                 "it needs at least data.batch_size chains)")
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


class FrameDataModule(pl.LightningDataModule):
    """Length-bucketed, step-indexed batches of a :func:`prepare_dataset` file."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.dataset = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.dataset is not None:
            return
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
        # trainer.compile: one fixed batch shape (full batches, padded to max_length), so the compiled network is
        # built once per grad mode; dynamic shapes recompile and, in torch 2.13, failed in the backward
        static = bool(self.cfg.get("trainer", {}).get("compile"))
        if static and d["max_tokens"] is not None:
            raise TrainError("trainer.compile=true needs fixed batches: set data.max_tokens=null")
        sampler = StepIndexedBatchSampler(self.dataset.lengths, int(d["batch_size"]), max_tokens=d["max_tokens"],
                                          seed=int(self.cfg["seed"]), num_replicas=world, rank=rank, start_fn=start,
                                          drop_last=static)
        nw = int(d["num_workers"])
        collate = functools.partial(collate_frames, pad_to=int(d["max_length"])) if static else collate_frames
        return torch.utils.data.DataLoader(EpochItems(self.dataset), batch_sampler=sampler,
                                           collate_fn=collate, num_workers=nw,
                                           pin_memory=torch.cuda.is_available(),
                                           persistent_workers=nw > 0)

    def fixed_batch(self, n: int) -> dict:
        """A batch of ``n`` chains spread over the dataset (evenly spaced indices), cropped as in data epoch 0:
        the fixed-noise evaluation batch."""
        ds = self.dataset
        ds.set_epoch(0)
        idx = np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int)
        return collate_frames([ds[int(i)] for i in idx])
