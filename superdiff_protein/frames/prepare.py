"""``prepare_dataset``: PDB / mmCIF structures (a directory, a tar archive or one file) -> one dataset file.

Each input is parsed and filtered in a worker process (:func:`_process`: first model, one protein chain,
residues with N, CA and C, P-SEA secondary structure, length / gap / break / resolution filters); the kept
chains are packed into the file of :mod:`superdiff_protein.frames.dataset_file`, with a sidecar
``<output>.log.json`` listing every skipped (unreadable / non-protein) and filtered file. Console script:
:mod:`superdiff_protein.cli.prepare_dataset` (Hydra config ``configs/prepare_dataset.yaml``).
"""
from __future__ import annotations

import json
import os
import sys
import tarfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from ..runs.atomic import atomic_open
from ..runs.checks import check_out_dir
from ..runs.structures import (
    StructureError,
    _backbone_from_chain_atoms,
    _load_atom_array,
    _protein_atoms,
    chain_break_flags,
    detect_format,
)
from .dataset_file import CA_BREAK_THRESHOLD, SS_CODES, DatasetError, _pack, split_by_secondary_structure

__all__ = ["PrepareConfig", "PrepareSummary", "prepare_dataset"]


# ----------------------------------------------------------------------------------------------
# per-file processing (runs in worker processes)
# ----------------------------------------------------------------------------------------------

@dataclass
class PrepareConfig:
    """Options of :func:`prepare_dataset` (same keys as ``configs/prepare_dataset.yaml``)."""

    input_dir: str = ""
    output: str = ""
    min_length: int = 40
    max_length: int = 300
    max_gap: int | None = None
    max_breaks: int | None = None
    max_resolution: float | None = None
    chain: str | None = None
    split: str | None = "ss"
    split_exclude_middle: float = 0.0
    num_workers: int = 1
    progress: bool = True


def _gap_lengths(res_ids: np.ndarray, breaks: np.ndarray) -> np.ndarray:
    """Missing-residue count of each chain break: ``max(1, res_id[i] - res_id[i-1] - 1)``."""
    idx = np.nonzero(breaks)[0]
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.maximum(1, res_ids[idx] - res_ids[idx - 1] - 1)


def _process(item: tuple[str, str, bytes | None], cfg: dict) -> dict:
    """Parse one structure and apply the filters. Never raises: returns a status dict."""
    import biotite.structure as struc

    source, label, payload = item
    try:
        fmt, gz = detect_format(source)
        if payload is None:
            try:
                payload = Path(label).read_bytes()
            except OSError as e:
                raise StructureError(f"{source}: cannot read file ({e.strerror or e})") from e
        if gz:
            import gzip

            try:
                payload = gzip.decompress(payload)
            except (OSError, EOFError) as e:
                raise StructureError(f"{source}: corrupt gzip data ({e})") from e
        arr, resolution = _load_atom_array(payload, fmt, source)
        prot, chain = _protein_atoms(arr, source, cfg.get("chain"))
        bb = _backbone_from_chain_atoms(prot, chain, source, resolution)
        try:
            sse = np.asarray(struc.annotate_sse(prot))
        except Exception as e:  # pragma: no cover - biotite failure on odd geometry
            raise StructureError(f"{source}: secondary-structure annotation failed: {e}") from e
        if sse.shape[0] != len(bb):  # pragma: no cover - defensive
            raise StructureError(f"{source}: internal residue count mismatch")
    except StructureError as e:
        return {"status": "skipped", "source": source, "reason": str(e)}
    except Exception as e:  # anything unexpected is still not fatal for the whole run
        return {"status": "skipped", "source": source, "reason": f"{source}: {type(e).__name__}: {e}"}

    keep = bb.has_frame_atoms
    n_dropped = int((~keep).sum())
    bb = bb.select(keep)
    sse = sse[keep]
    L = len(bb)
    if L == 0:
        return {"status": "skipped", "source": source,
                "reason": f"{source}: no residue with all of N, CA, C; not a usable protein chain"}
    breaks = chain_break_flags(bb.ca, None, CA_BREAK_THRESHOLD)
    gaps = _gap_lengths(bb.res_ids, breaks)
    reason = which = None
    if cfg.get("max_resolution") is not None and resolution is not None and resolution > cfg["max_resolution"]:
        which, reason = "max_resolution", f"resolution {resolution:.2f} A > max_resolution {cfg['max_resolution']}"
    elif cfg.get("min_length") is not None and L < cfg["min_length"]:
        which, reason = "min_length", f"length {L} < min_length {cfg['min_length']}"
    elif cfg.get("max_length") is not None and L > cfg["max_length"]:
        which, reason = "max_length", f"length {L} > max_length {cfg['max_length']}"
    elif cfg.get("max_gap") is not None and gaps.size and int(gaps.max()) > cfg["max_gap"]:
        which = "max_gap"
        reason = f"largest chain break of {int(gaps.max())} missing residue(s) > max_gap {cfg['max_gap']}"
    elif cfg.get("max_breaks") is not None and int(breaks.sum()) > cfg["max_breaks"]:
        which, reason = "max_breaks", f"{int(breaks.sum())} chain breaks > max_breaks {cfg['max_breaks']}"
    if reason is not None:
        return {"status": "filtered", "source": source, "filter": which, "reason": reason, "length": L}
    ss = np.array([SS_CODES.index(s) if s in SS_CODES else 2 for s in sse], dtype=np.int8)
    return {
        "status": "ok", "source": source, "chain_id": bb.chain_id, "atoms": bb.atoms.astype(np.float32),
        "atom_mask": bb.atom_mask, "sequence": bb.sequence, "res_ids": bb.res_ids.astype(np.int32),
        "ss": ss, "chain_break": breaks, "resolution": resolution, "dropped_residues": n_dropped,
    }


def _process_chunk(items: list, cfg: dict) -> list[dict]:
    return [_process(it, cfg) for it in items]


# ----------------------------------------------------------------------------------------------
# input enumeration
# ----------------------------------------------------------------------------------------------

def _is_structure_name(name: str) -> bool:
    try:
        detect_format(name)
        return True
    except StructureError:
        return False


def _is_tar(path: Path) -> bool:
    n = path.name.lower()
    return path.is_file() and (n.endswith((".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2"))
                               or (not _is_structure_name(n) and tarfile.is_tarfile(path)))


def _iter_inputs(input_path: Path, ignored: list[str]) -> Iterator[tuple[str, str, bytes | None]]:
    """Yield ``(source_name, path_or_member, payload_or_None)``; unsupported names go to ``ignored``."""
    if input_path.is_dir():
        for p in sorted(input_path.rglob("*")):
            if not p.is_file() or any(part.startswith(".") for part in p.relative_to(input_path).parts):
                continue
            rel = p.relative_to(input_path).as_posix()
            if _is_structure_name(p.name):
                yield rel, str(p), None
            else:
                ignored.append(rel)
    elif _is_tar(input_path):
        try:
            with tarfile.open(input_path, mode="r|*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    if base.startswith(".") or not _is_structure_name(base):
                        ignored.append(m.name)
                        continue
                    fh = tf.extractfile(m)
                    yield m.name, m.name, fh.read() if fh is not None else b""
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DatasetError(f"{input_path}: cannot read archive ({type(e).__name__}: {e})") from e
    elif input_path.is_file():
        if not _is_structure_name(input_path.name):
            raise DatasetError(f"{input_path}: neither a directory, a tar archive nor a PDB/mmCIF file")
        yield input_path.name, str(input_path), None
    else:
        raise DatasetError(f"input_dir does not exist: {input_path}")


def _chunks(it: Iterable, n: int) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


# ----------------------------------------------------------------------------------------------
# prepare_dataset
# ----------------------------------------------------------------------------------------------

@dataclass
class PrepareSummary:
    """What :func:`prepare_dataset` did."""

    output: str
    log: str
    kept: int
    residues: int
    skipped: list
    filtered: list
    ignored: list
    file_bytes: int
    seconds: float
    split: dict | None = None

    def text(self, max_list: int = 20) -> str:
        """Human-readable multi-line summary (used by the CLI)."""
        lines = [f"kept {self.kept} chains ({self.residues} residues) -> {self.output} "
                 f"({self.file_bytes / 1e6:.1f} MB) in {self.seconds:.0f} s"]
        if self.filtered:
            by: dict[str, int] = {}
            for f in self.filtered:
                by[f["filter"]] = by.get(f["filter"], 0) + 1
            lines.append(f"filtered {len(self.filtered)}: " + ", ".join(f"{k} {v}" for k, v in sorted(by.items())))
        lines.append(f"skipped {len(self.skipped)} unreadable / non-protein file(s)"
                     + (":" if self.skipped else ""))
        for s in self.skipped[:max_list]:
            lines.append(f"  - {s['reason']}")
        if len(self.skipped) > max_list:
            lines.append(f"  ... {len(self.skipped) - max_list} more in {self.log}")
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} file(s) with unsupported names (listed in {self.log})")
        if self.split:
            for half in ("helix", "strand"):
                h = self.split[half]
                if h.get("chains"):
                    lines.append(f"split {half}: {h['chains']} chains, helix {h['helix_frac']:.2f} "
                                 f"strand {h['strand_frac']:.2f} coil {h['coil_frac']:.2f} "
                                 f"mean length {h['mean_length']:.0f}")
        lines.append(f"full log: {self.log}")
        return "\n".join(lines)


def _validate(cfg: PrepareConfig) -> None:
    def _int(name, v, lo):
        if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo):
            raise DatasetError(f"{name} must be an integer >= {lo} or null, got {v!r}")

    if not cfg.input_dir:
        raise DatasetError("input_dir is required (a directory, a .tar/.tar.xz archive or a structure file)")
    if not cfg.output:
        raise DatasetError("output is required (path of the dataset file to write, e.g. data/pdownb.pt)")
    _int("min_length", cfg.min_length, 1)
    _int("max_length", cfg.max_length, 1)
    _int("max_gap", cfg.max_gap, 0)
    _int("max_breaks", cfg.max_breaks, 0)
    _int("num_workers", cfg.num_workers, 0)
    if cfg.min_length is not None and cfg.max_length is not None and cfg.min_length > cfg.max_length:
        raise DatasetError(f"min_length {cfg.min_length} > max_length {cfg.max_length}")
    if cfg.max_resolution is not None and not (isinstance(cfg.max_resolution, (int, float)) and cfg.max_resolution > 0):
        raise DatasetError(f"max_resolution must be a positive number or null, got {cfg.max_resolution!r}")
    if cfg.split not in (None, "ss", "none"):
        raise DatasetError(f"split must be 'ss' or null, got {cfg.split!r}")
    x = cfg.split_exclude_middle
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= float(x) < 1.0:
        raise DatasetError(f"split_exclude_middle must be a number in [0, 1), got {x!r}")
    if not isinstance(cfg.progress, bool):
        raise DatasetError(f"progress must be true or false, got {cfg.progress!r}")


def prepare_dataset(input_dir: str | os.PathLike, output: str | os.PathLike, **options: Any) -> PrepareSummary:
    """Build a dataset file from a directory, tar archive or single PDB/mmCIF file.

    Options are the fields of :class:`PrepareConfig` (``min_length``, ``max_length``, ``max_gap``,
    ``max_breaks``, ``max_resolution``, ``chain``, ``split``, ``split_exclude_middle``,
    ``num_workers``, ``progress``).  Unreadable / non-protein inputs are skipped and listed, never
    fatal.  Writes ``output`` and ``<output>.log.json`` atomically.

    Raises:
        DatasetError: invalid options, missing input, unreadable archive, unwritable output, or no
            chain left after filtering.
    """
    unknown = set(options) - set(PrepareConfig.__dataclass_fields__)
    if unknown:
        raise DatasetError(f"unknown option(s): {sorted(unknown)}")
    cfg = PrepareConfig(input_dir=str(input_dir), output=str(output), **options)
    if cfg.split == "none":
        cfg.split = None
    _validate(cfg)
    t0 = time.time()
    in_path = Path(cfg.input_dir).expanduser()
    out_path = Path(cfg.output).expanduser()
    log_path = out_path.with_name(out_path.name + ".log.json")
    check_out_dir(out_path, "output", DatasetError, file_ok=True)   # checked now, created only when writing
    if not in_path.exists():
        raise DatasetError(f"input_dir does not exist: {in_path}")

    worker_cfg = {k: getattr(cfg, k) for k in ("min_length", "max_length", "max_gap", "max_breaks",
                                               "max_resolution", "chain")}
    ignored: list[str] = []
    results: list[dict] = []
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = (tqdm(desc="prepare_dataset", unit="file", disable=not cfg.progress, file=sys.stderr, mininterval=0.5)
           if tqdm else None)

    def _collect(res: list[dict]) -> None:
        results.extend(res)
        if bar is not None:
            bar.update(len(res))
            bar.set_postfix(kept=sum(r["status"] == "ok" for r in results), refresh=False)

    items = _iter_inputs(in_path, ignored)
    chunk = 8
    try:
        if cfg.num_workers <= 1:
            for c in _chunks(items, chunk):
                _collect(_process_chunk(c, worker_cfg))
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(max_workers=cfg.num_workers, mp_context=mp.get_context("spawn")) as ex:
                pending = set()
                for c in _chunks(items, chunk):
                    pending.add(ex.submit(_process_chunk, c, worker_cfg))
                    if len(pending) >= 4 * cfg.num_workers:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in done:
                            _collect(f.result())
                for f in pending:
                    _collect(f.result())
    finally:
        if bar is not None:
            bar.close()

    results.sort(key=lambda r: r["source"])
    records = [r for r in results if r["status"] == "ok"]
    skipped = [{"file": r["source"], "reason": r["reason"]} for r in results if r["status"] == "skipped"]
    filtered = [{"file": r["source"], "filter": r["filter"], "reason": r["reason"]}
                for r in results if r["status"] == "filtered"]
    if not records:
        raise DatasetError(
            f"no chain left from {in_path}: {len(results)} structure file(s) seen, {len(skipped)} skipped, "
            f"{len(filtered)} filtered, {len(ignored)} ignored (unsupported names)"
            + (f"; first skip reason: {skipped[0]['reason']}" if skipped else "")
            + (f"; first filter reason: {filtered[0]['file']}: {filtered[0]['reason']}" if filtered else "")
        )
    config_dict = {k: v for k, v in asdict(cfg).items() if k != "progress"}
    data = _pack(records, config_dict, skipped, filtered, ignored)
    split_stats = None
    if cfg.split == "ss":
        sp = split_by_secondary_structure(data, exclude_middle=float(cfg.split_exclude_middle))
        data["splits"]["ss"] = {"helix": torch.from_numpy(sp.helix), "strand": torch.from_numpy(sp.strand),
                                "stats": sp.stats}
        split_stats = sp.stats
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot create output directory {out_path.parent}: {e.strerror or e}") from e
    try:
        with atomic_open(out_path, "wb") as fh:
            torch.save(data, fh)
        file_bytes = out_path.stat().st_size
        log = {
            "output": str(out_path), "file_bytes": file_bytes, "config": config_dict,
            "kept": len(records), "residues": int(data["lengths"].sum()),
            "dropped_incomplete_residues": int(sum(r["dropped_residues"] for r in records)),
            "skipped": skipped, "filtered": filtered, "ignored": ignored, "split": split_stats,
            "seconds": round(time.time() - t0, 2),
        }
        with atomic_open(log_path, "w", encoding="utf-8") as fh:
            json.dump(log, fh, indent=1)
    except OSError as e:
        raise DatasetError(f"cannot write {out_path}: {e}") from e
    return PrepareSummary(output=str(out_path), log=str(log_path), kept=len(records),
                          residues=int(data["lengths"].sum()), skipped=skipped, filtered=filtered,
                          ignored=ignored, file_bytes=file_bytes, seconds=time.time() - t0, split=split_stats)
