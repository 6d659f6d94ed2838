"""The ``evaluate_backbones`` pipeline: per-sample metrics with a resumable per-sample JSON cache, then
novelty, diversity, the grouped table, summary and plots. Entry point :func:`evaluate`.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadInputError, ModelUnavailableError, StructureReadError
from .io import MIN_RESIDUES, Backbone, atomic_write_json, atomic_write_text, discover_structures, \
    read_backbone, write_backbone_pdb
from .metrics import structure_metrics

CACHE_VERSION = 1
CONTRACT_COLUMNS = ["path", "length", "novelty_max_tm", "helix_frac", "strand_frac", "coil_frac", "sc_rmsd",
                    "sc_tm", "designable"]
METRIC_COLUMNS = [
    "path", "id", "method", "length", "error",
    "novelty_max_tm", "novelty_best_ref", "novelty_refold_max_tm",
    "helix_frac", "strand_frac", "coil_frac",
    "sc_rmsd", "sc_tm", "plddt", "designable", "sc_rmsd_mean", "sc_best_seq",
    "mpnn_ll", "mpnn_ll_best", "mpnn_model",
    "ca_ca_mean", "ca_ca_std", "ca_ca_max", "ca_ca_valid_frac", "n_chain_breaks",
    "n_ca_clashes", "n_bb_clashes", "radius_of_gyration", "full_backbone", "cluster",
]


def log(msg: str) -> None:
    print(f"[evaluate_backbones] {msg}", file=sys.stderr, flush=True)


def _fp(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:16]


def _safe_key(rel: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "__", rel)


@dataclass
class Sample:
    path: Path
    rel: str
    key: str
    meta: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    backbone: Backbone | None = None
    dirty: bool = False

    @property
    def sections(self) -> dict:
        return self.cache.setdefault("sections", {})

    def done(self, section: str, fp: str) -> bool:
        s = self.sections.get(section)
        return bool(s) and s.get("_fp") == fp and "error" not in s

    def put(self, section: str, fp: str, value: dict) -> None:
        value = dict(value)
        value["_fp"] = fp
        self.sections[section] = value
        self.dirty = True

    def error(self, section: str, fp: str, exc: BaseException | str) -> None:
        msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self.sections[section] = {"_fp": fp, "error": str(msg)[:500]}
        self.dirty = True


# ------------------------------------------------------------------------------------------------ inputs


def read_samples_csv(samples_dir: Path) -> dict[str, dict]:
    """Rows of ``<samples_dir>/samples.csv`` keyed by resolved pdb path (tolerant to missing columns)."""
    f = samples_dir / "samples.csv"
    if not f.is_file():
        return {}
    out = {}
    try:
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                p = None
                for col in ("pdb_path", "path", "pdb", "file"):
                    if row.get(col):
                        p = row[col]
                        break
                if p is None:
                    continue
                q = Path(p)
                q = q if q.is_absolute() else samples_dir / q
                out[str(q.resolve())] = {k: v for k, v in row.items() if k is not None}
    except (OSError, csv.Error) as exc:
        log(f"warning: cannot read {f} ({exc}); grouping without it")
    return out


def group_of(meta: dict) -> str:
    """Method label: ``method`` column, else ``rule`` + ``models``, else ``all``."""
    if meta.get("method"):
        return str(meta["method"])
    parts = [str(meta[c]) for c in ("rule", "models") if meta.get(c)]
    return ":".join(parts) if parts else "all"


def _device(spec: str) -> str:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N``; CUDA requested but absent is bad input."""
    from superdiff_protein.cli.common import resolve_device

    return str(resolve_device(spec, "device", BadInputError))


# ------------------------------------------------------------------------------------------------ config

_BOOL_KEYS = ("resume", "progress", "plots", "mpnn.enabled", "mpnn.ca_only", "fold.save_refolds", "novelty.refold",
              "diversity.enabled")
#: key: (lowest, highest, null allowed)
_INT_KEYS = {"workers": (0, 4096, False), "seed": (0, 2**63 - 1, False), "mpnn.num_seqs": (1, 100_000, False),
             "mpnn.batch_size": (1, 100_000, False), "fold.batch_size": (1, 100_000, False),
             "fold.num_recycles": (0, 1000, True), "fold.chunk_size": (1, 1_000_000, True),
             "novelty.top_k": (1, 10**9, True), "diversity.max_samples": (0, 10**9, True)}
_CLUSTER_METHODS = ("greedy", "single", "average", "complete")


def _get(cfg: Any, dotted: str, default: Any) -> Any:
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError, IndexError):
            return default
    return node


def validate_config(cfg: Any) -> None:
    """Refuse out-of-range or mistyped options with one line (:class:`BadInputError`) before any work.
    Keys absent from ``cfg`` are not checked (the Python API may pass a partial config)."""
    missing = object()
    for k in _BOOL_KEYS:
        v = _get(cfg, k, missing)
        if v is not missing and not isinstance(v, bool):
            raise BadInputError(f"{k} must be true or false, got {v!r}")
    for k, (lo, hi, none_ok) in _INT_KEYS.items():
        v = _get(cfg, k, missing)
        if v is missing or (v is None and none_ok):
            continue
        ok = (isinstance(v, (int, np.integer)) and not isinstance(v, bool)) or (
            isinstance(v, float) and math.isfinite(v) and v == int(v))
        if not ok or not lo <= int(v) <= hi:
            what = " (0 = all cores)" if k == "workers" else ""
            raise BadInputError(f"{k} must be an integer in [{lo}, {hi}]{' or null' if none_ok else ''}{what}, "
                                f"got {v!r}")
    for k, hi in (("mpnn.temperature", math.inf), ("fold.designable_rmsd", math.inf),
                  ("diversity.cluster_tm_threshold", 1.0)):
        v = _get(cfg, k, missing)
        if v is missing:
            continue
        try:
            f = math.nan if isinstance(v, bool) else float(v)
        except (TypeError, ValueError):
            f = math.nan
        if not (math.isfinite(f) and 0.0 < f <= hi):
            rng = "in (0, 1]" if hi == 1.0 else "> 0"
            raise BadInputError(f"{k} must be a finite number {rng}, got {v!r}")
    v = _get(cfg, "sc_results", missing)
    if v is not missing:
        from .sc_results import SC_RESULTS_MODES, sc_results_mode

        if sc_results_mode(v) not in SC_RESULTS_MODES:
            raise BadInputError(f"sc_results must be one of {', '.join(SC_RESULTS_MODES)}, got {v!r}")
    m = _get(cfg, "diversity.cluster_method", missing)
    if m is not missing and m not in _CLUSTER_METHODS:
        raise BadInputError(f"diversity.cluster_method must be one of {', '.join(_CLUSTER_METHODS)}, got {m!r}")
    w = _get(cfg, "mpnn.weights", None)
    if w not in (None, ""):
        wp = Path(str(w)).expanduser()
        if not wp.is_file():
            raise BadInputError(f"mpnn.weights {str(w)!r} is not a file"
                                f"{' (it is a directory)' if wp.is_dir() else ' (does it exist?)'}")


# ------------------------------------------------------------------------------------------------ stages


def _load_cache(sample: Sample, cache_dir: Path, resume: bool) -> None:
    f = cache_dir / f"{sample.key}.json"
    h = _file_hash(sample.path)
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


def _save_cache(sample: Sample, cache_dir: Path) -> None:
    if sample.dirty:
        atomic_write_json(cache_dir / f"{sample.key}.json", sample.cache)
        sample.dirty = False


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def evaluate(cfg: Any, mpnn_model=None, fold_model=None) -> dict:
    """Run the evaluation described by ``cfg`` (the Hydra config, or any attribute/dict-like object with the
    same keys). ``mpnn_model`` / ``fold_model`` override model loading (tests). Returns the summary dict."""
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.create(cfg)
    t_start = time.time()
    if cfg.get("samples_dir") in (None, "", "???"):
        raise BadInputError("samples_dir is required: evaluate_backbones samples_dir=/path/to/backbones")
    samples_dir = Path(str(cfg.samples_dir)).expanduser()
    if not samples_dir.is_dir():
        raise BadInputError(f"samples_dir {str(samples_dir)!r} is not a directory (does it exist?)")
    validate_config(cfg)
    device = _device(cfg.get("device", "auto"))
    from superdiff_protein.cli.common import check_out_dir

    out_dir = check_out_dir(cfg.out_dir if cfg.get("out_dir") else samples_dir / "eval", "out_dir", BadInputError)
    reference = cfg.get("reference")
    if reference and not Path(str(reference)).expanduser().exists():
        raise BadInputError(f"reference {str(reference)!r} does not exist (a directory or tar archive of "
                            "PDB/mmCIF files, or a prepared .npz from `python -m eval.reference`)")
    weights = cfg.get("mpnn", {}).get("weights")
    if weights and cfg.mpnn.get("enabled", True):  # a user-given file is vetted before any work (exit 2)
        from superdiff_protein.runs.safe_load import CheckpointError, safe_load

        try:
            safe_load(str(weights), "cpu")
        except CheckpointError as exc:
            raise BadInputError(f"mpnn.weights: {exc}") from exc
    files = discover_structures(samples_dir, exclude=[out_dir])
    if not files:
        raise BadInputError(f"no structure files (*.pdb, *.cif, also .gz) found under {str(samples_dir)!r}")
    progress = bool(cfg.get("progress", True))
    resume = bool(cfg.get("resume", True))
    from tqdm.auto import tqdm

    meta = read_samples_csv(samples_dir)
    samples: list[Sample] = []
    for p in files:
        rel = p.relative_to(samples_dir).as_posix()
        m = meta.get(str(p.resolve()), {})
        samples.append(Sample(path=p, rel=rel, key=_safe_key(rel), meta=m))

    # ---- read every structure before anything is written: when none is usable, that is bad input
    read_errors: dict[str, str] = {}
    for s in tqdm(samples, desc="reading structures", unit="file", disable=not progress or len(samples) < 100):
        try:
            s.backbone = read_backbone(s.path, name=s.rel)
            if s.backbone.length < MIN_RESIDUES:
                raise StructureReadError(f"{s.rel}: {s.backbone.length} residue(s); evaluation needs at least "
                                         f"{MIN_RESIDUES} (TM-align's minimum)")
        except StructureReadError as exc:
            read_errors[s.rel] = str(exc)
            s.backbone = None
        except Exception as exc:  # isolate any per-sample failure
            read_errors[s.rel] = f"{type(exc).__name__}: {exc}"
            s.backbone = None
    if len(read_errors) == len(samples):
        first = next(iter(read_errors.values()))
        more = f" (and {len(samples) - 1} more unusable file(s))" if len(samples) > 1 else ""
        raise BadInputError(f"no usable structure under {str(samples_dir)!r}: {first}{more}")

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        cache_dir = out_dir / "cache"
        cache_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"out_dir: cannot create {str(out_dir)!r} ({exc.strerror or exc})") from exc
    log(f"{len(samples)} structure files under {samples_dir}; results in {out_dir}")
    status: dict[str, Any] = {}

    # ---- structure metrics
    fp_struct = _fp({"v": 1})
    for s in tqdm(samples, desc="structure metrics", unit="sample", disable=not progress):
        try:
            _load_cache(s, cache_dir, resume)
            if s.rel in read_errors:
                s.error("structure", fp_struct, read_errors[s.rel])
            elif not s.done("structure", fp_struct):
                m = structure_metrics(s.backbone)
                s.put("structure", fp_struct, m)
        except Exception as exc:  # isolate any per-sample failure
            s.error("structure", fp_struct, exc)
            s.backbone = None
        _save_cache(s, cache_dir)
    ok = [s for s in samples if s.backbone is not None]
    n_bad = len(samples) - len(ok)
    if n_bad:
        log(f"warning: {n_bad} file(s) could not be read; recorded in the 'error' column")

    # ---- ProteinMPNN designs + log-likelihood
    mc = cfg.mpnn
    mpnn_fp_base = {"model": mc.model_name, "weights": mc.get("weights"), "n": int(mc.num_seqs),
                    "T": float(mc.temperature), "seed": int(cfg.get("seed", 0)), "omit": mc.get("omit_aas", "X")}

    def mpnn_fp(ca_only: bool) -> str:
        return _fp({**mpnn_fp_base, "ca_only": ca_only})

    def wants_ca(s: Sample) -> bool:
        return bool(mc.ca_only) or not s.backbone.has_full_backbone

    models: dict[bool, Any] = {}
    if mpnn_model is not None:
        models[bool(getattr(mpnn_model, "ca_only", False))] = mpnn_model
    if mc.enabled:
        todo = [s for s in ok if not s.done("mpnn", mpnn_fp(wants_ca(s)))]
        for s in tqdm(todo, desc="ProteinMPNN", unit="backbone", disable=not progress or not todo):
            ca_only = wants_ca(s)
            fp = mpnn_fp(ca_only)
            try:
                if ca_only not in models:
                    from .mpnn import load_proteinmpnn

                    models[ca_only] = load_proteinmpnn(mc.model_name, ca_only=ca_only, weights=mc.get("weights"),
                                                       device=device)
                from .mpnn import design_sequences

                designs = design_sequences(models[ca_only], s.backbone, num_seqs=int(mc.num_seqs),
                                           temperature=float(mc.temperature), seed=int(cfg.get("seed", 0)),
                                           batch_size=int(mc.batch_size), omit_aas=mc.get("omit_aas", "X"),
                                           ca_only=ca_only)
                lls = [d.log_likelihood for d in designs]
                s.put("mpnn", fp, {"sequences": [d.sequence for d in designs], "log_likelihoods": lls,
                                   "mpnn_ll": float(np.mean(lls)), "mpnn_ll_best": float(np.max(lls)),
                                   "mpnn_model": f"{mc.model_name}{'-ca' if ca_only else ''}"})
            except ModelUnavailableError as exc:
                log(f"warning: {exc}; ProteinMPNN metrics and designability skipped")
                status["mpnn"] = str(exc)
                break
            except Exception as exc:
                s.error("mpnn", fp, exc)
                if _is_oom(exc):
                    _empty_cuda_cache()
            _save_cache(s, cache_dir)
    else:
        status["mpnn"] = "disabled (mpnn.enabled=false)"

    # ---- ESMFold self-consistency
    from .sc_results import is_framediff_run, sc_results_mode

    sc_mode = sc_results_mode(cfg.get("sc_results", "auto"))
    if sc_mode == "auto":
        sc_mode = "true" if is_framediff_run(samples_dir) else "false"
    fc = cfg.fold
    esm_spec = cfg.get("esmfold")
    if esm_spec and fold_model is None:
        from .fold import esmfold_help, resolve_esmfold

        if resolve_esmfold(esm_spec) is None:
            log("warning: " + esmfold_help(esm_spec))
            status["esmfold"] = esmfold_help(esm_spec)
            esm_spec = None
    fold_ran = False
    if mc.enabled and (esm_spec or fold_model is not None):
        from .fold import resolve_esmfold

        esm_path = resolve_esmfold(esm_spec) if fold_model is None else "<given model>"
        fold_fp_base = {"esm": str(esm_path), "recycles": fc.get("num_recycles"), "thr": float(fc.designable_rmsd)}
        todo = [s for s in ok if s.done("mpnn", mpnn_fp(wants_ca(s)))
                and not s.done("fold", _fp({**fold_fp_base, "mpnn": s.sections["mpnn"]["_fp"]}))]
        if todo:
            try:
                if fold_model is None:
                    from .fold import load_esmfold

                    fold_model = load_esmfold(esm_spec, device=device, chunk_size=fc.get("chunk_size"))
            except ModelUnavailableError as exc:
                log(f"warning: {exc}")
                status["esmfold"] = str(exc)
                todo = []
        from .designability import self_consistency
        from .fold import Fold

        for s in tqdm(todo, desc="ESMFold self-consistency", unit="backbone", disable=not progress or not todo):
            fp = _fp({**fold_fp_base, "mpnn": s.sections["mpnn"]["_fp"]})
            mp = s.sections["mpnn"]
            from .mpnn import Design

            designs = [Design(q, ll) for q, ll in zip(mp["sequences"], mp["log_likelihoods"])]
            try:
                try:
                    summ, per_seq, folds = self_consistency(s.backbone, designs, fold_model,
                                                            batch_size=int(fc.batch_size),
                                                            num_recycles=fc.get("num_recycles"),
                                                            threshold=float(fc.designable_rmsd))
                except Exception as exc:
                    if not _is_oom(exc) or int(fc.batch_size) == 1:
                        raise
                    _empty_cuda_cache()  # retry one sequence at a time
                    summ, per_seq, folds = self_consistency(s.backbone, designs, fold_model, batch_size=1,
                                                            num_recycles=fc.get("num_recycles"),
                                                            threshold=float(fc.designable_rmsd))
                refold_paths = []
                if fc.get("save_refolds", True):
                    for k, f in enumerate(folds):
                        rp = out_dir / "refolds" / f"{s.key.rsplit('.', 1)[0]}_seq{k}.pdb"
                        write_backbone_pdb(rp, f.backbone, designs[k].sequence)
                        refold_paths.append(rp.relative_to(out_dir).as_posix())
                best = summ.get("sc_best_index")
                s.put("fold", fp, {**summ, "per_sequence": per_seq, "refolds": refold_paths,
                                   "best_refold_ca": folds[best].backbone[:, 1].tolist() if best is not None else None})
            except Exception as exc:
                s.error("fold", fp, exc)
                if _is_oom(exc):
                    _empty_cuda_cache()
            _save_cache(s, cache_dir)
        fold_ran = any(s.done("fold", _fp({**fold_fp_base, "mpnn": s.sections["mpnn"]["_fp"]}))
                       for s in ok if "mpnn" in s.sections and "_fp" in s.sections["mpnn"])
        if sc_mode != "false":
            current = [s for s in ok if "_fp" in s.sections.get("mpnn", {})
                       and s.done("fold", _fp({**fold_fp_base, "mpnn": s.sections["mpnn"]["_fp"]}))]
            _write_sc_results_files(current, samples_dir, out_dir, sc_mode, float(mc.temperature), status)
    elif not esm_spec:
        status.setdefault("esmfold", "disabled (esmfold=null)")
    if sc_mode == "true" and not fold_ran:
        log("warning: sc_results=true, but no sample was refolded (ESMFold unavailable or ProteinMPNN off): "
            "no sc_results.csv written")

    # ---- novelty
    nc = cfg.novelty
    if reference:
        from .novelty import iter_novelty
        from .reference import load_reference

        ref = _load_reference_cached(Path(str(reference)).expanduser(), out_dir, int(cfg.get("workers", 0) or 0),
                                     progress)
        top_k = nc.get("top_k")
        top_k = int(top_k) if top_k else None
        fp_nov = _fp({"ref": ref.fingerprint(), "top_k": top_k})
        log(f"novelty against {len(ref)} reference chains ({'exact' if top_k is None else f'heuristic top_k={top_k}'})")
        jobs = []
        for s in ok:
            if not s.done("novelty", fp_nov):
                jobs.append((s, "novelty", fp_nov, s.backbone.ca, s.backbone.sequence))
            f = s.sections.get("fold", {})
            if nc.get("refold", True) and f.get("best_refold_ca") and "error" not in f:
                fp_r = _fp({"nov": fp_nov, "fold": f["_fp"]})
                if not s.done("novelty_refold", fp_r):
                    jobs.append((s, "novelty_refold", fp_r, np.asarray(f["best_refold_ca"]), f.get("sc_best_seq")))
        try:
            for i, r in iter_novelty([(j[3], j[4]) for j in jobs], ref, workers=cfg.get("workers", 0),
                                     top_k=top_k, progress=progress):
                s, sec, fp, _, _ = jobs[i]
                s.put(sec, fp, {"max_tm": r.max_tm, "best_ref": r.best_ref, "n_aligned": r.n_aligned,
                                "exact": r.exact})
                _save_cache(s, cache_dir)
        except KeyboardInterrupt:
            raise
    else:
        status["novelty"] = "skipped (no reference=...)"

    # ---- diversity
    dc = cfg.diversity
    div_all: dict = {}
    group_div: dict = {}
    if dc.enabled and len(ok) >= 1:
        div_all, group_div = _diversity(ok, samples, out_dir, cfg, progress)
    rows = _rows(samples, div_all)
    from .report import write_reports

    summary = write_reports(rows, out_dir, cfg, div_all, group_div, status,
                            elapsed=time.time() - t_start, n_files=len(samples))
    return summary


def _write_sc_results_files(samples: list[Sample], samples_dir: Path, out_dir: Path, mode: str, temperature: float,
                            status: dict) -> None:
    """FrameDiff's ``self_consistency/sc_results.csv`` (+ sample copy, ``seqs/``, ``esmf/``) for every refolded
    sample (eval/sc_results.py): in the sample's folder for FrameDiff's layout, else under
    ``<out_dir>/self_consistency/``. A failure is logged and recorded in ``status``; the run goes on."""
    from .sc_results import sc_dir_for, write_sc_results

    n, failed = 0, []
    for s in samples:
        fo = s.sections["fold"]
        try:
            refolds = [out_dir / r for r in fo.get("refolds") or []]
            write_sc_results(s.path, sc_dir_for(s.path, s.rel, out_dir, s.key), fo.get("per_sequence") or [],
                             refolds, temperature)
            n += 1
        except OSError as exc:
            failed.append(f"{s.rel}: {exc}")
    if failed:
        log(f"warning: sc_results.csv not written for {len(failed)} sample(s): {failed[0]}")
        status["sc_results"] = f"{len(failed)} failed: {failed[0]}"
    if n:
        log(f"FrameDiff sc_results.csv written for {n} sample(s)")


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def _load_reference_cached(src: Path, out_dir: Path, workers: int, progress: bool):
    """Load a reference; a directory/archive is parsed once and cached in ``out_dir/reference_cache.npz``."""
    from .reference import Reference, build_reference, load_reference

    if src.is_file() and src.suffix.lower() == ".npz":
        return load_reference(src)
    st = src.stat()
    tag = _fp({"src": str(src.resolve()), "mtime": st.st_mtime, "size": st.st_size})
    cache = out_dir / f"reference_cache_{tag}.npz"
    if cache.is_file():
        try:
            return load_reference(cache)
        except BadInputError:
            pass
    ref = build_reference(src, workers=workers or 0 or _all_cores(), progress=progress)
    ref.save(cache)
    return ref


def _all_cores() -> int:
    from .novelty import resolve_workers

    return resolve_workers(0)


def _diversity(ok: list[Sample], samples: list[Sample], out_dir: Path, cfg, progress: bool):
    """Pairwise TM (cached in ``pairwise_tm.json``), global and per-group diversity."""
    from .novelty import diversity, pairwise_tm

    dc = cfg.diversity
    chosen = ok
    max_n = int(dc.get("max_samples", 0) or 0)
    subsampled = False
    if max_n and len(ok) > max_n:
        rng = np.random.default_rng(int(cfg.get("seed", 0)))
        idx = np.sort(rng.choice(len(ok), max_n, replace=False))
        chosen = [ok[i] for i in idx]
        subsampled = True
    ids = [f"{s.rel}#{s.cache['file_hash']}" for s in chosen]
    cache_f = out_dir / "pairwise_tm.json"
    known_pairs: dict = {}
    if cfg.get("resume", True) and cache_f.is_file():
        try:
            known_pairs = json.loads(cache_f.read_text()).get("pairs", {})
        except (OSError, json.JSONDecodeError):
            known_pairs = {}
    known = {}
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            v = known_pairs.get(f"{ids[i]}|{ids[j]}")
            if v is not None:
                known[(i, j)] = tuple(v)
    t = pairwise_tm([s.backbone.ca for s in chosen], [s.backbone.sequence for s in chosen],
                    workers=cfg.get("workers", 0), known=known, progress=progress)
    pairs = {f"{ids[i]}|{ids[j]}": [float(t[i, j]), float(t[j, i])]
             for i in range(len(ids)) for j in range(i + 1, len(ids))}
    atomic_write_json(cache_f, {"ids": ids, "pairs": pairs})
    thr, meth = float(dc.cluster_tm_threshold), str(dc.cluster_method)
    d = diversity(t, thr, meth)
    d["subsampled"] = subsampled
    d["matrix"] = t
    d["ids"] = [s.rel for s in chosen]
    labels = {s.rel: int(l) for s, l in zip(chosen, d["labels"])}
    d["labels_by_rel"] = labels
    groups: dict = {}
    keys = [(group_of(s.meta), s.backbone.length) for s in chosen]
    for gkey in sorted(set(keys) | {(k[0], None) for k in keys}, key=lambda k: (k[0], -1 if k[1] is None else k[1])):
        idx = [i for i, k in enumerate(keys) if k[0] == gkey[0] and (gkey[1] is None or k[1] == gkey[1])]
        sub = t[np.ix_(idx, idx)]
        gd = diversity(sub, thr, meth)
        gd.pop("labels")
        groups[gkey] = gd
    return d, groups


def _num(x):
    if x is None:
        return None
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    return x


def _rows(samples: list[Sample], div: dict) -> list[dict]:
    """One flat record per sample (for metrics.csv and the table)."""
    rows = []
    labels = div.get("labels_by_rel", {}) if div else {}
    for s in samples:
        sec = s.sections
        r: dict[str, Any] = {"path": s.rel, "id": s.meta.get("id", Path(s.rel).stem), "method": group_of(s.meta)}
        errors = [f"{k}: {v['error']}" for k, v in sec.items() if isinstance(v, dict) and "error" in v]
        r["error"] = "; ".join(errors) if errors else None
        st = sec.get("structure", {})
        for k in ("length", "helix_frac", "strand_frac", "coil_frac", "ca_ca_mean", "ca_ca_std", "ca_ca_max",
                  "ca_ca_valid_frac", "n_chain_breaks", "n_ca_clashes", "n_bb_clashes", "radius_of_gyration",
                  "full_backbone"):
            r[k] = st.get(k)
        mp = sec.get("mpnn", {})
        for k in ("mpnn_ll", "mpnn_ll_best", "mpnn_model"):
            r[k] = mp.get(k)
        fo = sec.get("fold", {})
        for k in ("sc_rmsd", "sc_tm", "plddt", "designable", "sc_rmsd_mean", "sc_best_seq"):
            r[k] = fo.get(k)
        nv = sec.get("novelty", {})
        r["novelty_max_tm"] = nv.get("max_tm")
        r["novelty_best_ref"] = nv.get("best_ref")
        r["novelty_refold_max_tm"] = sec.get("novelty_refold", {}).get("max_tm")
        r["cluster"] = labels.get(s.rel)
        for k, v in s.meta.items():
            if k not in r and k not in ("pdb_path",):
                r[k] = v
        rows.append({k: _num(v) for k, v in r.items()})
    return rows


def write_metrics_csv(rows: list[dict], path: Path) -> None:
    """metrics.csv: contract columns first; empty cells where a metric was not computed."""
    import io

    extra = sorted({k for r in rows for k in r} - set(METRIC_COLUMNS))
    cols = METRIC_COLUMNS + extra
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in cols})
    atomic_write_text(path, buf.getvalue())


def cache_file(out_dir: str | Path, rel_path: str) -> Path:
    """Per-sample cache JSON of the sample at ``rel_path`` (relative to samples_dir)."""
    return Path(out_dir) / "cache" / f"{_safe_key(rel_path)}.json"
