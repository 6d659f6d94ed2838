"""The plan of a generation run: each sample's seed, the batches, and which batches a shard runs.

Pure functions of the options (no process group, no files): a sample ``(length, index)`` owns the seed
:func:`sample_seed` derives from ``(seed, length, index)``, so its result does not depend on the batch it runs
in; :func:`make_batches` groups samples into batches (one length per batch, or padded mixed lengths, longest
first); a shard ``(rank, world)`` takes every ``world``-th batch of the single-process plan of ALL samples
(:func:`shard_batches`), so every batch is the one a single process would run.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Collection, Mapping, Sequence

__all__ = ["Job", "sample_seed", "all_jobs", "make_batches", "shard_batches", "parse_shard", "torchrun_world"]

Job = tuple[int, int]                 # (length, sample index)


def sample_seed(seed: int, length: int, index: int) -> int:
    """Seed of sample ``index`` of length ``length``: a hash of (seed, length, index), so it does not
    depend on the batch size, the order of lengths or how many samples per length are asked for."""
    h = hashlib.sha256(f"superdiff_protein.generate:{int(seed)}:{int(length)}:{int(index)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def all_jobs(lengths: Sequence[int], samples_per_length: int) -> list[Job]:
    """Every ``(length, index)`` of a run, lengths in the given order."""
    return [(L, i) for L in lengths for i in range(samples_per_length)]


def make_batches(jobs: Sequence[Job], batch_size: int, pad: bool) -> list[list[Job]]:
    """Batches of at most ``batch_size`` jobs: with ``pad``, all jobs longest first (mixed lengths, padded);
    otherwise one length per batch, lengths in order of first appearance."""
    if pad:
        order = sorted(jobs, key=lambda x: (-x[0], x[1]))
        return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    out = []
    for L in dict.fromkeys(L for L, _ in jobs):
        items = [x for x in jobs if x[0] == L]
        out += [items[k:k + batch_size] for k in range(0, len(items), batch_size)]
    return out


def shard_batches(lengths: Sequence[int], samples_per_length: int, batch_size: int, pad: bool,
                  done: Collection[Job], rank: int = 0, world: int = 1) -> list[list[Job]]:
    """The batches shard ``rank`` of ``world`` still has to run, ``done`` jobs dropped.

    Unsharded: the batches of the jobs not done. Sharded: the single-process plan of ALL jobs dealt
    round-robin (so every shard sees the same plan whatever is done already), then finished jobs dropped.
    """
    if world == 1:
        return make_batches([j for j in all_jobs(lengths, samples_per_length) if j not in done], batch_size, pad)
    plan = make_batches(all_jobs(lengths, samples_per_length), batch_size, pad)[rank::world]
    batches = [[j for j in bt if j not in done] for bt in plan]
    return [bt for bt in batches if bt]


def torchrun_world(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(world size, local rank)`` of a ``torchrun`` launch from its environment (``(1, 0)`` otherwise)."""
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE", "1") or 1), int(env.get("LOCAL_RANK", "0") or 0)


def parse_shard(spec: Any, error: type[Exception] = ValueError) -> tuple[int, int] | None:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; None for no sharding (``None``, ``""``, ``"null"``)."""
    if spec in (None, "", "null"):
        return None
    try:
        i, n = (int(v) for v in str(spec).split("/"))
    except ValueError:
        raise error(f"shard: expected 'i/n' (e.g. 0/4), got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise error(f"shard: need 0 <= i < n, got {spec!r}")
    return i, n
