"""The steps of ``evaluate_backbones``, in the order :func:`eval.pipeline.evaluate` runs them:

1. :func:`read_structures`: parse every file before anything is written (none usable = bad input);
2. :func:`structure_step`: geometry and secondary structure;
3. :func:`mpnn_step`: ProteinMPNN designs and log-likelihoods;
4. :func:`fold_step`: ESMFold self-consistency (designability) and FrameDiff's ``sc_results.csv``;
5. :func:`novelty_step`: max TM-score against a reference set;
6. :func:`diversity_step`: pairwise TM, clusters, per-group diversity.

Each per-sample step caches its result in the sample's JSON under a fingerprint of the settings it depends
on (:mod:`eval.samples`), so a rerun redoes only what changed; a failure is recorded for that sample and the
run goes on. The shared state of one evaluation is an :class:`EvalRun`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .designability import score_refolds
from .errors import BadInputError, ModelUnavailableError, StructureReadError
from .fold import Fold, esmfold_help, fold_sequences, load_esmfold, precision_note, resolve_esmfold, \
    resolve_precision
from .io import MIN_RESIDUES, atomic_write_json, read_backbone, write_backbone_pdb
from .metrics import structure_metrics
from .mpnn import Design, design_sequences, load_proteinmpnn
from .novelty import diversity, iter_novelty, pairwise_tm, resolve_workers
from .reference import build_reference, load_reference
from .samples import Sample, fingerprint, group_of, load_cache, log, save_cache
from .sc_results import is_framediff_run, sc_dir_for, sc_results_mode, write_sc_results

__all__ = ["EvalRun", "read_structures", "create_out_dir", "structure_step", "mpnn_step", "fold_step",
           "refold_samples", "length_batches", "novelty_step", "diversity_step"]


@dataclass
class EvalRun:
    """One evaluation: its configuration, directories, samples and the per-stage status of summary.json."""

    cfg: Any
    samples_dir: Path
    out_dir: Path
    device: str
    samples: list[Sample]
    progress: bool = True
    resume: bool = True
    cache_dir: Path | None = None
    read_errors: dict[str, str] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    #: seconds spent per stage in this process: ``mpnn`` (designing), ``fold`` (ESMFold calls), ``compare``
    #: (scRMSD/TM-align of the refolds, refold files, cache writes)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> list[Sample]:
        """The samples with a usable backbone."""
        return [s for s in self.samples if s.backbone is not None]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _empty_cuda_cache() -> None:
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


# ------------------------------------------------------------------------------------------------ 1. read
def read_structures(run: EvalRun) -> None:
    """Parse every structure before anything is written; unusable files go to ``run.read_errors``.
    Raises :class:`BadInputError` when no file is usable."""
    samples = run.samples
    for s in tqdm(samples, desc="reading structures", unit="file", disable=not run.progress or len(samples) < 100):
        try:
            s.backbone = read_backbone(s.path, name=s.rel)
            if s.backbone.length < MIN_RESIDUES:
                raise StructureReadError(f"{s.rel}: {s.backbone.length} residue(s); evaluation needs at least "
                                         f"{MIN_RESIDUES} (TM-align's minimum)")
        except StructureReadError as exc:
            run.read_errors[s.rel] = str(exc)
            s.backbone = None
        except Exception as exc:  # isolate any per-sample failure
            run.read_errors[s.rel] = f"{type(exc).__name__}: {exc}"
            s.backbone = None
    if len(run.read_errors) == len(samples):
        first = next(iter(run.read_errors.values()))
        more = f" (and {len(samples) - 1} more unusable file(s))" if len(samples) > 1 else ""
        raise BadInputError(f"no usable structure under {str(run.samples_dir)!r}: {first}{more}")


def create_out_dir(run: EvalRun) -> None:
    """Create ``out_dir`` and its ``cache/`` (the first write of the run)."""
    try:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        run.cache_dir = run.out_dir / "cache"
        run.cache_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"out_dir: cannot create {str(run.out_dir)!r} ({exc.strerror or exc})") from exc
    log(f"{len(run.samples)} structure files under {run.samples_dir}; results in {run.out_dir}")


# ------------------------------------------------------------------------------------------------ 2. structure
def structure_step(run: EvalRun) -> None:
    """Geometry and secondary-structure metrics of every sample (read failures recorded as its error)."""
    fp_struct = fingerprint({"v": 1})
    for s in tqdm(run.samples, desc="structure metrics", unit="sample", disable=not run.progress):
        try:
            load_cache(s, run.cache_dir, run.resume)
            if s.rel in run.read_errors:
                s.error("structure", fp_struct, run.read_errors[s.rel])
            elif not s.done("structure", fp_struct):
                m = structure_metrics(s.backbone)
                s.put("structure", fp_struct, m)
        except Exception as exc:  # isolate any per-sample failure
            s.error("structure", fp_struct, exc)
            s.backbone = None
        save_cache(s, run.cache_dir)
    n_bad = len(run.samples) - len(run.ok)
    if n_bad:
        log(f"warning: {n_bad} file(s) could not be read; recorded in the 'error' column")


# ------------------------------------------------------------------------------------------------ 3. ProteinMPNN
def mpnn_fingerprint(cfg: Any, ca_only: bool) -> str:
    """Fingerprint of the ProteinMPNN settings of a sample (full-backbone or CA-only model)."""
    mc = cfg.mpnn
    base = {"model": mc.model_name, "weights": mc.get("weights"), "n": int(mc.num_seqs),
            "T": float(mc.temperature), "seed": int(cfg.get("seed", 0)), "omit": mc.get("omit_aas", "X")}
    return fingerprint({**base, "ca_only": ca_only})


def wants_ca(cfg: Any, s: Sample) -> bool:
    """Whether the sample is designed with the CA-only ProteinMPNN (asked for, or a CA-only file)."""
    return bool(cfg.mpnn.ca_only) or not s.backbone.has_full_backbone


def mpnn_step(run: EvalRun, mpnn_model: Any = None) -> None:
    """ProteinMPNN designs and log-likelihoods (models loaded on first use; ``mpnn_model`` overrides)."""
    cfg, mc = run.cfg, run.cfg.mpnn
    models: dict[bool, Any] = {}
    if mpnn_model is not None:
        models[bool(getattr(mpnn_model, "ca_only", False))] = mpnn_model
    if not mc.enabled:
        run.status["mpnn"] = "disabled (mpnn.enabled=false)"
        return
    todo = [s for s in run.ok if not s.done("mpnn", mpnn_fingerprint(cfg, wants_ca(cfg, s)))]
    t_start = time.perf_counter()
    for s in tqdm(todo, desc="ProteinMPNN", unit="backbone", disable=not run.progress or not todo):
        ca_only = wants_ca(cfg, s)
        fp = mpnn_fingerprint(cfg, ca_only)
        try:
            if ca_only not in models:
                models[ca_only] = load_proteinmpnn(mc.model_name, ca_only=ca_only, weights=mc.get("weights"),
                                                   device=run.device)
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
            run.status["mpnn"] = str(exc)
            break
        except Exception as exc:
            s.error("mpnn", fp, exc)
            if _is_oom(exc):
                _empty_cuda_cache()
        save_cache(s, run.cache_dir)
    run.timings["mpnn"] = run.timings.get("mpnn", 0.0) + time.perf_counter() - t_start


# ------------------------------------------------------------------------------------------------ 4. ESMFold
@dataclass
class _Pending:
    """The refolding of one sample's designs, filled batch by batch."""

    sample: Sample
    fp: str
    designs: list[Design]
    folds: list[Fold | None]
    left: int
    error: BaseException | None = None


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of ``lengths`` in batches of at most ``batch_size``: sorted by length (stable, so equal lengths
    keep their order), cut consecutively. Each batch pads only to its own longest sequence, and a batch mixes
    lengths only where one length's sequences end and the next begin."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _fold_batch(fold_model: Any, seqs: list[str], fc: Any, precision: str) -> list[Fold | BaseException]:
    """Fold one batch; when the call fails (out of memory, or any error) fold its sequences one at a time, so a
    failure is charged to the sequence (and sample) that causes it. Returns a fold or the exception per sequence."""
    kw = {"num_recycles": fc.get("num_recycles"), "precision": precision}
    try:
        return list(fold_sequences(fold_model, seqs, batch_size=len(seqs), **kw))
    except Exception as exc:
        if _is_oom(exc):
            _empty_cuda_cache()
        if len(seqs) == 1:
            return [exc]
    out: list[Fold | BaseException] = []
    for q in seqs:
        try:
            out.extend(fold_sequences(fold_model, [q], batch_size=1, **kw))
        except Exception as exc:
            if _is_oom(exc):
                _empty_cuda_cache()
            out.append(exc)
    return out


def _finish_sample(run: EvalRun, p: _Pending) -> None:
    """Score a sample whose designs are all refolded (or record its failure), write its refolds and cache."""
    fc, s = run.cfg.fold, p.sample
    t0 = time.perf_counter()
    try:
        if p.error is not None:
            raise p.error
        folds = [f for f in p.folds if f is not None]
        summ, per_seq = score_refolds(s.backbone, p.designs, folds, float(fc.designable_rmsd))
        refold_paths = []
        if fc.get("save_refolds", True):
            for k, f in enumerate(folds):
                rp = run.out_dir / "refolds" / f"{s.key.rsplit('.', 1)[0]}_seq{k}.pdb"
                write_backbone_pdb(rp, f.backbone, p.designs[k].sequence)
                refold_paths.append(rp.relative_to(run.out_dir).as_posix())
        best = summ.get("sc_best_index")
        s.put("fold", p.fp, {**summ, "per_sequence": per_seq, "refolds": refold_paths,
                             "best_refold_ca": folds[best].backbone[:, 1].tolist() if best is not None else None})
    except Exception as exc:
        s.error("fold", p.fp, exc)
    save_cache(s, run.cache_dir)
    run.timings["compare"] = run.timings.get("compare", 0.0) + time.perf_counter() - t0


def refold_samples(run: EvalRun, todo: list[Sample], fold_fp: Any, fold_model: Any, precision: str) -> None:
    """Refold the ProteinMPNN designs of ``todo`` pooled across samples: sorted by length, in ESMFold calls of
    ``fold.batch_size`` sequences (:func:`length_batches`). Each sample is scored, written and cached as soon as
    its last design is folded, so an interrupted run keeps every finished sample; a failure is recorded for its
    sample only. The progress bar counts backbones."""
    fc = run.cfg.fold
    pending: list[_Pending] = []
    jobs: list[tuple[int, int]] = []  # (pending index, design index)
    for s in todo:
        mp = s.sections["mpnn"]
        designs = [Design(q, ll) for q, ll in zip(mp["sequences"], mp["log_likelihoods"])]
        for k in range(len(designs)):
            jobs.append((len(pending), k))
        pending.append(_Pending(s, fold_fp(s), designs, [None] * len(designs), len(designs)))
    for p in pending:
        if p.left == 0:
            p.error = ValueError("ProteinMPNN gave no sequence to refold")
    lengths = [len(pending[i].designs[k].sequence) for i, k in jobs]
    bar = tqdm(total=len(pending), desc="ESMFold self-consistency", unit="backbone",
               disable=not run.progress or not pending)
    for p in pending:
        if p.left == 0:
            _finish_sample(run, p)
            bar.update(1)
    for batch in length_batches(lengths, int(fc.batch_size)):
        t0 = time.perf_counter()
        results = _fold_batch(fold_model, [pending[jobs[j][0]].designs[jobs[j][1]].sequence for j in batch], fc,
                              precision)
        run.timings["fold"] = run.timings.get("fold", 0.0) + time.perf_counter() - t0
        for j, r in zip(batch, results):
            i, k = jobs[j]
            p = pending[i]
            if isinstance(r, BaseException):
                p.error = p.error or r
            else:
                p.folds[k] = r
            p.left -= 1
            if p.left == 0:
                _finish_sample(run, p)
                bar.update(1)
    bar.close()


def _model_device(model: Any) -> str:
    try:
        return str(next(model.parameters()).device)
    except (AttributeError, StopIteration, TypeError):
        return "cpu"


def fold_step(run: EvalRun, fold_model: Any = None) -> None:
    """ESMFold self-consistency of the ProteinMPNN designs (``fold_model`` overrides loading; it is folded at
    ``fold.precision`` all the same), then FrameDiff's ``sc_results.csv`` files as ``sc_results`` asks."""
    cfg, mc, fc = run.cfg, run.cfg.mpnn, run.cfg.fold
    sc_mode = sc_results_mode(cfg.get("sc_results", "auto"))
    if sc_mode == "auto":
        sc_mode = "true" if is_framediff_run(run.samples_dir) else "false"
    esm_spec = cfg.get("esmfold")
    if esm_spec and fold_model is None and resolve_esmfold(esm_spec) is None:
        log("warning: " + esmfold_help(esm_spec))
        run.status["esmfold"] = esmfold_help(esm_spec)
        esm_spec = None
    fold_ran = False
    if mc.enabled and (esm_spec or fold_model is not None):
        esm_path = resolve_esmfold(esm_spec) if fold_model is None else "<given model>"
        precision = resolve_precision(fc.get("precision", "fp32"))
        fold_fp_base = {"esm": str(esm_path), "recycles": fc.get("num_recycles"), "thr": float(fc.designable_rmsd)}
        if precision != "fp32":  # fp32 (the arithmetic before fold.precision existed) keeps its caches
            fold_fp_base["precision"] = precision

        def fold_fp(s: Sample) -> str:
            return fingerprint({**fold_fp_base, "mpnn": s.sections["mpnn"]["_fp"]})

        todo = [s for s in run.ok if s.done("mpnn", mpnn_fingerprint(cfg, wants_ca(cfg, s)))
                and not s.done("fold", fold_fp(s))]
        if todo and fold_model is None:
            try:
                fold_model = load_esmfold(esm_spec, device=run.device, chunk_size=fc.get("chunk_size"),
                                          precision=precision, compile=bool(fc.get("compile", False)))
            except ModelUnavailableError as exc:
                log(f"warning: {exc}")
                run.status["esmfold"] = str(exc)
                todo = []
        elif todo:
            note = precision_note(precision, _model_device(fold_model))
            if note:
                log(note)
        if todo:
            refold_samples(run, todo, fold_fp, fold_model, precision)
        fold_ran = any(s.done("fold", fold_fp(s)) for s in run.ok
                       if "mpnn" in s.sections and "_fp" in s.sections["mpnn"])
        if sc_mode != "false":
            current = [s for s in run.ok if "_fp" in s.sections.get("mpnn", {}) and s.done("fold", fold_fp(s))]
            _write_sc_results_files(current, run, sc_mode, float(mc.temperature))
    elif not esm_spec:
        run.status.setdefault("esmfold", "disabled (esmfold=null)")
    if sc_mode == "true" and not fold_ran:
        log("warning: sc_results=true, but no sample was refolded (ESMFold unavailable or ProteinMPNN off): "
            "no sc_results.csv written")


def _write_sc_results_files(samples: list[Sample], run: EvalRun, mode: str, temperature: float) -> None:
    """FrameDiff's ``self_consistency/sc_results.csv`` (+ sample copy, ``seqs/``, ``esmf/``) for every refolded
    sample (eval/sc_results.py): in the sample's folder for FrameDiff's layout, else under
    ``<out_dir>/self_consistency/``. A failure is logged and recorded in ``status``; the run goes on."""
    n, failed = 0, []
    for s in samples:
        fo = s.sections["fold"]
        try:
            refolds = [run.out_dir / r for r in fo.get("refolds") or []]
            write_sc_results(s.path, sc_dir_for(s.path, s.rel, run.out_dir, s.key), fo.get("per_sequence") or [],
                             refolds, temperature)
            n += 1
        except OSError as exc:
            failed.append(f"{s.rel}: {exc}")
    if failed:
        log(f"warning: sc_results.csv not written for {len(failed)} sample(s): {failed[0]}")
        run.status["sc_results"] = f"{len(failed)} failed: {failed[0]}"
    if n:
        log(f"FrameDiff sc_results.csv written for {n} sample(s)")


# ------------------------------------------------------------------------------------------------ 5. novelty
def _load_reference_cached(src: Path, out_dir: Path, workers: int, progress: bool):
    """Load a reference; a directory/archive is parsed once and cached in ``out_dir/reference_cache.npz``."""
    if src.is_file() and src.suffix.lower() == ".npz":
        return load_reference(src)
    st = src.stat()
    tag = fingerprint({"src": str(src.resolve()), "mtime": st.st_mtime, "size": st.st_size})
    cache = out_dir / f"reference_cache_{tag}.npz"
    if cache.is_file():
        try:
            return load_reference(cache)
        except BadInputError:
            pass
    ref = build_reference(src, workers=workers or 0 or resolve_workers(0), progress=progress)
    ref.save(cache)
    return ref


def novelty_step(run: EvalRun) -> None:
    """Max TM-score of each sample (and of its best refold) against the ``reference`` set."""
    cfg, nc = run.cfg, run.cfg.novelty
    reference = cfg.get("reference")
    if not reference:
        run.status["novelty"] = "skipped (no reference=...)"
        return
    ref = _load_reference_cached(Path(str(reference)).expanduser(), run.out_dir, int(cfg.get("workers", 0) or 0),
                                 run.progress)
    top_k = nc.get("top_k")
    top_k = int(top_k) if top_k else None
    fp_nov = fingerprint({"ref": ref.fingerprint(), "top_k": top_k})
    log(f"novelty against {len(ref)} reference chains ({'exact' if top_k is None else f'heuristic top_k={top_k}'})")
    jobs = []
    for s in run.ok:
        if not s.done("novelty", fp_nov):
            jobs.append((s, "novelty", fp_nov, s.backbone.ca, s.backbone.sequence))
        f = s.sections.get("fold", {})
        if nc.get("refold", True) and f.get("best_refold_ca") and "error" not in f:
            fp_r = fingerprint({"nov": fp_nov, "fold": f["_fp"]})
            if not s.done("novelty_refold", fp_r):
                jobs.append((s, "novelty_refold", fp_r, np.asarray(f["best_refold_ca"]), f.get("sc_best_seq")))
    for i, r in iter_novelty([(j[3], j[4]) for j in jobs], ref, workers=cfg.get("workers", 0),
                             top_k=top_k, progress=run.progress):
        s, sec, fp, _, _ = jobs[i]
        s.put(sec, fp, {"max_tm": r.max_tm, "best_ref": r.best_ref, "n_aligned": r.n_aligned, "exact": r.exact})
        save_cache(s, run.cache_dir)


# ------------------------------------------------------------------------------------------------ 6. diversity
def diversity_step(run: EvalRun) -> tuple[dict, dict]:
    """Pairwise TM (cached in ``pairwise_tm.json``), global and per-group diversity: ``(overall, groups)``,
    both empty when diversity is off or no sample is usable."""
    cfg, ok = run.cfg, run.ok
    dc = cfg.diversity
    if not (dc.enabled and len(ok) >= 1):
        return {}, {}
    chosen = ok
    max_n = int(dc.get("max_samples", 0) or 0)
    subsampled = False
    if max_n and len(ok) > max_n:
        rng = np.random.default_rng(int(cfg.get("seed", 0)))
        idx = np.sort(rng.choice(len(ok), max_n, replace=False))
        chosen = [ok[i] for i in idx]
        subsampled = True
    ids = [f"{s.rel}#{s.cache['file_hash']}" for s in chosen]
    cache_f = run.out_dir / "pairwise_tm.json"
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
                    workers=cfg.get("workers", 0), known=known, progress=run.progress)
    pairs = {f"{ids[i]}|{ids[j]}": [float(t[i, j]), float(t[j, i])]
             for i in range(len(ids)) for j in range(i + 1, len(ids))}
    atomic_write_json(cache_f, {"ids": ids, "pairs": pairs})
    thr, meth = float(dc.cluster_tm_threshold), str(dc.cluster_method)
    d = diversity(t, thr, meth)
    d["subsampled"] = subsampled
    d["matrix"] = t
    d["ids"] = [s.rel for s in chosen]
    labels = {s.rel: int(lab) for s, lab in zip(chosen, d["labels"])}
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
