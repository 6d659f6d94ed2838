"""Novelty (max TM-score to a reference set) and diversity (pairwise TM-scores, clustering).

Novelty of a sample of length ``L`` is ``max_r TM(sample, r)`` with TM-align's score normalised by ``L``.

Prefilters (see docs/evaluation.md):

* **exact length bound** (always on): TM-align's score normalised by ``L`` is a sum over aligned residue pairs
  of terms <= 1 divided by ``L``, and at most ``min(L, L_ref)`` pairs can be aligned, so
  ``TM <= min(L, L_ref) / L``. A reference whose bound does not exceed the best score found so far cannot raise
  the maximum and is skipped. References are visited in order of increasing distance of a cheap shape
  descriptor so that good hits are found early and the bound prunes more. The result is identical to aligning
  against every reference.
* **heuristic top-k** (``top_k``, off by default): only the ``top_k`` references nearest in descriptor space
  (among those the bound keeps) are aligned. This can miss the true maximum; it is reported as heuristic.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from .metrics import tm_align
from .reference import Reference, shape_descriptor

_REF: Reference | None = None


@dataclass
class NoveltyResult:
    max_tm: float
    best_ref: str
    n_aligned: int  # TM-align calls made
    n_skipped_bound: int  # references skipped by the exact length bound
    exact: bool  # False when the heuristic top-k filter was used


def _init_worker(ref: Reference) -> None:
    global _REF
    _REF = ref
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:
        pass


def _search(ref: Reference, ca: np.ndarray, seq: str, top_k: int | None) -> NoveltyResult:
    ca = np.asarray(ca, dtype=np.float64)
    ok = np.isfinite(ca).all(-1)
    ca = ca[ok]
    seq = "".join(np.asarray(list(seq))[ok]) if seq and len(seq) == len(ok) else None
    L = len(ca)
    if L < 3:
        return NoveltyResult(float("nan"), "", 0, 0, top_k is None)
    bound = np.minimum(ref.lengths, L) / L
    desc = shape_descriptor(ca)
    dist = np.abs(ref.descriptors - desc[None]).sum(-1)
    order = np.argsort(dist, kind="stable")
    best, best_i, n_al, n_skip, visited = -1.0, -1, 0, 0, 0
    for i in order:
        if bound[i] <= best:
            n_skip += 1
            continue
        if top_k is not None and visited >= top_k:
            break
        visited += 1
        tm = tm_align(ca, ref.chain(int(i)), seq, str(ref.sequences[i])).tm_norm_1
        n_al += 1
        if tm > best:
            best, best_i = tm, int(i)
    return NoveltyResult(float(best) if best_i >= 0 else float("nan"), str(ref.names[best_i]) if best_i >= 0 else "",
                         n_al, n_skip, top_k is None)


def _search_worker(args) -> NoveltyResult:
    ca, seq, top_k = args
    return _search(_REF, ca, seq, top_k)


def _pool(workers: int, initializer=None, initargs=()):
    import multiprocessing as mp

    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=initializer,
                               initargs=initargs)


def resolve_workers(workers: int | None) -> int:
    """``None``/``0``/negative -> all cores (``os.sched_getaffinity``)."""
    if workers is None or workers <= 0:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:
            return os.cpu_count() or 1
    return int(workers)


def iter_novelty(queries: list[tuple[np.ndarray, str]], ref: Reference, workers: int | None = 1,
                 top_k: int | None = None, progress: bool = False):
    """Yield ``(index, NoveltyResult)`` for every ``(ca, sequence)`` query, in order, as they finish
    (parallel over queries with ``workers`` processes; ``top_k=None`` is exact, see module docstring)."""
    from tqdm.auto import tqdm

    workers = resolve_workers(workers)
    jobs = [(np.asarray(ca, dtype=np.float64), seq, top_k) for ca, seq in queries]
    if not jobs:
        return
    bar = dict(total=len(jobs), disable=not progress, desc="novelty", unit="sample")
    if workers == 1 or len(jobs) == 1:
        for i, j in enumerate(tqdm(jobs, **bar)):
            yield i, _search(ref, *j)
        return
    with _pool(min(workers, len(jobs)), _init_worker, (ref,)) as ex:
        for i, r in enumerate(tqdm(ex.map(_search_worker, jobs), **bar)):
            yield i, r


def novelty(queries: list[tuple[np.ndarray, str]], ref: Reference, workers: int | None = 1,
            top_k: int | None = None, progress: bool = False) -> list[NoveltyResult]:
    """Max TM-score (normalised by each query's length) of every ``(ca, sequence)`` query to ``ref``."""
    return [r for _, r in iter_novelty(queries, ref, workers, top_k, progress)]


# ----------------------------------------------------------------------------------------------- diversity


def _pair_worker(args):
    i, j, a, b, sa, sb = args
    r = tm_align(a, b, sa, sb)
    return i, j, r.tm_norm_1, r.tm_norm_2


def pairwise_tm(cas: list[np.ndarray], seqs: list[str] | None = None, workers: int | None = 1,
                known: dict[tuple[int, int], tuple[float, float]] | None = None,
                progress: bool = False) -> np.ndarray:
    """Matrix ``T`` with ``T[i, j]`` = TM-score of structure ``i`` aligned to ``j``, normalised by the length of
    ``i`` (one TM-align per unordered pair; diagonal 1). ``known`` maps ``(i, j)`` with ``i < j`` to already
    computed ``(T[i, j], T[j, i])`` (resume)."""
    from tqdm.auto import tqdm

    n = len(cas)
    seqs = seqs or [None] * n
    t = np.eye(n)
    known = known or {}
    jobs = []
    for i in range(n):
        for j in range(i + 1, n):
            if (i, j) in known:
                t[i, j], t[j, i] = known[(i, j)]
            else:
                jobs.append((i, j, cas[i], cas[j], seqs[i], seqs[j]))
    workers = resolve_workers(workers)
    bar = dict(total=len(jobs), disable=not progress or not jobs, desc="pairwise TM", unit="pair")
    if workers == 1 or len(jobs) < 64:
        results = (_pair_worker(j) for j in jobs)
        for i, j, a, b in tqdm(results, **bar):
            t[i, j], t[j, i] = a, b
    else:
        with _pool(workers) as ex:
            for i, j, a, b in tqdm(ex.map(_pair_worker, jobs, chunksize=max(1, len(jobs) // (workers * 16))), **bar):
                t[i, j], t[j, i] = a, b
    return t


def cluster(sim: np.ndarray, threshold: float = 0.5, method: str = "greedy") -> np.ndarray:
    """Cluster labels (0..k-1) from a symmetric similarity (TM-score) matrix at ``threshold``.

    * ``greedy`` (default): repeatedly take the unassigned structure with the most unassigned neighbours
      (similarity >= threshold) as a centroid and put those neighbours in its cluster; every member has
      TM >= threshold to its centroid.
    * ``single`` / ``average`` / ``complete``: hierarchical agglomerative clustering on ``1 - sim`` cut at
      ``1 - threshold`` (scipy).
    """
    s = np.asarray(sim, dtype=np.float64)
    n = s.shape[0]
    if n == 0:
        return np.zeros(0, dtype=int)
    if n == 1:
        return np.zeros(1, dtype=int)
    if method == "greedy":
        adj = s >= threshold
        np.fill_diagonal(adj, True)
        labels = np.full(n, -1)
        k = 0
        while (labels < 0).any():
            free = labels < 0
            counts = (adj & free[None, :]).sum(1)
            counts[~free] = -1
            c = int(np.argmax(counts))
            members = adj[c] & free
            labels[members] = k
            k += 1
        return labels
    if method in ("single", "average", "complete"):
        from scipy.cluster.hierarchy import fcluster, linkage
        from scipy.spatial.distance import squareform

        d = 1.0 - 0.5 * (s + s.T)
        np.fill_diagonal(d, 0.0)
        z = linkage(squareform(np.clip(d, 0, None), checks=False), method=method)
        # clusters whose merge distance is <= 1 - threshold, i.e. similarity >= threshold
        lab = fcluster(z, t=1.0 - threshold + 1e-12, criterion="distance")
        _, labels = np.unique(lab, return_inverse=True)
        return labels
    raise ValueError(f"unknown clustering method {method!r} (greedy, single, average, complete)")


def diversity(t: np.ndarray, threshold: float = 0.5, method: str = "greedy") -> dict:
    """Pairwise TM mean (over ordered pairs i != j of ``t``) and clustering summary."""
    n = t.shape[0]
    out = {"n": n, "cluster_tm_threshold": threshold, "cluster_method": method}
    if n >= 2:
        off = ~np.eye(n, dtype=bool)
        out["pairwise_tm_mean"] = float(t[off].mean())
    else:
        out["pairwise_tm_mean"] = float("nan")
    labels = cluster(0.5 * (t + t.T), threshold, method)
    out["n_clusters"] = int(labels.max() + 1) if n else 0
    out["cluster_fraction"] = float(out["n_clusters"] / n) if n else float("nan")
    out["labels"] = labels
    return out
