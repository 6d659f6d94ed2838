"""The samples an evaluation works on: one :class:`Sample` per structure file, its resumable per-sample JSON
cache (``<out_dir>/cache/<key>.json``, one fingerprinted section per stage) and its ``samples.csv`` metadata.

``samples.csv`` is read through the run-directory API of :mod:`superdiff_protein.runs.rundir` (the schema
``generate_backbones`` writes): rows are matched to files by their ``pdb_path`` column.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from superdiff_protein.runs.rundir import SAMPLES_CSV, RunDirError, read_rows, sample_pdb

from .io import Backbone, atomic_write_json

__all__ = ["CACHE_VERSION", "Sample", "log", "fingerprint", "file_hash", "safe_key", "cache_file", "load_cache",
           "save_cache", "read_samples_csv", "group_of"]

CACHE_VERSION = 1


def log(msg: str) -> None:
    """One progress or warning line of ``evaluate_backbones`` on stderr."""
    print(f"[evaluate_backbones] {msg}", file=sys.stderr, flush=True)


def fingerprint(obj: Any) -> str:
    """Short stable hash of the settings a cached section depends on (JSON, sorted keys)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_hash(path: Path) -> str:
    """Short hash of a file's content (a changed file invalidates its cache)."""
    return hashlib.sha1(path.read_bytes()).hexdigest()[:16]


def safe_key(rel: str) -> str:
    """File-name-safe key of a sample path relative to samples_dir (``length_60/sample_0.pdb`` ->
    ``length_60__sample_0.pdb``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "__", rel)


def cache_file(out_dir: str | Path, rel_path: str) -> Path:
    """Per-sample cache JSON of the sample at ``rel_path`` (relative to samples_dir)."""
    return Path(out_dir) / "cache" / f"{safe_key(rel_path)}.json"


@dataclass
class Sample:
    """One structure file under evaluation: its paths, ``samples.csv`` row, cache and parsed backbone."""

    path: Path
    rel: str
    key: str
    meta: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    backbone: Backbone | None = None
    dirty: bool = False

    @property
    def sections(self) -> dict:
        """The cached stage results, by stage name (``structure``, ``mpnn``, ``fold``, ``novelty``, ...)."""
        return self.cache.setdefault("sections", {})

    def done(self, section: str, fp: str) -> bool:
        """True when ``section`` is cached for the settings fingerprint ``fp`` and did not fail."""
        s = self.sections.get(section)
        return bool(s) and s.get("_fp") == fp and "error" not in s

    def put(self, section: str, fp: str, value: dict) -> None:
        """Cache the result of ``section`` under the settings fingerprint ``fp``."""
        value = dict(value)
        value["_fp"] = fp
        self.sections[section] = value
        self.dirty = True

    def error(self, section: str, fp: str, exc: BaseException | str) -> None:
        """Record that ``section`` failed (the message goes to the ``error`` column; retried next run)."""
        msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self.sections[section] = {"_fp": fp, "error": str(msg)[:500]}
        self.dirty = True


def load_cache(sample: Sample, cache_dir: Path, resume: bool) -> None:
    """Attach the sample's cache: the file's when ``resume`` and it matches the content hash, else empty."""
    f = cache_dir / f"{sample.key}.json"
    h = file_hash(sample.path)
    if resume and f.is_file():
        try:
            c = json.loads(f.read_text())
            if c.get("version") == CACHE_VERSION and c.get("file_hash") == h:
                sample.cache = c
                sample.dirty = False
                return
        except (OSError, json.JSONDecodeError):
            pass
    sample.cache = {"version": CACHE_VERSION, "file_hash": h, "path": sample.rel, "sections": {}}
    sample.dirty = True


def save_cache(sample: Sample, cache_dir: Path) -> None:
    """Write the sample's cache (atomically) when it changed."""
    if sample.dirty:
        atomic_write_json(cache_dir / f"{sample.key}.json", sample.cache)
        sample.dirty = False


def read_samples_csv(samples_dir: Path) -> dict[str, dict]:
    """Rows of ``<samples_dir>/samples.csv`` keyed by the resolved path of their ``pdb_path`` file
    (:func:`superdiff_protein.runs.rundir.sample_pdb`); rows without one are ignored, an unreadable file is a
    warning (grouping goes on without it)."""
    f = samples_dir / SAMPLES_CSV
    try:
        rows = read_rows(f)
    except RunDirError as exc:
        log(f"warning: cannot read {f} ({exc.__context__ or exc}); grouping without it")
        return {}
    out = {}
    for row in rows:
        q = sample_pdb(samples_dir, row)
        if q is None:
            continue
        out[str(q.resolve())] = {k: v for k, v in row.items() if k is not None}
    return out


def group_of(meta: dict) -> str:
    """Method label: ``method`` column, else ``rule`` + ``models``, else ``all``."""
    if meta.get("method"):
        return str(meta["method"])
    parts = [str(meta[c]) for c in ("rule", "models") if meta.get(c)]
    return ":".join(parts) if parts else "all"
