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
"""
from __future__ import annotations

import json
import math
import os
import sys
import tarfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..cli.common import check_out_dir
from ..errors import UserError
from ..runs.atomic import atomic_open
from .pdb_io import (
    BACKBONE_ATOMS,
    StructureError,
    _backbone_from_chain_atoms,
    _load_atom_array,
    _protein_atoms,
    chain_break_flags,
    detect_format,
)

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

#: Residue-type order of ``aatype`` tokens (openfold / FrameDiff order), index 20 = unknown ``X``.
RESTYPES = "ARNDCQEGHILKMFPSTWYVX"
#: P-SEA secondary-structure labels: 0 = ``a`` (alpha helix), 1 = ``b`` (beta strand), 2 = ``c`` (coil).
SS_CODES = "abc"
#: A chain break precedes residue i when CA(i-1)-CA(i) exceeds this distance (Angstrom).
CA_BREAK_THRESHOLD = 4.2
FORMAT_NAME = "superdiff_protein.backbone_dataset"
FORMAT_VERSION = 1
_COORD_STEP = 0.01  # Angstrom per int16 unit (unless a chain is too large, then per-chain)
_AA_INDEX = {a: i for i, a in enumerate(RESTYPES)}


class DatasetError(RuntimeError, UserError):
    """Bad dataset input, configuration or file (message says what and where; exit code 2 in the CLI)."""


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
# packing
# ----------------------------------------------------------------------------------------------

def _chain_name(source: str, chain_id: str) -> str:
    base = source.rsplit("/", 1)[-1]
    if base.lower().endswith(".gz"):
        base = base[:-3]
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return f"{stem}_{chain_id}"


def _quantize(atoms: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    ca_ok = mask[:, 1]
    center = atoms[ca_ok, 1].astype(np.float64).mean(0) if ca_ok.any() else np.zeros(3)
    center = np.round(center, 2)
    rel = np.where(mask[..., None], atoms.astype(np.float64) - center, 0.0)
    maxabs = float(np.abs(rel).max()) if rel.size else 0.0
    scale = _COORD_STEP if maxabs / _COORD_STEP < 32767 else maxabs / 32767 * (1 + 1e-6)
    q = np.round(rel / scale).astype(np.int16)
    return q, scale, center


def decode_coords(data: dict) -> torch.Tensor:
    """(R, 4, 3) float32 coordinates (Angstrom) of all residues of a loaded dataset dict."""
    q = data["coords_q"].to(torch.float64)
    lengths = data["lengths"].to(torch.int64)
    scale = torch.repeat_interleave(data["coord_scale"].to(torch.float64), lengths)
    center = torch.repeat_interleave(data["coord_center"].to(torch.float64), lengths, dim=0)
    x = q * scale[:, None, None] + center[:, None, :]
    return (x * data["atom_mask"][..., None]).to(torch.float32)


def _pack(records: list[dict], cfg: dict, skipped: list, filtered: list, ignored: list) -> dict:
    n = len(records)
    lengths = np.array([r["atoms"].shape[0] for r in records], dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    qs, scales, centers = [], [], []
    for r in records:
        q, s, c = _quantize(r["atoms"], r["atom_mask"])
        qs.append(q)
        scales.append(s)
        centers.append(c)
    cat = lambda key, dt, shape: (np.concatenate([r[key] for r in records]).astype(dt) if n else np.zeros(shape, dt))  # noqa: E731
    ss = cat("ss", np.int8, (0,))
    ss_frac = np.zeros((n, 3), dtype=np.float32)
    for i in range(n):
        s = ss[offsets[i]:offsets[i + 1]]
        ss_frac[i] = np.bincount(s, minlength=3)[:3] / max(1, len(s))
    names, seen = [], {}
    for r in records:
        nm = _chain_name(r["source"], r["chain_id"])
        if nm in seen:
            seen[nm] += 1
            nm = f"{nm}#{seen[nm]}"
        else:
            seen[nm] = 1
        names.append(nm)
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "atom_names": list(BACKBONE_ATOMS),
        "restypes": RESTYPES,
        "ss_codes": SS_CODES,
        "break_threshold": CA_BREAK_THRESHOLD,
        "names": names,
        "sources": [r["source"] for r in records],
        "chain_ids": [r["chain_id"] for r in records],
        "sequences": [r["sequence"] for r in records],
        "lengths": torch.from_numpy(lengths.astype(np.int32)),
        "offsets": torch.from_numpy(offsets),
        "coords_q": torch.from_numpy(np.concatenate(qs) if n else np.zeros((0, 4, 3), np.int16)),
        "coord_scale": torch.tensor(scales, dtype=torch.float32),
        "coord_center": torch.from_numpy(np.array(centers, dtype=np.float32).reshape(n, 3)),
        "atom_mask": torch.from_numpy(cat("atom_mask", bool, (0, 4))),
        "res_ids": torch.from_numpy(cat("res_ids", np.int32, (0,))),
        "ss": torch.from_numpy(ss),
        "chain_break": torch.from_numpy(cat("chain_break", bool, (0,))),
        "resolution": torch.tensor([math.nan if r["resolution"] is None else r["resolution"] for r in records],
                                   dtype=torch.float32),
        "ss_frac": torch.from_numpy(ss_frac),
        "splits": {},
        "config": cfg,
        "skipped": skipped,
        "filtered": filtered,
        "ignored": ignored,
    }


# ----------------------------------------------------------------------------------------------
# splitting
# ----------------------------------------------------------------------------------------------

@dataclass
class SSSplit:
    """Two disjoint index sets (positions in the dataset file) and their SS composition."""

    helix: np.ndarray
    strand: np.ndarray
    stats: dict = field(default_factory=dict)


def _half_stats(data: dict, idx: np.ndarray) -> dict:
    ss_frac = data["ss_frac"].numpy().astype(np.float64)
    lengths = data["lengths"].numpy().astype(np.float64)
    if idx.size == 0:
        return {"chains": 0}
    w = lengths[idx]
    res_frac = (ss_frac[idx] * w[:, None]).sum(0) / w.sum()
    return {
        "chains": int(idx.size),
        "residues": int(w.sum()),
        "mean_length": float(w.mean()),
        "helix_frac": float(res_frac[0]),
        "strand_frac": float(res_frac[1]),
        "coil_frac": float(res_frac[2]),
        "chain_mean_helix_frac": float(ss_frac[idx, 0].mean()),
        "chain_mean_strand_frac": float(ss_frac[idx, 1].mean()),
    }


def split_by_secondary_structure(dataset: "FrameDataset | dict | str | os.PathLike",
                                 exclude_middle: float = 0.0) -> SSSplit:
    """Split chains into helix-rich and strand-rich halves.

    Chains are ranked by ``helix_frac - strand_frac`` (P-SEA labels; ties broken by name) and cut
    at the median: the upper half is ``helix``, the lower half ``strand`` (for an odd count the
    middle chain goes to ``strand``).  ``exclude_middle`` in [0, 1) drops that fraction of all
    chains around the median so the halves differ more.  Indices refer to chain positions in the
    dataset file (``FrameDataset.chain_indices`` space), so they are independent of any subset.
    """
    data = dataset.data if isinstance(dataset, FrameDataset) else (
        dataset if isinstance(dataset, dict) else load_dataset_file(dataset))
    if not 0.0 <= exclude_middle < 1.0:
        raise DatasetError(f"exclude_middle must be in [0, 1), got {exclude_middle}")
    ss_frac = data["ss_frac"].numpy().astype(np.float64)
    n = ss_frac.shape[0]
    score = ss_frac[:, 0] - ss_frac[:, 1]
    names = np.array(data["names"], dtype=object)
    # descending score, ascending name
    order = np.array(sorted(range(n), key=lambda i: (-score[i], names[i])), dtype=np.int64)
    n_drop = int(round(exclude_middle * n))
    n_top = (n - n_drop) // 2
    helix = np.sort(order[:n_top])
    strand = np.sort(order[n_top + n_drop:])
    stats = {
        "method": "median of helix_frac - strand_frac (P-SEA)",
        "exclude_middle": exclude_middle,
        "excluded": int(n_drop),
        "helix": _half_stats(data, helix),
        "strand": _half_stats(data, strand),
        "score_threshold": float(score[order[n_top - 1]]) if n_top > 0 else None,
    }
    return SSSplit(helix=helix, strand=strand, stats=stats)


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


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------

_REQUIRED_KEYS = ("names", "lengths", "offsets", "coords_q", "coord_scale", "coord_center", "atom_mask",
                  "sequences", "ss", "chain_break", "ss_frac")


def load_dataset_file(path: str | os.PathLike) -> dict:
    """Load and validate a dataset file written by :func:`prepare_dataset` (allow-listed loader: no code runs)."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset file not found: {p}")
    from .checkpoints import CheckpointError, load_checkpoint_file

    try:
        data = load_checkpoint_file(p, "cpu")
    except CheckpointError as e:
        raise DatasetError(f"not a readable dataset file: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise DatasetError(f"{p}: not a superdiff_protein dataset file (missing format tag {FORMAT_NAME!r})")
    if data.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{p}: dataset format version {data.get('version')} unsupported (need {FORMAT_VERSION})")
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise DatasetError(f"{p}: dataset file lacks keys {missing}")
    return data


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


def collate_frames(batch: list[dict]) -> dict:
    """Pad a list of :class:`FrameDataset` items to the longest one.

    Padding: zeros everywhere, ``res_mask``/``atom_mask`` False/0, identity ``rotmats``,
    ``aatype`` 20 (X), ``ss`` 2 (coil).  ``name``/``index``/``length`` become lists / tensors.
    """
    n_max = max(int(b["length"]) for b in batch)
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
