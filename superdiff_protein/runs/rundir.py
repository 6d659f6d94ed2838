"""The run directory of ``generate_backbones``: its layout, the ``samples.csv`` schema, and every file a
generation run writes or reads back there (except plots: :mod:`superdiff_protein.runs.plots`).

Layout (``layout=flat``, the default)::

    run_dir/config.yaml                       resolved config of the run
    run_dir/samples.csv                       one row per complete sample (rewritten atomically)
    run_dir/length_{L}/sample_{i}.pdb         backbone N, CA, C, O in Angstrom
    run_dir/length_{L}/sample_{i}_traj.pdb    with save_traj=true
    run_dir/length_{L}/sample_{i}_traces.npz  kappa and log q per step, model and component
    run_dir/length_{L}/kappa_traces.png, logq_traces.png

``layout=framediff`` puts each sample in FrameDiff's per-sample folder instead
(``experiments/inference_se3_diffusion.py`` of jasonkyuyim/se3_diffusion @ 53359d7):
``length_{L}/sample_{i}/sample_1.pdb``, ``bb_traj_1.pdb`` and ``traces.npz``.

Readers (``eval``) use :func:`read_samples`, :func:`sample_pdb` and the column names below; the writer
(``superdiff_protein.frames.generation``) uses :func:`samples_columns` for the header, so both read one schema.

``samples.csv`` columns, in order (:func:`samples_columns`): ``id, length, sample, seed`` (the sample's own
seed), the sampling settings (``models`` = the model labels joined by ``;``, ``rule``, ``temperature``,
``bias``, ``bias_convention`` only when it is not ``algorithm1``, ``kappa_scope``, ``estimator``,
``noise_scale``, ``num_steps``), ``final`` (``prediction``/``state``), ``final_model``, then the final
``kappa.<model>`` (``kappa.<model>.<component>`` with per-component kappas), ``logq.<model>.<component>`` and
``logq.<model>`` of each model, ``wall_time_s``, and the paths (relative to the run directory)
``pdb_path``, ``traj_path`` (empty without trajectory), ``traces_path``.
"""
from __future__ import annotations

import csv
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import UserError
from .atomic import atomic_open

__all__ = [
    "SAMPLES_CSV", "CONFIG_YAML", "LAYOUTS", "KEY_COLUMNS", "SETTING_COLUMNS", "PDB_COLUMN", "TRAJ_COLUMN",
    "TRACES_COLUMN", "PATH_COLUMNS", "RunDirError", "sample_files", "samples_columns", "read_samples",
    "read_rows", "write_rows", "sample_pdb", "row_key", "complete_rows", "shard_csv", "shard_csvs", "lock_name",
    "RunLock", "prepare_run_dir", "remove_stale_temp_files", "read_run_config", "write_run_config",
    "check_resume", "write_traces", "merge_shard", "fold_shard_csvs",
]

SAMPLES_CSV = "samples.csv"
CONFIG_YAML = "config.yaml"
LAYOUTS = ("flat", "framediff")

#: the first columns of every row: which sample it is
KEY_COLUMNS = ("id", "length", "sample", "seed")
#: the sampling settings every row repeats (``bias_convention`` only when it is not the default, ``algorithm1``)
SETTING_COLUMNS = ("models", "rule", "temperature", "bias", "bias_convention", "kappa_scope", "estimator",
                   "noise_scale", "num_steps")
PDB_COLUMN = "pdb_path"
TRAJ_COLUMN = "traj_path"
TRACES_COLUMN = "traces_path"
PATH_COLUMNS = (PDB_COLUMN, TRAJ_COLUMN, TRACES_COLUMN)


class RunDirError(RuntimeError, UserError):
    """A run directory that cannot be used: unreadable files, another run writing it, other settings."""

    exit_code = 2


# ------------------------------------------------------------------------------------------ layout
def sample_files(length: int, index: int, layout: str = "flat") -> dict[str, str]:
    """Paths (relative to the run directory) of sample ``index`` of length ``length``: ``pdb``, ``traj``,
    ``traces``. ``flat``: ``length_L/sample_i.pdb`` (+ ``_traj.pdb``, ``_traces.npz``); ``framediff``:
    FrameDiff's per-sample folder ``length_L/sample_i/`` with ``sample_1.pdb``, ``bb_traj_1.pdb`` and our
    ``traces.npz``."""
    if layout == "framediff":
        d = f"length_{length}/sample_{index}"
        return {"pdb": f"{d}/sample_1.pdb", "traj": f"{d}/bb_traj_1.pdb", "traces": f"{d}/traces.npz"}
    return {"pdb": f"length_{length}/sample_{index}.pdb", "traj": f"length_{length}/sample_{index}_traj.pdb",
            "traces": f"length_{length}/sample_{index}_traces.npz"}


def samples_columns(labels: Sequence[str], components: Sequence[str], kappa_scope: str = "joint",
                    bias_convention: str = "algorithm1") -> list[str]:
    """The ``samples.csv`` header of a run of models ``labels`` on state components ``components``
    (module docstring); the default bias convention's columns stay as they were before it existed."""
    settings = [c for c in SETTING_COLUMNS if c != "bias_convention" or bias_convention != "algorithm1"]
    cols = [*KEY_COLUMNS, *settings, "final", "final_model"]
    for lab in labels:
        if kappa_scope == "joint":
            cols.append(f"kappa.{lab}")
        else:
            cols += [f"kappa.{lab}.{c}" for c in components]
    for lab in labels:
        cols += [f"logq.{lab}.{c}" for c in components] + [f"logq.{lab}"]
    return cols + ["wall_time_s", *PATH_COLUMNS]


# ------------------------------------------------------------------------------------------ samples.csv
def shard_csv(rank: int, world: int) -> str:
    """File name of the rows of shard ``rank`` of ``world`` (``samples.csv`` when unsharded)."""
    return SAMPLES_CSV if world == 1 else f"samples.shard-{rank}-of-{world}.csv"


def shard_csvs(run_dir: str | os.PathLike) -> list[Path]:
    """Shard files of ``samples.csv`` left in ``run_dir`` (sorted)."""
    return sorted(Path(run_dir).glob("samples.shard-*.csv"))


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of one CSV file (``[]`` when absent); raises :class:`RunDirError` when it is unreadable."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: cannot read the existing samples.csv ({e}); move it away or use a new out_dir")


def read_samples(run_dir: str | os.PathLike) -> list[dict]:
    """Rows of ``run_dir/samples.csv`` plus those of shard files left by sharded runs (later files win), as
    dicts of strings keyed by column name; ``[]`` when there is none. Raises :class:`RunDirError` when a file
    is unreadable."""
    rows: dict[tuple[str, str], dict] = {}
    for p in [Path(run_dir) / SAMPLES_CSV] + shard_csvs(run_dir):
        for r in read_rows(p):
            rows[(r.get("length", ""), r.get("sample", ""))] = r
    return list(rows.values())


def sample_pdb(run_dir: str | os.PathLike, row: Mapping[str, Any]) -> Path | None:
    """The PDB file of a ``samples.csv`` row (its ``pdb_path``, relative to ``run_dir`` unless absolute);
    None when the row names none."""
    p = row.get(PDB_COLUMN)
    if not p:
        return None
    q = Path(p)
    return q if q.is_absolute() else Path(run_dir) / q


def row_key(row: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(length, sample)`` of a row, None when either is not a non-negative integer."""
    L, i = str(row.get("length", "")), str(row.get("sample", ""))
    return (int(L), int(i)) if L.isdigit() and i.isdigit() else None


def complete_rows(run_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> dict[tuple[int, int], dict]:
    """``{(length, sample): row}`` of the rows whose PDB file exists (a sample is complete when its PDB and
    its row exist; rows whose PDB vanished are to be redone)."""
    out = {}
    for r in rows:
        k = row_key(r)
        if k is not None and r.get(PDB_COLUMN) and (Path(run_dir) / r[PDB_COLUMN]).is_file():
            out[k] = dict(r)
    return out


def write_rows(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> None:
    """Write ``rows`` sorted by (length, sample) atomically, ``cols`` first, then any other column of the rows."""
    rows = sorted(rows, key=lambda r: (int(r["length"]), int(r["sample"])))
    allcols = list(dict.fromkeys(list(cols) + [c for r in rows for c in r if c not in cols]))
    with atomic_open(path, "w", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=allcols, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in allcols})


# ------------------------------------------------------------------------------------------ lock
def lock_name(rank: int = 0, world: int = 1) -> str:
    """The lock file of a run (one per shard when sharded)."""
    return ".generate.lock" if world == 1 else f".generate.shard-{rank}-of-{world}.lock"


class RunLock:
    """``run_dir/<name>`` (O_EXCL, holds the pid): two runs never write one directory at once. A lock left
    by a killed run (its pid is gone) is taken over."""

    def __init__(self, run_dir: str | os.PathLike, name: str = ".generate.lock"):
        self.path = Path(run_dir) / name
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        for _ in range(2):
            try:
                self.fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.write(self.fd, str(os.getpid()).encode())
                return self
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid > 0 and pid != os.getpid() and _pid_alive(pid):
                    raise RunDirError(f"out_dir: another generate_backbones run (pid {pid}) is writing to "
                                      f"{self.path.parent}; wait for it or remove {self.path} if it is gone")
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
        raise RunDirError(f"out_dir: cannot lock {self.path.parent}")

    def __exit__(self, *exc: Any) -> bool:
        if self.fd is not None:
            os.close(self.fd)
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------ directory
def prepare_run_dir(run_dir: str | os.PathLike) -> None:
    """Create ``run_dir`` and check that it is a writable directory."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"out_dir: cannot create {run_dir} ({e.strerror or e})") from None
    if not run_dir.is_dir():
        raise RunDirError(f"out_dir: {run_dir} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write_test.", dir=run_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise RunDirError(f"out_dir: {run_dir} is not writable ({e.strerror or e})") from None


def remove_stale_temp_files(run_dir: str | os.PathLike) -> None:
    """Temporary files of atomic writes left by a killed run (``.<name>.<random>.tmp``)."""
    run_dir = Path(run_dir)
    for d in [run_dir, *run_dir.glob("length_*"), *run_dir.glob("length_*/sample_*")]:
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                try:
                    p.unlink()
                except OSError:
                    pass


# ------------------------------------------------------------------------------------------ config.yaml
def read_run_config(run_dir: str | os.PathLike) -> dict | None:
    """The ``config.yaml`` of a previous run (None when absent); raises :class:`RunDirError` when unreadable."""
    p = Path(run_dir) / CONFIG_YAML
    if not p.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    except Exception as e:
        raise RunDirError(f"{p}: unreadable config of a previous run ({e}); use a new out_dir") from None


def write_run_config(run_dir: str | os.PathLike, cfg: Mapping[str, Any]) -> None:
    """Write ``config.yaml`` (OmegaConf's YAML of ``cfg``) atomically."""
    from omegaconf import OmegaConf

    with atomic_open(Path(run_dir) / CONFIG_YAML, "w", encoding="utf-8") as fh:
        fh.write(OmegaConf.to_yaml(OmegaConf.create(dict(cfg))))


def check_resume(run_dir: str | os.PathLike, cfg: Mapping[str, Any],
                 canon: Callable[[Mapping[str, Any]], dict]) -> None:
    """Refuse to resume into ``run_dir`` when its ``config.yaml`` differs from ``cfg`` in a sample-defining
    setting; ``canon`` maps a config to its sample-defining part, normalised for comparison."""
    old = read_run_config(run_dir)
    if old is None:
        return
    a, b = canon(old), canon(cfg)
    diffs = [f"{k}: {a[k]!r} -> {b[k]!r}" for k in b if a.get(k) != b[k]]
    if diffs:
        raise RunDirError(f"{run_dir} holds samples made with other settings ({'; '.join(diffs)}); "
                          "resuming would mix them: use a new out_dir (or the previous settings)")


# ------------------------------------------------------------------------------------------ traces
def write_traces(path: str | os.PathLike, **arrays: Any) -> None:
    """A sample's traces (``np.savez_compressed`` of ``arrays``), written atomically."""
    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with atomic_open(path, "wb", encoding=None) as fh:
        fh.write(buf.getvalue())


# ------------------------------------------------------------------------------------------ shards
def merge_shard(run_dir: str | os.PathLike, shard_path: str | os.PathLike, cols: Sequence[str],
                timeout_s: float = 600.0) -> dict[tuple[int, int], dict]:
    """Fold one shard's rows into ``samples.csv`` (under a lock, so shards can finish in any order) and
    remove the shard file. Returns all rows now in ``samples.csv``, keyed by (length, sample)."""
    run_dir, shard_path = Path(run_dir), Path(shard_path)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with RunLock(run_dir, ".samples_csv.lock"):
                rows = {(int(r["length"]), int(r["sample"])): r for r in read_rows(run_dir / SAMPLES_CSV)}
                for r in read_rows(shard_path):
                    rows[(int(r["length"]), int(r["sample"]))] = r
                write_rows(run_dir / SAMPLES_CSV, list(rows.values()), cols)
                shard_path.unlink(missing_ok=True)
                return rows
        except RunDirError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def fold_shard_csvs(run_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> None:
    """An unsharded run into a directory of an interrupted sharded run: write ``rows`` (which include the
    shard files' rows) to ``samples.csv`` and remove the shard files; nothing when there is none."""
    shards = shard_csvs(run_dir)
    if not shards:
        return
    write_rows(Path(run_dir) / SAMPLES_CSV, rows, cols)
    for p in shards:
        p.unlink(missing_ok=True)
