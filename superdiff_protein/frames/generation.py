"""Generate protein backbones from a superposition of frame models: the Python API and the batch loop.

Python API::

    from superdiff_protein.frames.generation import generate
    summary = generate(rule="or", lengths=[60, 100], samples_per_length=8, num_steps=200, seed=0,
                       out_dir="runs/or")
    print(summary.text())

The options are those of :class:`~superdiff_protein.frames.generate_config.GenerateConfig` (the command line
``generate_backbones`` takes the same, as Hydra keys). The run directory's files are described in
:mod:`superdiff_protein.runs.rundir`.

Determinism: every sample owns a seed derived from ``(seed, L, i)`` and its own random stream
(:mod:`superdiff_protein.frames.plan`), and the analytic path runs in float64, so a sample's PDB does not depend
on the batch it ran in. A sample is complete when its PDB and its ``samples.csv`` row exist; a rerun into the
same directory skips complete samples (and refuses a directory written with different sampling settings).
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..core.kappa import make_rule
from ..core.protocol import IncompatibleModelsError, check_compatible
from ..core.sampler import BiasedEstimatorWarning, SamplingError, superpose
from ..runs import rundir
from ..runs.atomic import atomic_open
from ..runs.checks import check_out_dir
from ..runs.plots import plot_length_traces
from .generate_config import (FIELDS, GenerateConfig, GenerateError, GenerationFailed, Options, canon_precision,
                              canonical, load_config, sampler_config, smc_config, strip_hydra, validate)
from .compiling import compile_models, resolve_compile
from . import fkc_run
from .geometry import backbone_atoms_from_frames
from .guidance import ClashGuide
from .refine import RefineResult, refine_backbones
from .model_loading import angstrom_per_unit, auto_precision, load_model_spec, model_labels, space_for, supports_padding
from .pdb_io import PDBWriteError, format_backbone_pdb, write_trajectory_pdb
from .plan import sample_seed, shard_batches

__all__ = ["GenerateSummary", "generate", "generate_from_config"]

_PROG = "generate_backbones"


# ----------------------------------------------------------------------------------- summary
@dataclass
class GenerateSummary:
    """What :func:`generate` did."""

    out_dir: Path
    generated: int
    skipped: int
    lengths: list[int]
    models: list[str]
    wall_time_s: float
    csv_path: Path
    rows: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Samples of the run: generated now plus already complete."""
        return self.generated + self.skipped

    def text(self) -> str:
        """The one-line report the command line prints."""
        per = f", {self.wall_time_s / self.generated:.2f} s/sample" if self.generated else ""
        return (f"{_PROG}: {self.generated} sample(s) generated, {self.skipped} already complete "
                f"(lengths {_fmt_lengths(self.lengths)}; models {', '.join(self.models)}) in "
                f"{self.wall_time_s:.1f} s{per} -> {self.csv_path}")


def _fmt_lengths(ls: list[int]) -> str:
    return ",".join(map(str, ls)) if len(ls) <= 8 else f"{ls[0]}..{ls[-1]} ({len(ls)} lengths)"


def _fmt(v: float) -> str:
    return f"{float(v):.12g}"


# ----------------------------------------------------------------------------------- logging
def _log(msg: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(f"{_PROG}: {msg}", file=sys.stderr)
    except Exception:  # pragma: no cover
        print(f"{_PROG}: {msg}", file=sys.stderr)


def _surface_warnings(records: list, seen: list[str]) -> None:
    """Log each distinct warning of the sampler once per run (e.g. the biased-Ito warning)."""
    while records:
        w = records.pop(0)
        msg = str(w.message)
        if msg not in seen:
            seen.append(msg)
            kind = "warning (biased log-densities)" if issubclass(w.category, BiasedEstimatorWarning) else "warning"
            _log(f"{kind}: {msg}")


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", desc=_PROG, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.2 if sys.stderr.isatty() else 2.0,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} samples "
                           "[{elapsed}<{remaining}, {rate_fmt}]")


# ----------------------------------------------------------------------------------- final structures
def _final_choice(res) -> list[int]:
    """Per sample, the model with the largest final kappa (summed over components; first on ties)."""
    return [int(i) for i in torch.argmax(res.kappa_trace[-1].sum(1), -1).tolist()]


def _final_predictions(res, models: list, mstar: list[int], mask: Tensor | None, opts: Options) -> dict[int, tuple]:
    """``{model index: (rotmats, trans Angstrom)}`` for the batch, for every model chosen by a sample.

    As FrameDiff's sampler: the model is called once more at the final state with the last step's
    time (``denoise_final``); models without that method give their last step's predicted frames.
    """
    out: dict[int, tuple] = {}
    if opts.final != "prediction":
        return out
    B = res.x["trans"].shape[0]
    for mi in sorted(set(mstar)):
        m, ex = models[mi], (res.extras[mi] if res.extras else {})
        with torch.no_grad():
            if hasattr(m, "denoise_final") and len(res.t) >= 2:
                R, T = m.denoise_final(res.x, res.t[-2].expand(B), mask, extras=ex)
                out[mi] = (R, T)
            elif "pred_rotmats" in ex and "pred_trans" in ex:
                out[mi] = (ex["pred_rotmats"], ex["pred_trans"])
    return out


def _final_frames(res, batch: Sequence[tuple[int, int]], mstar: list[int], preds: dict[int, tuple], labels: list[str],
                  scale: float, guide: ClashGuide | None = None, refine: bool = False
                  ) -> list[tuple[Tensor, Tensor, Tensor | None, str, str, RefineResult | None]]:
    """Per sample ``b`` of the batch: frames (Angstrom), psi, model label, source (prediction/state) and
    refinement (None if none). A guided prediction is refined with the guide's distance
    (:meth:`ClashGuide.finalize_many`); with ``refine`` any finite final frames are
    (:func:`~superdiff_protein.frames.refine.refine_backbones`). Each group is refined in one batched call; a
    sample's result does not depend on the others."""
    raw, guided, plain = [], [], []
    for b, (L, _) in enumerate(batch):
        m = mstar[b]
        ex = res.extras[m] if res.extras else {}
        psi = ex.get("psi")
        psi = psi[b, :L].to(torch.float64) if psi is not None else None
        if m in preds:
            R, T = preds[m]
            R, T, source = R[b, :L].to(torch.float64), T[b, :L].to(torch.float64), "prediction"
        else:
            R, T, source = (res.x["rot"][b, :L].to(torch.float64), res.x["trans"][b, :L].to(torch.float64) * scale,
                            "state")
        raw.append((R, T, psi, labels[m], source))
        finite = bool(torch.isfinite(R).all()) and bool(torch.isfinite(T).all())   # else the caller reports it
        if finite and guide is not None and source == "prediction":
            guided.append(b)
        elif finite and refine:
            plain.append(b)
    fins: dict[int, RefineResult] = {}
    if guided:
        assert guide is not None
        fins.update(zip(guided, guide.finalize_many([raw[b][:3] for b in guided])))
    if plain:
        fins.update(zip(plain, refine_backbones([raw[b][:3] for b in plain])))
    out = []
    for b, (R, T, psi, lab, source) in enumerate(raw):
        fin = fins.get(b)
        out.append((R, T, psi, lab, source, None) if fin is None else (fin.rot, fin.trans, fin.psi, lab, source, fin))
    return out


def _atoms(rot: Tensor, trans: Tensor, psi: Tensor | None) -> np.ndarray:
    a = backbone_atoms_from_frames(rot.cpu(), trans.cpu(), None if psi is None else psi.cpu())
    # round once to the PDB's 3 decimals (the writer prints %.3f of these exact values)
    return np.round(a.numpy().astype(np.float64), 3)


# ----------------------------------------------------------------------------------- one sample
def _setting_cells(opts: Options, labels: Sequence[str]) -> dict[str, str]:
    """The ``samples.csv`` setting columns (:data:`~superdiff_protein.runs.rundir.SETTING_COLUMNS`) of a run,
    from the options of the same names."""
    cells = {}
    for col in rundir.SETTING_COLUMNS:
        v = labels if col == "models" else getattr(opts, col)
        if col == "bias_convention" and v == "algorithm1":
            continue                                   # the default's columns stay as they were
        if isinstance(v, (list, tuple)):
            cells[col] = ";".join(x if isinstance(x, str) else _fmt(x) for x in v)
        elif isinstance(v, float):
            cells[col] = _fmt(v)
        else:
            cells[col] = "" if v is None else str(v)
    return cells


def _trajectory(res, b: int, L: int, opts: Options, scale: float, out: Path, remark: str) -> None:
    """Write the noisy states of sample ``b`` (every ``traj_stride``-th, and the last) as a multi-model PDB."""
    frames = []
    stride = opts.traj_stride
    idx = list(range(0, len(res.trajectory), stride))
    if idx[-1] != len(res.trajectory) - 1:
        idx.append(len(res.trajectory) - 1)
    for k in idx:
        st = res.trajectory[k]
        frames.append(_atoms(st["rot"][b, :L].to(torch.float64), st["trans"][b, :L].to(torch.float64) * scale, None))
    if opts.layout == "framediff":      # FrameDiff's bb_traj order: newest state first
        frames = frames[::-1]
        what = f"noisy states from t=min_t (model 1) to t=1 (model {len(frames)}), stride {stride}"
    else:
        what = f"noisy states from t=1 (model 1) to t=min_t (model {len(frames)}), stride {stride}"
    write_trajectory_pdb(out, frames, remarks=[remark, what])


def _write_sample(out_dir: Path, res, b: int, L: int, i: int, seed: int, opts: Options, labels: list[str],
                  comps: list[str], wall: float, scale: float, final: tuple) -> dict:
    """Write sample ``b`` of a batch (traces, trajectory, then the PDB that marks it complete); its row."""
    files = rundir.sample_files(L, i, opts.layout)
    (out_dir / files["pdb"]).parent.mkdir(parents=True, exist_ok=True)
    rot, trans, psi, mlab, source, refined = final
    atoms = _atoms(rot, trans, psi)
    settings = _setting_cells(opts, labels)
    conv = f" bias_convention={settings['bias_convention']}" if "bias_convention" in settings else ""
    remarks = [
        "superdiff_protein generate_backbones",
        f"models: {' + '.join(labels)}",
        f"rule={opts.rule} T={_fmt(opts.temperature)} bias={settings['bias'] or 'none'}{conv} "
        f"kappa_scope={opts.kappa_scope}",
        f"steps={opts.num_steps} min_t={_fmt(opts.min_t)} noise_scale={_fmt(opts.noise_scale)} "
        f"estimator={opts.estimator}",
        f"length={L} sample={i} seed={seed}",
        f"final={source} model={mlab}",
    ]
    g = opts.clash_guidance
    if g["weight"] > 0:
        remarks.insert(4, f"guided: clash_guidance weight={_fmt(g['weight'])} t_max={_fmt(g['t_max'])} "
                          f"distance={_fmt(g['distance'])}")
    if refined is not None:
        remarks.append(refined.summary())
        if not refined.converged:
            _log(f"warning: length {L} sample {i}: {refined.summary()}")
    try:
        text = format_backbone_pdb(atoms, remarks=remarks)
    except PDBWriteError as e:
        raise GenerationFailed(f"length {L} sample {i}: cannot write the PDB ({e})") from None
    traj_rel = ""
    if opts.save_traj and res.trajectory is not None:
        traj_rel = files["traj"]
        _trajectory(res, b, L, opts, scale, out_dir / traj_rel, remarks[0])
    rundir.write_traces(out_dir / files["traces"], t=res.t.cpu().numpy(), kappa=res.kappa_trace[:, b].cpu().numpy(),
                        logq=res.logq_trace[:, b].cpu().numpy(), models=np.array(labels),
                        components=np.array(comps), kappa_scope=np.array(opts.kappa_scope),
                        seed=np.array(seed, dtype=np.uint64), **fkc_run.trace_arrays(res, b))
    with atomic_open(out_dir / files["pdb"], "w") as fh:
        fh.write(text)
    kap = res.kappa_trace[-1, b].cpu()
    lq = res.logq[b].cpu()
    row = {"id": f"L{L}_s{i}", "length": str(L), "sample": str(i), "seed": str(seed), **settings,
           "final": source, "final_model": mlab}
    for mi, lab in enumerate(labels):
        if opts.kappa_scope == "joint":
            row[f"kappa.{lab}"] = _fmt(kap[0, mi])
        else:
            for ci, c in enumerate(comps):
                row[f"kappa.{lab}.{c}"] = _fmt(kap[ci, mi])
    for mi, lab in enumerate(labels):
        for ci, c in enumerate(comps):
            row[f"logq.{lab}.{c}"] = _fmt(lq[ci, mi])
        row[f"logq.{lab}"] = _fmt(lq[:, mi].sum())
    row.update({"wall_time_s": f"{wall:.3f}", rundir.PDB_COLUMN: files["pdb"], rundir.TRAJ_COLUMN: traj_rel,
                rundir.TRACES_COLUMN: files["traces"]})
    return row


# ----------------------------------------------------------------------------------- the run
def generate(cfg: Any = None, /, **kwargs: Any) -> GenerateSummary:
    """Generate backbones; same options as the ``generate_backbones`` CLI.

    ``cfg`` may be a dict, an OmegaConf config or a :class:`GenerateConfig`; ``kwargs`` override it;
    ``preset="paper_or"`` starts from ``configs/generate/paper_or.yaml``. Unset keys take the
    defaults of ``configs/generate_backbones.yaml``. ``models`` may also hold ScoreModel objects.

    Raises :class:`GenerateError` on bad input (nothing written) and :class:`GenerationFailed` when
    sampling produced NaN/inf (that batch is not written; earlier complete samples are kept).
    """
    t_start = time.perf_counter()
    over: dict[str, Any] = {}
    if cfg is not None:
        if isinstance(cfg, GenerateConfig):
            over.update({k: asdict(v) if is_dataclass(v) else v for k, v in ((k, getattr(cfg, k)) for k in FIELDS)})
        else:
            try:
                from omegaconf import DictConfig, OmegaConf

                if isinstance(cfg, DictConfig):
                    cfg = OmegaConf.to_container(cfg, resolve=True)
            except ImportError:  # pragma: no cover
                pass
            if not isinstance(cfg, Mapping):
                raise GenerateError(f"generate: expected a mapping of options, got {type(cfg).__name__}")
            over.update(strip_hydra(dict(cfg)))
    over.update(kwargs)
    preset = over.pop("preset", None)
    return generate_from_config(load_config(over, preset=preset), t_start=t_start)


def generate_from_config(config: Mapping[str, Any], t_start: float | None = None) -> GenerateSummary:
    """Run a complete config (every option of :class:`GenerateConfig`, e.g. the one Hydra composed): validate
    it, check the output directory, load and check the models, then sample into the run directory."""
    t_start = time.perf_counter() if t_start is None else t_start
    opts = validate(config)
    check_out_dir(opts.out_dir, "out_dir", GenerateError)     # before loading models; created only later
    if opts.distributed:
        _start_process_group(opts)
    try:
        return _run(config, opts, t_start)
    except rundir.RunDirError as e:
        raise GenerateError(str(e)) from None
    finally:
        if opts.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _start_process_group(opts: Options) -> None:
    """Under ``torchrun``: this rank's CUDA device and the process group (NCCL on CUDA, else Gloo)."""
    import torch.distributed as dist

    if opts.device.type == "cuda":
        torch.cuda.set_device(opts.device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if opts.device.type == "cuda" else "gloo")
    opts.shard = (dist.get_rank(), dist.get_world_size())


def _device_name(device: torch.device) -> str:
    """``cpu`` or ``cuda:N`` (a bare ``cuda`` names the current CUDA device)."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _load_models(opts: Options) -> tuple[list, list[str], Any, Any]:
    """Load and check the models against each other and the options: ``(models, labels, space, rule)``."""
    models = [load_model_spec(s, opts.device, opts.precision, opts.exact) for s in opts.models]
    labels = model_labels(models, opts.models)
    space = space_for(models)
    try:
        check_compatible(space.signature(), models)
    except IncompatibleModelsError as e:
        raise GenerateError(str(e)) from None
    M = len(models)
    if opts.bias is not None and len(opts.bias) not in (M,) and not (M == 1 and len(opts.bias) == 1):
        raise GenerateError(f"bias: {len(opts.bias)} value(s) given for {M} model(s); give one per model")
    if opts.weights is not None and len(opts.weights) != M:
        raise GenerateError(f"weights: {len(opts.weights)} value(s) given for {M} model(s)")
    if opts.rule == "single" and opts.single_index >= M:
        raise GenerateError(f"single_index: {opts.single_index} out of range for {M} model(s)")
    for m, lab in zip(models, labels):
        mx = getattr(m, "max_length", None)
        if mx is not None and max(opts.lengths) > int(mx):
            raise GenerateError(f"lengths: model {lab!r} supports lengths up to {mx}; asked for {max(opts.lengths)}")
    if opts.init_logq == "model":
        lacking = [lab for m, lab in zip(models, labels) if not callable(getattr(m, "log_density", None))]
        if lacking:
            raise GenerateError(f"init_logq=model needs each model's own log-density at t = 1, which only exact "
                                f"models provide; {', '.join(lacking)} lack(s) it: use init_logq=prior")
    try:
        if fkc_run.is_fkc_run(opts):
            with warnings.catch_warnings(record=True) as wl:
                warnings.simplefilter("always")
                rule = fkc_run.fkc_rule(opts, M)
            _surface_warnings(wl, [])
        else:
            rule = make_rule(opts.rule, temperature=opts.temperature, bias=opts.bias, weights=opts.weights,
                             index=opts.single_index, bias_convention=opts.bias_convention)
    except ValueError as e:
        raise GenerateError(f"rule: {e}") from None
    return models, labels, space, rule


def _run(config: Mapping[str, Any], opts: Options, t_start: float) -> GenerateSummary:
    models, labels, space, rule = _load_models(opts)
    compile_models(models, opts.compile, opts.device, opts.compile_mode, labels, _log)
    scfg = sampler_config(opts)
    # resolved config (what config.yaml records): device and precision as resolved, not "auto"
    resolved = {k: config[k] for k in FIELDS}
    resolved["models"] = [m if isinstance(m, str) else f"<object {lab}>" for m, lab in zip(opts.models, labels)]
    resolved["lengths"] = list(opts.lengths)
    resolved["exact"] = dict(opts.exact)
    resolved["smc"] = dict(opts.smc)
    resolved["clash_guidance"] = dict(opts.clash_guidance)
    # under torchrun each rank runs on its own cuda:LOCAL_RANK, so the shared file records the device type
    resolved["device"] = opts.device.type if opts.distributed else _device_name(opts.device)
    auto = auto_precision(models)
    resolved["precision"] = canon_precision(opts.precision, auto)
    resolved["out_dir"] = str(opts.out_dir)
    resolved["compile"] = str(resolve_compile(opts.compile, opts.device)).lower()

    out_dir = opts.out_dir
    rundir.check_resume(out_dir, resolved, lambda c: canonical(c, auto))
    rundir.read_samples(out_dir)                 # unreadable csv: refuse before writing anything
    rundir.prepare_run_dir(out_dir)
    with rundir.RunLock(out_dir, rundir.lock_name(*opts.shard)):
        return _generate_into(out_dir, opts, models, labels, space, rule, scfg, resolved, t_start)


def _generate_into(out_dir: Path, opts: Options, models: list, labels: list[str], space, rule, scfg,
                   resolved: dict, t_start: float) -> GenerateSummary:
    rank, world = opts.shard
    if world == 1:
        rundir.remove_stale_temp_files(out_dir)   # with shards, another process may be writing its temp files
    csv_path = out_dir / rundir.shard_csv(rank, world)
    old_rows = rundir.read_samples(out_dir)
    rundir.write_run_config(out_dir, resolved)

    rows = rundir.complete_rows(out_dir, old_rows)              # rows whose PDB vanished are redone
    if fkc_run.is_fkc_run(opts):     # particles of a group interact: a group resumes as a whole
        keep = fkc_run.complete_groups(rows, opts.smc["group_size"])
        rows = {k: r for k, r in rows.items() if k in keep}
    done = set(rows)
    skipped = sum(1 for L in opts.lengths for i in range(opts.samples_per_length) if (L, i) in done)
    comps = space.names
    scale = angstrom_per_unit(space)
    cols = rundir.samples_columns(labels, comps, opts.kappa_scope, opts.bias_convention)
    if fkc_run.is_fkc_run(opts):
        cols = cols[:cols.index("wall_time_s")] + list(fkc_run.FKC_COLUMNS) + cols[cols.index("wall_time_s"):]

    pad = opts.pad_lengths and all(supports_padding(m) for m in models)
    if opts.pad_lengths and not pad:
        _log("pad_lengths=true ignored: not every model supports padded batches")
    batches = shard_batches(opts.lengths, opts.samples_per_length, opts.batch_size, pad, done, rank, world)
    todo = [x for bt in batches for x in bt]
    if world > 1:
        # the shard file holds this shard's rows only (plus those of its own interrupted earlier run)
        own = {rundir.row_key(r) for r in rundir.read_rows(csv_path)} - {None}
        rows = {k: r for k, r in rows.items() if k in own}

    warned: list[str] = []
    pbar = _progress_bar(len(todo)) if opts.progress and todo else None
    generated = 0
    touched_lengths: set[int] = set()
    try:
        for batch in batches:
            for (L, i), row in _run_batch(out_dir, batch, pad, opts, models, labels, space, rule, scfg, comps,
                                          scale, warned, pbar, generated):
                rows[(L, i)] = row
                touched_lengths.add(L)
                generated += 1
            rundir.write_rows(csv_path, list(rows.values()), cols)
        if world > 1:
            rows = rundir.merge_shard(out_dir, csv_path, cols)
        else:                        # rows of an interrupted sharded run are folded into samples.csv
            rundir.fold_shard_csvs(out_dir, list(rows.values()), cols)
        if opts.plots:
            _plot_lengths(out_dir, opts.lengths, touched_lengths, rows)
    finally:
        if pbar is not None:
            pbar.close()
    return GenerateSummary(out_dir=out_dir, generated=generated, skipped=skipped, lengths=opts.lengths,
                           models=labels, wall_time_s=time.perf_counter() - t_start,
                           csv_path=out_dir / rundir.SAMPLES_CSV,
                           rows=sorted(rows.values(), key=lambda r: (int(r["length"]), int(r["sample"]))),
                           warnings=warned)


def _guide(opts: Options, space) -> ClashGuide | None:
    """The clash guide of ``opts.clash_guidance`` (None when its weight is 0)."""
    g = opts.clash_guidance
    if not g["weight"] > 0:
        return None
    return ClashGuide(space, angstrom_per_unit(space), weight=g["weight"], t_max=g["t_max"], d0=g["distance"])


def _run_batch(out_dir: Path, batch: list[tuple[int, int]], pad: bool, opts: Options, models: list, labels: list[str],
               space, rule, scfg, comps: list[str], scale: float, warned: list[str], pbar, generated: int) -> list:
    """Sample one batch and write its samples; ``[((length, index), row)]``. Nothing of the batch is written
    when sampling or a final structure fails."""
    B = len(batch)
    Ls = [L for L, _ in batch]
    N = max(Ls)
    seeds = [sample_seed(opts.seed, L, i) for L, i in batch]
    mask = None
    if pad and min(Ls) != N:
        mask = torch.zeros(B, N, dtype=torch.float64, device=opts.device)
        for b, L in enumerate(Ls):
            mask[b, :L] = 1
    guide = _guide(opts, space)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")

        def cb(s: int, n: int) -> None:
            _surface_warnings(wl, warned)
            if pbar is not None:
                pbar.update(generated + B * s / n - pbar.n)
        try:
            res = superpose(space, models, rule, scfg, seeds, {"rot": (N,), "trans": (N, 3)}, mask=mask,
                            save_trajectory=opts.save_traj, callback=cb, check_models=False,
                            smc=smc_config(opts) if fkc_run.is_fkc_run(opts) else None, guide=guide)
        except SamplingError as e:
            names = ", ".join(f"length {L} sample {i}" for L, i in batch)
            raise GenerationFailed(f"sampling failed in the batch of [{names}]: {e}; nothing of this "
                                   "batch was written (complete samples are kept; rerun to resume)") from None
        _surface_warnings(wl, warned)
    mstar = _final_choice(res)
    try:
        preds = _final_predictions(res, models, mstar, mask, opts)
    except Exception as e:
        raise GenerationFailed(f"the final prediction failed ({type(e).__name__}: {e}); nothing of this "
                               "batch was written") from None
    dt = (time.perf_counter() - t0) / B
    finals = _final_frames(res, batch, mstar, preds, labels, scale, guide, opts.refine)
    for b, (L, i) in enumerate(batch):
        if not all(bool(torch.isfinite(v).all()) for v in finals[b][:2]):
            raise GenerationFailed(f"length {L} sample {i}: the final structure is not finite; nothing "
                                   "of this batch was written")
    out = []
    for b, (L, i) in enumerate(batch):
        row = _write_sample(out_dir, res, b, L, i, seeds[b], opts, labels, comps, dt, scale, finals[b])
        if res.log_weight is not None:
            row.update(fkc_run.fkc_cells(res, b, batch, opts.smc["group_size"]))
        out.append(((L, i), row))
    return out


def _plot_lengths(out_dir: Path, lengths: Sequence[int], touched: set[int], rows: Mapping) -> None:
    """Trace plots of every length sampled now or still without plots."""
    for L in sorted(set(lengths)):
        if L in touched or not (out_dir / f"length_{L}" / "kappa_traces.png").is_file():
            traces = [out_dir / r[rundir.TRACES_COLUMN] for (LL, _), r in rows.items()
                      if LL == L and r.get(rundir.TRACES_COLUMN) and (out_dir / r[rundir.TRACES_COLUMN]).is_file()]
            if traces:
                plot_length_traces(out_dir / f"length_{L}", traces)
                lrows = [r for (LL, _), r in sorted(rows.items()) if LL == L and r.get("log_weight") not in (None, "")]
                if lrows:
                    fkc_run.plot_weights(out_dir, L, [out_dir / r[rundir.TRACES_COLUMN] for r in lrows], lrows)
