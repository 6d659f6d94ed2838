"""Dataset preparation and loading for frame-model training.

* :func:`prepare_dataset` (console script ``prepare_dataset``, :mod:`superdiff_protein.cli.prepare_dataset`;
  Hydra config ``configs/prepare_dataset.yaml``): a directory / tar archive / single file of PDB or mmCIF
  structures -> ONE compact ``.pt`` dataset file (format in ``docs/data.md``), plus a sidecar
  ``<output>.log.json`` listing every skipped (unreadable / non-protein) and filtered file.
* :class:`FrameDataset`: a ``torch.utils.data.Dataset`` over that file returning backbone atoms,
  masks, sequence tokens, secondary-structure labels and backbone frames
  (:func:`superdiff_protein.frames.geometry.frames_from_backbone`).
* :class:`LengthBucketSampler`: deterministic batches of similar length;
  :func:`collate_frames` pads them.
* :func:`split_by_secondary_structure`: helix-rich vs strand-rich halves.

The dataset file itself (format, packing, loading, split) lives in :mod:`superdiff_protein.frames.dataset_file`,
``prepare_dataset`` in :mod:`superdiff_protein.frames.prepare`; their public names are re-exported here.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .dataset_file import (
    CA_BREAK_THRESHOLD,
    RESTYPES,
    SS_CODES,
    DatasetError,
    SSSplit,
    decode_coords,
    load_dataset_file,
    split_by_secondary_structure,
)
from .prepare import PrepareConfig, PrepareSummary, prepare_dataset

__all__ = [
    "DatasetError",
    "RESTYPES",
    "SS_CODES",
    "CA_BREAK_THRESHOLD",
    "PrepareConfig",
    "PrepareSummary",
    "prepare_dataset",
    "load_dataset_file",
    "decode_coords",
    "FrameDataset",
    "LengthBucketSampler",
    "collate_frames",
    "SSSplit",
    "split_by_secondary_structure",
]


_AA_INDEX = {a: i for i, a in enumerate(RESTYPES)}


def _tokens(seq: str) -> torch.Tensor:
    return torch.tensor([_AA_INDEX.get(s, 20) for s in seq], dtype=torch.long)


class FrameDataset(torch.utils.data.Dataset):
    """Backbone chains with residue frames, from a :func:`prepare_dataset` file.

    Args:
        source: path of the dataset file, or an already loaded dict.
        subset: ``None`` (all chains), a split half name stored in the file (``"helix"`` /
            ``"strand"`` for ``split=ss``), or a sequence of chain indices.
        max_length: crop chains longer than this to a contiguous window (``None``: no crop).
        crop: ``"random"`` (window drawn from ``seed``, ``epoch`` and the index: deterministic),
            ``"first"`` or ``"center"``.
        seed: seed of the random crops.
        center: subtract the mean CA position of the (cropped) chain.

    Each item is a dict: ``name`` (str), ``length`` (int), ``atoms`` (L, 4, 3) float32 N/CA/C/O
    (zeros where missing), ``atom_mask`` (L, 4) bool, ``res_mask`` (L,) float32 ones,
    ``aatype`` (L,) long in :data:`RESTYPES` order, ``ss`` (L,) long (0 helix, 1 strand, 2 coil),
    ``chain_break`` (L,) bool, ``residue_index`` (L,) long 0..L-1, ``res_ids`` (L,) long (file
    numbering), ``rotmats`` (L, 3, 3) and ``trans`` (L, 3) backbone frames (``trans`` = CA),
    ``index`` (chain index in the file).
    """

    def __init__(self, source: str | os.PathLike | dict, subset: str | Sequence[int] | None = None,
                 max_length: int | None = None, crop: str = "random", seed: int = 0, center: bool = True):
        self.data = source if isinstance(source, dict) else load_dataset_file(source)
        n = len(self.data["names"])
        if subset is None:
            idx = np.arange(n)
        elif isinstance(subset, str):
            halves = {k: v for sp in self.data.get("splits", {}).values() for k, v in sp.items() if k != "stats"}
            if subset not in halves:
                raise DatasetError(f"subset {subset!r} not in the dataset file; available: {sorted(halves)} "
                                   "(re-run prepare_dataset with split=ss)")
            idx = np.asarray(halves[subset], dtype=np.int64)
        else:
            idx = np.asarray(list(subset), dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise DatasetError(f"subset indices must lie in [0, {n})")
        if crop not in ("random", "first", "center"):
            raise DatasetError(f"crop must be 'random', 'first' or 'center', got {crop!r}")
        if max_length is not None and max_length < 1:
            raise DatasetError(f"max_length must be >= 1, got {max_length}")
        self.chain_indices = idx
        self.max_length = max_length
        self.crop = crop
        self.seed = int(seed)
        self.center = center
        self.epoch = 0
        self._coords = decode_coords(self.data)
        self._offsets = self.data["offsets"].numpy()
        full = self.data["lengths"].numpy()[idx].astype(np.int64)
        self.lengths = np.minimum(full, max_length) if max_length is not None else full

    def set_epoch(self, epoch: int) -> None:
        """Change the random crops (call once per epoch for fresh windows)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.chain_indices.size)

    def _window(self, i: int, L: int) -> tuple[int, int]:
        m = self.max_length
        if m is None or L <= m:
            return 0, L
        if self.crop == "first":
            return 0, m
        if self.crop == "center":
            s = (L - m) // 2
            return s, s + m
        rng = np.random.default_rng([self.seed, self.epoch, i])
        s = int(rng.integers(0, L - m + 1))
        return s, s + m

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        from .geometry import frames_from_backbone

        ci = int(self.chain_indices[i])
        a, b = int(self._offsets[ci]), int(self._offsets[ci + 1])
        s, e = self._window(ci, b - a)
        sl = slice(a + s, a + e)
        atoms = self._coords[sl].to(torch.float64)
        amask = self.data["atom_mask"][sl].clone()
        if self.center:
            ca = atoms[:, 1]
            atoms = atoms - ca.mean(0)
            atoms = atoms * amask[..., None]
        rot, trans = frames_from_backbone(atoms[:, 0], atoms[:, 1], atoms[:, 2])
        brk = self.data["chain_break"][sl].clone()
        if brk.numel():
            brk[0] = False
        L = e - s
        return {
            "name": self.data["names"][ci],
            "index": ci,
            "length": L,
            "atoms": atoms.to(torch.float32),
            "atom_mask": amask,
            "res_mask": torch.ones(L, dtype=torch.float32),
            "aatype": _tokens(self.data["sequences"][ci][s:e]),
            "ss": self.data["ss"][sl].to(torch.long),
            "chain_break": brk,
            "residue_index": torch.arange(L, dtype=torch.long),
            "res_ids": self.data["res_ids"][sl].to(torch.long),
            "rotmats": rot.to(torch.float32),
            "trans": trans.to(torch.float32),
        }


def collate_frames(batch: list[dict], pad_to: int | None = None) -> dict:
    """Pad a list of :class:`FrameDataset` items to the longest one, or to ``pad_to`` residues if that is longer
    (a fixed shape for every batch: what a compiled training step needs, docs/training.md).

    Padding: zeros everywhere, ``res_mask``/``atom_mask`` False/0, identity ``rotmats``,
    ``aatype`` 20 (X), ``ss`` 2 (coil).  ``name``/``index``/``length`` become lists / tensors.
    """
    n_max = max([int(b["length"]) for b in batch] + [int(pad_to or 0)])
    out: dict[str, Any] = {"name": [b["name"] for b in batch],
                           "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
                           "length": torch.tensor([b["length"] for b in batch], dtype=torch.long)}
    fill = {"aatype": 20, "ss": 2}
    for key in ("atoms", "atom_mask", "res_mask", "aatype", "ss", "chain_break", "residue_index",
                "res_ids", "rotmats", "trans"):
        ref = batch[0][key]
        t = torch.full((len(batch), n_max) + tuple(ref.shape[1:]), fill.get(key, 0), dtype=ref.dtype)
        for j, b in enumerate(batch):
            t[j, : b["length"]] = b[key]
        out[key] = t
    pad = out["res_mask"] == 0
    out["rotmats"][pad] = torch.eye(3, dtype=out["rotmats"].dtype)
    return out


class LengthBucketSampler(torch.utils.data.Sampler):
    """Batch sampler yielding lists of indices of similar length, deterministic under ``seed``.

    Each epoch: shuffle all indices (``seed``, ``epoch``), cut them into pools of
    ``pool_batches * batch_size``, sort each pool by length, cut it into batches (at most
    ``batch_size`` items and, with ``max_tokens``, at most ``max_tokens`` padded residues), then
    shuffle the batch order.  With ``num_replicas > 1`` each rank takes every ``num_replicas``-th
    batch (the batch list is truncated to a multiple of ``num_replicas`` so ranks stay in step).

    Args:
        lengths: per-item lengths (e.g. ``FrameDataset.lengths``, which accounts for cropping).
        batch_size: maximum number of items per batch.
        max_tokens: optional cap on ``batch_len * max_length_in_batch``.
        shuffle: if False, batches are formed from the globally length-sorted order, in order.
    """

    def __init__(self, lengths: Sequence[int] | np.ndarray, batch_size: int, *, max_tokens: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, pool_batches: int = 50,
                 num_replicas: int = 1, rank: int = 0):
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if batch_size < 1:
            raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
        if max_tokens is not None and self.lengths.size and max_tokens < self.lengths.max():
            raise DatasetError(f"max_tokens {max_tokens} is smaller than the longest item ({self.lengths.max()})")
        if not 0 <= rank < num_replicas:
            raise DatasetError(f"rank {rank} not in [0, {num_replicas})")
        self.batch_size = int(batch_size)
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.pool_batches = max(1, int(pool_batches))
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes the shuffle deterministically)."""
        self.epoch = int(epoch)

    def _batches(self) -> list[list[int]]:
        n = self.lengths.size
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.shuffle:
            perm = rng.permutation(n)
            pool = self.pool_batches * self.batch_size
            pools = [perm[i:i + pool] for i in range(0, n, pool)]
        else:
            pools = [np.arange(n)]
        batches: list[list[int]] = []
        for p in pools:
            p = p[np.argsort(self.lengths[p], kind="stable")]
            cur: list[int] = []
            cur_max = 0
            for i in p.tolist():
                new_max = max(cur_max, int(self.lengths[i]))
                if cur and (len(cur) >= self.batch_size
                            or (self.max_tokens is not None and new_max * (len(cur) + 1) > self.max_tokens)):
                    batches.append(cur)
                    cur, new_max = [], int(self.lengths[i])
                cur.append(i)
                cur_max = new_max
            if cur:
                batches.append(cur)
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size or self.max_tokens is not None]
        if self.shuffle:
            order = rng.permutation(len(batches))
            batches = [batches[k] for k in order]
        if self.num_replicas > 1:
            usable = len(batches) - len(batches) % self.num_replicas
            batches = batches[self.rank:usable:self.num_replicas]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
