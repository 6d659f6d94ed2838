"""``generate_backbones``: sample protein backbones from a superposition of frame models.

Python API::

    from superdiff_protein.cli.generate import generate
    summary = generate(rule="or", lengths=[60, 100], samples_per_length=8, num_steps=200, seed=0,
                       out_dir="runs/or")
    print(summary.text())

Command line (Hydra, ``configs/generate_backbones.yaml``; every key can be overridden)::

    generate_backbones rule=or lengths=[60,100] samples_per_length=8 num_steps=200 seed=0 out_dir=runs/or
    generate_backbones generate=paper_or out_dir=runs/paper_or         # a preset (configs/generate/)

Public config keys (a contract: scripts call them): ``models``, ``rule``, ``temperature``, ``bias``,
``kappa_scope``, ``estimator``, ``num_steps``, ``min_t``, ``noise_scale``, ``lengths``,
``samples_per_length``, ``batch_size``, ``seed``, ``device``, ``precision``, ``out_dir``, ``save_traj``.
Further keys (``final``, ``sampling``, ``time_grid``, ...) are documented in the yaml file and
``docs/tutorial.md``.

Outputs (``layout=flat``, the default)::

    out_dir/config.yaml                       resolved config (device and precision as resolved)
    out_dir/samples.csv                       one row per sample (rewritten atomically)
    out_dir/length_{L}/sample_{i}.pdb         backbone N, CA, C, O in Angstrom
    out_dir/length_{L}/sample_{i}_traj.pdb    with save_traj=true (model 1 = noise at t=1)
    out_dir/length_{L}/sample_{i}_traces.npz  kappa and log q per step, model and component
    out_dir/length_{L}/kappa_traces.png, logq_traces.png

``layout=framediff`` writes FrameDiff's per-sample folders instead (``experiments/inference_se3_diffusion.py``
of jasonkyuyim/se3_diffusion @ 53359d7): ``length_{L}/sample_{i}/sample_1.pdb``, with save_traj=true
``length_{L}/sample_{i}/bb_traj_1.pdb`` (FrameDiff's order: model 1 = the last state, at min_t; the last
model = t=1), and ``length_{L}/sample_{i}/traces.npz``; ``evaluate_backbones`` then writes
``length_{L}/sample_{i}/self_consistency/sc_results.csv`` with FrameDiff's columns.

Determinism: every sample owns a seed derived from ``(seed, L, i)`` and its own random stream, and
the analytic path runs in float64, so a sample's PDB does not depend on the batch it ran in. A sample
is complete when its PDB and its ``samples.csv`` row exist; a rerun into the same directory skips
complete samples (and refuses a directory written with different sampling settings).
"""
from __future__ import annotations

import csv
import hashlib
import importlib
import inspect
import io
import math
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..core.igso3 import igso3_dlog_domega, igso3_log_density
from ..core.kappa import BIAS_CONVENTIONS, make_rule
from ..core.protocol import IncompatibleModelsError, ModelOutput, check_compatible
from ..core.sampler import BiasedEstimatorWarning, SamplerConfig, SamplingError, superpose
from ..core.spaces import ProductSpace, frame_space
from ..frames.geometry import backbone_atoms_from_frames, frames_from_backbone, psi_from_backbone, so3_log
from ..frames.pdb_io import PDBWriteError, format_backbone_pdb, write_trajectory_pdb
from ..runs.atomic import atomic_open
from .common import UserError, check_out_dir, run_hydra
from .common import resolve_device as _resolve_device

__all__ = [
    "GenerateConfig",
    "GenerateError",
    "GenerationFailed",
    "GenerateSummary",
    "ExactFrameMixture",
    "generate",
    "load_config",
    "parse_lengths",
    "sample_seed",
    "resolve_models",
    "load_exact_model",
    "build_exact_frame_set",
    "plot_ca_trace",
    "main",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
CONFIG_NAME = "generate_backbones"
EXACT_FRAMES_FILE = REPO_ROOT / "models" / "checkpoints" / "exact_frames_pdownb.pt"
EXACT_FORMAT = "superdiff_exact_frames"
MAX_LENGTH = 2000            # longer chains are refused as absurd
MAX_SAMPLES = 1_000_000
NM_TO_ANGSTROM = 10.0        # frame models' translations live in nm (FrameDiff's coordinate_scaling 0.1)
_PROG = "generate_backbones"

# Keys whose change changes the samples: a rerun into a directory written with other values is refused.
# (``layout`` changes no sample but where its files are; mixing layouts in one directory is refused too.)
_SAMPLE_KEYS = ("models", "rule", "temperature", "bias", "kappa_scope", "estimator", "num_steps", "min_t",
                "noise_scale", "seed", "precision", "final", "sampling", "time_grid", "num_probes",
                "and_correction", "weights", "single_index", "exact", "bias_convention", "layout")
LAYOUTS = ("flat", "framediff")
TIME_GRIDS = ("uniform", "quadratic", "framediff")


# ------------------------------------------------------------------------------------------ errors
class GenerateError(RuntimeError, UserError):
    """Bad input or environment: nothing was written for the offending request (exit code 2)."""

    exit_code = 2


class GenerationFailed(GenerateError):
    """Sampling failed (NaN/inf): the failing batch was not written (exit code 1)."""

    exit_code = 1


# ------------------------------------------------------------------------------------------ config
@dataclass
class GenerateConfig:
    """All options of :func:`generate` (mirrors ``configs/generate_backbones.yaml``)."""

    models: Any = field(default_factory=lambda: ["default-helix", "default-strand"])
    rule: str = "or"
    temperature: float = 1.0
    bias: Any = None
    kappa_scope: str = "joint"
    estimator: str = "ito"
    num_steps: int = 100
    min_t: float = 0.01
    noise_scale: float = 1.0
    lengths: Any = 100                # an int, a list, "60-150:10", "60,80,100" or {start, stop, step}
    samples_per_length: int = 10
    batch_size: int = 10
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    out_dir: str = "generated_backbones"
    save_traj: bool = False
    final: str = "prediction"
    sampling: str = "sde"
    time_grid: str = "uniform"
    num_probes: int = 1
    and_correction: bool = True
    bias_convention: str = "algorithm1"
    weights: Any = None
    single_index: int = 0
    pad_lengths: bool = False
    traj_stride: int = 1
    plots: bool = True
    progress: bool = True
    layout: str = "flat"
    exact: Any = field(default_factory=lambda: {"trans_std": 0.1, "windows_per_chain": 4})
    shard: Any = None


_FIELDS = [f.name for f in fields(GenerateConfig)]


def _strip_hydra(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("hydra", "defaults")}


def load_config(overrides: Mapping[str, Any] | None = None, preset: str | None = None) -> dict:
    """Defaults from ``configs/generate_backbones.yaml`` (dataclass defaults when the file is absent),
    then the preset ``configs/generate/<preset>.yaml``, then ``overrides``. Returns a plain dict."""
    from omegaconf import OmegaConf

    base = _dataclass_defaults()
    yml = CONFIG_DIR / f"{CONFIG_NAME}.yaml"
    if yml.is_file():
        base.update(_strip_hydra(OmegaConf.to_container(OmegaConf.load(yml), resolve=False)))
    if preset:
        pf = CONFIG_DIR / "generate" / f"{preset}.yaml"
        if not pf.is_file():
            avail = sorted(p.stem for p in (CONFIG_DIR / "generate").glob("*.yaml"))
            raise GenerateError(f"unknown preset {preset!r}; available: {avail}")
        base.update(_strip_hydra(OmegaConf.to_container(OmegaConf.load(pf), resolve=False)))
    if overrides:
        for k, v in overrides.items():
            if k == "exact" and isinstance(v, Mapping):
                base["exact"] = {**(base.get("exact") or {}), **dict(v)}
            else:
                base[k] = v
    return base


def _dataclass_defaults() -> dict:
    c = GenerateConfig()
    return {k: getattr(c, k) for k in _FIELDS}


def parse_lengths(spec: Any) -> list[int]:
    """Chain lengths from an int, a list, a range string or a ``{start, stop, step}`` mapping.

    ``"60-150:10"`` -> 60, 70, ..., 150 (``stop`` is included when the step hits it; step defaults
    to 1); ``"60,80,100"``; ``{start: 60, stop: 150, step: 10}`` (same inclusive ``stop``); lists
    may mix ints and such strings. Order is kept, duplicates dropped. Each length must lie in
    [1, MAX_LENGTH].
    """
    out: list[int] = []

    def rng(start, stop, step, what) -> list[int]:
        a, b, s = _int(start, what), _int(stop, what), _int(step, what)
        if s < 1:
            raise GenerateError(f"lengths: step must be >= 1 in {what!r}")
        if b < a:
            raise GenerateError(f"lengths: stop < start in {what!r}")
        if (b - a) // s + 1 > 100_000:
            raise GenerateError(f"lengths: range {what!r} has too many values")
        return list(range(a, b + 1, s))

    def add(item) -> None:
        if isinstance(item, bool):
            raise GenerateError(f"lengths: {item!r} is not a length")
        if isinstance(item, (int, np.integer)):
            out.append(int(item))
        elif isinstance(item, float):
            out.append(_int(item, item))
        elif isinstance(item, str):
            s = item.strip()
            if "," in s:
                for part in s.split(","):
                    if part.strip():
                        add(part.strip())
                return
            m = re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)(?:\s*:\s*(-?\d+))?", s)
            if m:
                out.extend(rng(m.group(1), m.group(2), m.group(3) or 1, s))
            elif re.fullmatch(r"-?\d+", s):
                out.append(int(s))
            else:
                raise GenerateError(f"lengths: cannot parse {item!r} (use e.g. 100, [60,100], '60-150:10' "
                                    "or {start: 60, stop: 150, step: 10})")
        elif isinstance(item, Mapping):
            extra = set(item) - {"start", "stop", "step"}
            if extra or not {"start", "stop"} <= set(item):
                raise GenerateError(f"lengths: a range mapping needs keys start, stop[, step]; got {sorted(item)}")
            out.extend(rng(item["start"], item["stop"], item.get("step", 1), dict(item)))
        elif isinstance(item, Iterable):
            for x in item:
                if isinstance(x, (list, tuple)):
                    raise GenerateError("lengths: nested lists are not allowed")
                add(x)
        else:
            raise GenerateError(f"lengths: cannot parse {item!r}")

    if spec is None:
        raise GenerateError("lengths: no lengths given")
    add(spec)
    if not out:
        raise GenerateError("lengths: no lengths given")
    for n in out:
        if n < 1:
            raise GenerateError(f"lengths: {n} is not a valid chain length (must be >= 1)")
        if n > MAX_LENGTH:
            raise GenerateError(f"lengths: {n} residues is beyond the supported maximum of {MAX_LENGTH}")
    return list(dict.fromkeys(out))


def _int(v: Any, what: Any) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise GenerateError(f"{what!r}: expected an integer, got {v!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise GenerateError(f"{what!r}: expected an integer, got {v!r}")
    return int(f)


def sample_seed(seed: int, length: int, index: int) -> int:
    """Seed of sample ``index`` of length ``length``: a hash of (seed, length, index), so it does not
    depend on the batch size, the order of lengths or how many samples per length are asked for."""
    h = hashlib.sha256(f"superdiff_protein.generate:{int(seed)}:{int(length)}:{int(index)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass
class _Opts:
    """Validated, typed options."""

    models: list
    rule: str
    temperature: float
    bias: list[float] | None
    kappa_scope: str
    estimator: str
    num_steps: int
    min_t: float
    noise_scale: float
    lengths: list[int]
    samples_per_length: int
    batch_size: int
    seed: int
    device: torch.device
    precision: str
    out_dir: Path
    save_traj: bool
    final: str
    sampling: str
    time_grid: str
    num_probes: int
    and_correction: bool
    bias_convention: str
    weights: list[float] | None
    single_index: int
    pad_lengths: bool
    traj_stride: int
    plots: bool
    progress: bool
    layout: str
    exact: dict
    shard: tuple[int, int] = (0, 1)
    distributed: bool = False


def _num(v: Any, key: str) -> float:
    if isinstance(v, bool):
        raise GenerateError(f"{key}: expected a number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise GenerateError(f"{key}: expected a number, got {v!r}") from None
    if not math.isfinite(f):
        raise GenerateError(f"{key}: must be finite, got {v!r}")
    return f


def _int_in(v: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(v, bool):
        raise GenerateError(f"{key}: expected an integer, got {v!r}")
    i = _int(v, key)
    if not lo <= i <= hi:
        raise GenerateError(f"{key}: must lie in [{lo}, {hi}], got {i}")
    return i


def _bool(v: Any, key: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, np.integer)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise GenerateError(f"{key}: expected true/false, got {v!r}")


def _choice(v: Any, key: str, choices: Sequence[str]) -> str:
    s = str(v).lower()
    if s not in choices:
        raise GenerateError(f"{key}: must be one of {', '.join(choices)}; got {v!r}")
    return s


def _num_list(v: Any, key: str) -> list[float] | None:
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [_num(v, key)]
    if isinstance(v, str) or not isinstance(v, Iterable):
        raise GenerateError(f"{key}: expected a list of numbers (one per model), got {v!r}")
    return [_num(x, key) for x in v]


def resolve_device(spec: Any) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; refuses absent CUDA devices."""
    return _resolve_device(spec, "device", GenerateError)


def _validate(c: Mapping[str, Any]) -> _Opts:
    unknown = set(c) - set(_FIELDS)
    if unknown:
        raise GenerateError(f"unknown option(s) {sorted(unknown)}; valid options: {', '.join(_FIELDS)}")
    models = c["models"]
    if models is None:
        models = load_config()["models"] or GenerateConfig().models
    elif (isinstance(models, (list, tuple)) and not models) or (isinstance(models, str) and not models.strip()):
        raise GenerateError(f"models: the list is empty (got {models!r}); give at least one model, or leave "
                            "models out to use the defaults "
                            f"{', '.join(map(str, load_config()['models'] or GenerateConfig().models))}")
    if isinstance(models, (str, os.PathLike)) or not isinstance(models, Iterable):
        models = [models]
    models = [os.fspath(m) if isinstance(m, os.PathLike) else m for m in models]
    if not models:
        raise GenerateError("models: no model given")
    temperature = _num(c["temperature"], "temperature")
    if temperature <= 0:
        raise GenerateError(f"temperature: T must be > 0, got {temperature:g}")
    min_t = _num(c["min_t"], "min_t")
    if not 0.0 <= min_t < 1.0:
        raise GenerateError(f"min_t: must lie in [0, 1), got {min_t:g}")
    noise = _num(c["noise_scale"], "noise_scale")
    if noise < 0:
        raise GenerateError(f"noise_scale: must be >= 0, got {noise:g}")
    exact = dict(c.get("exact") or {})
    bad = set(exact) - {"trans_std", "windows_per_chain"}
    if bad:
        raise GenerateError(f"exact: unknown option(s) {sorted(bad)} (valid: trans_std, windows_per_chain)")
    exact = {"trans_std": _num(exact.get("trans_std", 0.1), "exact.trans_std"),
             "windows_per_chain": _int_in(exact.get("windows_per_chain", 4), "exact.windows_per_chain", 1, 1000)}
    if exact["trans_std"] <= 0:
        raise GenerateError("exact.trans_std must be > 0 (Angstrom)")
    out_dir = c["out_dir"]
    if out_dir is None or str(out_dir).strip() == "":
        raise GenerateError("out_dir: an output directory is required")
    if (str(c["bias_convention"]).lower() == "official" and str(c["rule"]).lower() == "and"
            and c["bias"] is not None):
        raise GenerateError("bias_convention=official is defined for rule=or only (the official code's AND bias is "
                            "another scheme, not implemented); drop it, or use bias_convention=algorithm1, with which "
                            "AND drives log q_i - log q_1 to l_i - l_1")
    return _Opts(
        models=list(models),
        rule=_choice(c["rule"], "rule", ("or", "and", "average", "single")),
        temperature=temperature,
        bias=_num_list(c["bias"], "bias"),
        kappa_scope=_choice(c["kappa_scope"], "kappa_scope", ("joint", "per_component")),
        estimator=_choice(c["estimator"], "estimator", ("ito", "hutchinson")),
        num_steps=_int_in(c["num_steps"], "num_steps", 1, 100_000),
        min_t=min_t,
        noise_scale=noise,
        lengths=parse_lengths(c["lengths"]),
        samples_per_length=_int_in(c["samples_per_length"], "samples_per_length", 1, MAX_SAMPLES),
        batch_size=_int_in(c["batch_size"], "batch_size", 1, 100_000),
        seed=_int_in(c["seed"], "seed", 0, 2**63 - 1),
        precision=_choice(c["precision"], "precision", ("auto", "float32", "float64", "bf16", "bfloat16")),
        out_dir=Path(os.path.expanduser(str(out_dir))),
        save_traj=_bool(c["save_traj"], "save_traj"),
        final=_choice(c["final"], "final", ("prediction", "state")),
        sampling=_choice(c["sampling"], "sampling", ("sde", "ode")),
        time_grid=_choice(c["time_grid"], "time_grid", TIME_GRIDS),
        num_probes=_int_in(c["num_probes"], "num_probes", 1, 1000),
        and_correction=_bool(c["and_correction"], "and_correction"),
        bias_convention=_choice(c["bias_convention"], "bias_convention", BIAS_CONVENTIONS),
        weights=_num_list(c["weights"], "weights"),
        single_index=_int_in(c["single_index"], "single_index", 0, 10_000),
        pad_lengths=_bool(c["pad_lengths"], "pad_lengths"),
        traj_stride=_int_in(c["traj_stride"], "traj_stride", 1, 100_000),
        plots=_bool(c["plots"], "plots"),
        progress=_bool(c["progress"], "progress"),
        layout=_choice(c["layout"], "layout", LAYOUTS),
        exact=exact,
        **_shard_opts(c.get("shard"), resolve_device(c["device"])),
    )


def _shard_opts(spec: Any, device: torch.device) -> dict:
    """This process's share of the work: ``(index, count)``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the rank and world size come from torch.distributed and each
    rank takes ``cuda:LOCAL_RANK``; otherwise ``shard="i/n"`` (e.g. one Hydra multirun job per shard)
    or no sharding. Work is split by *batches* of the single-process batch plan, so every batch is the
    one a single process would run and the samples are the same.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        if spec not in (None, "", "null"):
            raise GenerateError("shard: do not combine shard= with torchrun (the rank decides the shard)")
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if device.type == "cuda":
            if local >= torch.cuda.device_count():
                raise GenerateError(f"torchrun: LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA "
                                    "device(s)")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return {"shard": (dist.get_rank(), dist.get_world_size()), "distributed": True, "device": device}
    if spec in (None, "", "null"):
        return {"shard": (0, 1), "distributed": False, "device": device}
    try:
        i, n = (int(v) for v in str(spec).split("/"))
    except ValueError:
        raise GenerateError(f"shard: expected 'i/n' (e.g. 0/4), got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise GenerateError(f"shard: need 0 <= i < n, got {spec!r}")
    return {"shard": (i, n), "distributed": False, "device": device}


# ------------------------------------------------------------------------------- exact frame models
class ExactFrameMixture:
    """An exact score model on SE(3)^N: a joint mixture over windows of real protein chains.

    Every mode ``k`` is one contiguous ``N``-residue window of a real chain (frames from its N, CA,
    C atoms; CA centred, in nm): at data time the rotations are the mode's rotations (blurred to
    IGSO(3) by the schedule's ``sigma_min``) and the translations are Gaussian around the mode's CA
    positions with standard deviation ``trans_std`` (Angstrom). Under the forward SDEs of ``space``
    the marginals are closed-form::

        q_t(R, x) = 1/K sum_k prod_n IGSO3(R_n; R_kn, sigma(t)) N(x_n; alpha_t m_kn, alpha_t^2 v0 + sigma_t^2)

    so scores and log-densities are exact. The mixture is joint (rotations and translations of a
    sample come from the same window), unlike ``models.analytic.frame_mixture_model``. The model
    adapts to any length ``N <= max_length`` (modes are built per length and cached); it does not
    support padded batches.

    ``extras``: ``pred_rotmats`` / ``pred_trans`` (Angstrom) -- the posterior mean of the clean
    frames given the most responsible mode (that mode's rotations; Tweedie's formula for the
    translations) -- and ``psi`` (sin, cos) of that mode, as neural frame models report them.
    """

    supports_padding = False

    def __init__(self, chains: Sequence[Tensor], space: ProductSpace, name: str = "exact",
                 trans_std: float = 0.1, windows_per_chain: int = 4, chain_names: Sequence[str] | None = None):
        if not chains:
            raise ValueError("ExactFrameMixture needs at least one chain")
        self.chains = [torch.as_tensor(c, dtype=torch.float64) for c in chains]   # (L, 4, 3) Angstrom N, CA, C, O
        for c in self.chains:
            if c.dim() != 3 or c.shape[1:] != (4, 3) or not torch.isfinite(c).all():
                raise ValueError("chains must be finite (L, 4, 3) N, CA, C, O arrays")
        self.chain_names = list(chain_names) if chain_names is not None else [f"chain{i}" for i in range(len(chains))]
        self.space = space
        self.name = name
        self.to_angstrom = _angstrom_per_unit(space)
        self.trans_var = (float(trans_std) / self.to_angstrom) ** 2               # (space units)^2
        self.windows_per_chain = int(windows_per_chain)
        self.max_length = max(int(c.shape[0]) for c in self.chains)
        self._cache: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}

    def signature(self) -> dict:
        return self.space.signature()

    def init_state(self, batch: int, mask: Tensor | None):
        return None

    def windows(self, n: int) -> list[tuple[int, int]]:
        """(chain index, start) of the modes of length ``n``."""
        if not 1 <= n <= self.max_length:
            raise ValueError(f"model {self.name!r} supports lengths 1..{self.max_length}, got {n}")
        out = []
        for ci, c in enumerate(self.chains):
            L = int(c.shape[0])
            if L < n:
                continue
            w = min(self.windows_per_chain, L - n + 1)
            starts = sorted({int(round(s)) for s in np.linspace(0, L - n, w)})
            out += [(ci, s) for s in starts]
        return out

    def modes(self, n: int, dtype=torch.float64, device="cpu") -> tuple[Tensor, Tensor, Tensor]:
        """Rotations (K, n, 3, 3), centred CA in nm (K, n, 3) and psi (K, n, 2) of the length-``n`` modes."""
        key = (n, dtype, str(device))
        if key not in self._cache:
            rots, trans, psis = [], [], []
            for ci, s in self.windows(n):
                a = self.chains[ci][s:s + n]
                r, ca = frames_from_backbone(a[:, 0], a[:, 1], a[:, 2])
                u, _, vh = torch.linalg.svd(r)                  # exact rotations (the eps of
                rots.append(u @ vh)                             # frames_from_backbone leaves ~1e-9)
                trans.append((ca - ca.mean(0)) / self.to_angstrom)
                psis.append(psi_from_backbone(a[:, 0], a[:, 1], a[:, 2], a[:, 3]))
            self._cache[key] = tuple(torch.stack(v).to(device=device, dtype=dtype) for v in (rots, trans, psis))
        return self._cache[key]

    def _terms(self, x: dict[str, Tensor], t: Tensor):
        rot, tr = x["rot"], x["trans"]
        R, m, _ = self.modes(rot.shape[1], rot.dtype, rot.device)
        rs = self.space.components["rot"].schedule
        vs = self.space.components["trans"].schedule
        t = t.to(rot.dtype)
        sig = rs.sigma(t)[:, None, None]                                        # (B, 1, 1)
        v = so3_log(R.transpose(-1, -2)[None] @ rot[:, None])                   # (B, K, N, 3)
        omega = v.norm(dim=-1)
        lc_rot = igso3_log_density(omega, sig).sum(-1)                          # (B, K)
        a = vs.alpha(t).to(tr.dtype)[:, None, None, None]
        var = a * a * self.trans_var + vs.sigma(t).to(tr.dtype)[:, None, None, None] ** 2
        diff = tr[:, None] - a * m[None]                                        # (B, K, N, 3)
        lc_tr = (-0.5 * (diff * diff / var + torch.log(2 * math.pi * var))).flatten(2).sum(-1)
        lc = lc_rot + lc_tr - math.log(R.shape[0])
        return lc, v, omega, sig, diff, var, a

    def __call__(self, x, t, mask, state) -> ModelOutput:
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError(f"model {self.name!r} does not support padded residues")
        lc, v, omega, sig, diff, var, a = self._terms(x, t)
        resp = torch.softmax(lc, -1)                                            # (B, K)
        tiny = 1e-6 if v.dtype == torch.float64 else 1e-3
        rot_sc = (igso3_dlog_domega(omega, sig) / omega.clamp_min(tiny))[..., None] * v
        rot_score = (resp[..., None, None] * rot_sc).sum(1)
        tr_score = (resp[..., None, None] * (-diff / var)).sum(1)
        with torch.no_grad():
            R, m, psi = self.modes(x["rot"].shape[1], x["rot"].dtype, x["rot"].device)
            k = resp.argmax(-1)                                                 # (B,)
            a_b, var_b = a[:, 0], var[:, 0]                                     # (B, 1, 1)
            x0 = m[k] + (a_b * self.trans_var / var_b) * (x["trans"] - a_b * m[k])
            extras = {"pred_rotmats": R[k], "pred_trans": x0 * self.to_angstrom, "psi": psi[k], "mode_index": k}
        return ModelOutput({"rot": rot_score, "trans": tr_score}, None, extras)

    def denoise_final(self, x, t_prev, mask=None, state=None, extras=None) -> tuple[Tensor, Tensor]:
        """Predicted clean frames ``(rotmats, trans in Angstrom)`` at the final state, evaluated at
        ``t_prev`` (the last step's time), as :meth:`FrameScoreModel.denoise_final` does for networks."""
        B = x["trans"].shape[0]
        t = torch.as_tensor(t_prev, dtype=x["trans"].dtype, device=x["trans"].device).expand(B)
        ex = self(x, t, mask, state).extras
        return ex["pred_rotmats"], ex["pred_trans"]

    def log_prob(self, x, t, mask=None) -> Tensor:
        """Exact joint ``log q_t(R, x)`` per sample (B,)."""
        return torch.logsumexp(self._terms(x, t)[0], -1)


def _angstrom_per_unit(space: ProductSpace) -> float:
    """Angstrom per unit of the space's ``trans`` component (10 for FrameDiff's nm)."""
    cs = getattr(space.components.get("trans"), "coordinate_scaling", None)
    return 1.0 / float(cs) if cs else NM_TO_ANGSTROM


def _exact_space() -> ProductSpace:
    """The frame space of the neural frame models when available (so exact and neural models can be
    superposed), else FrameDiff's schedules via :func:`frame_space`."""
    try:
        from ..frames import se3  # type: ignore[attr-defined]

        return se3.SE3Diffuser().space
    except Exception:
        return frame_space()


def load_exact_frame_set(path: str | os.PathLike = EXACT_FRAMES_FILE) -> dict:
    """The shipped file of real chains (written by :func:`build_exact_frame_set`)."""
    p = Path(path)
    if not p.is_file():
        raise GenerateError(f"exact models: data file {p} is missing (rebuild it with "
                            "superdiff_protein.cli.generate.build_exact_frame_set)")
    from ..frames.checkpoints import CheckpointError, load_checkpoint_file

    try:
        d = load_checkpoint_file(p, "cpu")
    except CheckpointError as e:
        raise GenerateError(f"exact models: {e}") from e
    if not isinstance(d, dict) or d.get("format") != EXACT_FORMAT:
        raise GenerateError(f"exact models: {p} is not a {EXACT_FORMAT} file")
    return d


EXACT_MODELS = {"exact-helix": "helix", "exact-strand": "strand", "exact-all": None}


def load_exact_model(name: str, trans_std: float = 0.1, windows_per_chain: int = 4,
                     space: ProductSpace | None = None) -> ExactFrameMixture:
    """``exact-helix`` / ``exact-strand`` (helix-rich / strand-rich PDownB chains) or ``exact-all``."""
    if name not in EXACT_MODELS:
        raise GenerateError(f"unknown exact model {name!r}; available: {', '.join(EXACT_MODELS)}")
    d = load_exact_frame_set()
    group = EXACT_MODELS[name]
    idx = [i for i, g in enumerate(d["groups"]) if group is None or g == group]
    return ExactFrameMixture([d["atoms"][i] for i in idx], space or _exact_space(), name=name,
                             trans_std=trans_std, windows_per_chain=windows_per_chain,
                             chain_names=[d["names"][i] for i in idx])


def build_exact_frame_set(archive: str | os.PathLike, members: Mapping[str, Sequence[str]],
                          out: str | os.PathLike = EXACT_FRAMES_FILE) -> Path:
    """Write the exact models' data file from real PDB files of a tar archive (e.g. PDownB).

    ``members`` maps a group name (``helix``/``strand``) to archive member paths. Each chain must be
    complete (N, CA, C, O for every residue), unbroken and free of cis peptides (all CA-CA distances
    within [3.7, 3.9] A), so every window of it is a physically valid backbone.
    """
    import tarfile

    from ..frames.pdb_io import read_backbone

    names, groups, atoms, sources = [], [], [], []
    with tarfile.open(archive) as tf, tempfile.TemporaryDirectory() as tmp:
        for group, mems in members.items():
            for mem in mems:
                tf.extract(mem, tmp, filter="data")
                bb = read_backbone(Path(tmp) / mem)
                a = np.asarray(bb.atoms, dtype=np.float64)
                if not bb.atom_mask.all():
                    raise ValueError(f"{mem}: incomplete backbone")
                d = np.linalg.norm(a[1:, 1] - a[:-1, 1], axis=-1)
                if d.min() < 3.7 or d.max() > 3.9:
                    raise ValueError(f"{mem}: chain break or cis peptide (CA-CA {d.min():.2f}..{d.max():.2f} A)")
                names.append(f"{bb.name}_{bb.chain_id}")
                groups.append(group)
                sources.append(mem)
                atoms.append(torch.from_numpy(np.round(a, 3)).to(torch.float32))
    data = {"format": EXACT_FORMAT, "version": 1, "names": names, "groups": groups, "sources": sources,
            "atoms": atoms, "note": "N, CA, C, O in Angstrom of real PDownB chains (PDB, CC0)"}
    with atomic_open(out, "wb", encoding=None) as fh:
        torch.save(data, fh)
    return Path(out)


# ------------------------------------------------------------------------------------ models
def _registry():
    try:
        from ..frames import registry  # type: ignore[attr-defined]
    except ImportError:
        return None
    return registry


def _torch_dtype(precision: str) -> torch.dtype | None:
    return {"float32": torch.float32, "float64": torch.float64, "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16}.get(precision)


def _call_with_supported(fn, *args, **kwargs):
    """Call ``fn`` passing only the keyword arguments it accepts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(*args, **kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})


def _load_one(spec: Any, opts: _Opts):
    if not isinstance(spec, str):
        if callable(spec) and hasattr(spec, "signature") and hasattr(spec, "init_state"):
            return spec                                   # a ScoreModel object (Python API)
        raise GenerateError(f"models: {spec!r} is neither a model name, a checkpoint path nor a ScoreModel")
    s = spec.strip()
    if s in EXACT_MODELS:
        return load_exact_model(s, **opts.exact)
    if s.startswith("py:"):
        target = s[3:]
        mod, _, attr = target.partition(":")
        if not mod or not attr:
            raise GenerateError(f"models: {spec!r}: a Python model is given as py:package.module:factory")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise GenerateError(f"models: cannot import {target!r} ({type(e).__name__}: {e})") from e
        try:
            model = _call_with_supported(fn, device=opts.device, dtype=_torch_dtype(opts.precision))
        except Exception as e:
            raise GenerateError(f"models: {target!r} failed to build a model ({type(e).__name__}: {e})") from e
        if not (callable(model) and hasattr(model, "signature") and hasattr(model, "init_state")):
            raise GenerateError(f"models: {target!r} returned a {type(model).__name__}, not a ScoreModel "
                                "(a callable with signature() and init_state(); docs/frame_model_protocol.md)")
        return model
    reg = _registry()
    looks_like_path = os.sep in s or s.endswith((".pt", ".pth", ".ckpt")) or Path(s).exists()
    if reg is None:
        if looks_like_path and not Path(s).exists():
            raise GenerateError(f"models: checkpoint {s!r} not found")
        if looks_like_path:
            raise GenerateError(f"models: cannot load checkpoint {s!r}: checkpoint loading needs "
                                "superdiff_protein.frames.registry, which this installation lacks")
        raise GenerateError(f"models: unknown model {s!r}; available: {', '.join(EXACT_MODELS)} "
                            "(or a checkpoint path)")
    dtype = _torch_dtype(opts.precision)
    try:
        return _call_with_supported(reg.load_model, s, device=opts.device, dtype=dtype)
    except GenerateError:
        raise
    except Exception as e:
        msg = str(e).strip() or type(e).__name__
        if type(e).__name__ == "UnknownModelError":
            raise GenerateError(f"models: {msg}; exact (analytic) models: {', '.join(EXACT_MODELS)}") from None
        raise GenerateError(f"models: cannot load {s!r}: {msg}") from None


def resolve_models(specs: Sequence[Any], opts: _Opts | None = None, **overrides) -> list:
    """Load every model spec: exact model names, registry names, checkpoint paths, ``py:module:factory``
    or ScoreModel objects."""
    if opts is None:
        opts = _validate(load_config({**overrides, "models": list(specs)}))
    return [_load_one(s, opts) for s in specs]


def _labels(models: Sequence[Any], specs: Sequence[Any]) -> list[str]:
    out, seen = [], {}
    for m, s in zip(models, specs):
        lab = str(getattr(m, "name", None) or (s if isinstance(s, str) else type(m).__name__))
        lab = re.sub(r"[^A-Za-z0-9_.:+-]", "_", Path(lab).name if os.sep in lab else lab) or "model"
        if lab in seen:
            seen[lab] += 1
            lab = f"{lab}#{seen[lab]}"
        else:
            seen[lab] = 1
        out.append(lab)
    return out


# ----------------------------------------------------------------------------------- outputs
def _sample_files(L: int, i: int, layout: str = "flat") -> dict[str, str]:
    """Paths (relative to out_dir) of sample ``i`` of length ``L``: ``pdb``, ``traj``, ``traces``.

    ``flat``: ``length_L/sample_i.pdb`` (+ ``_traj.pdb``, ``_traces.npz``). ``framediff``: FrameDiff's
    per-sample folder ``length_L/sample_i/`` with ``sample_1.pdb`` and ``bb_traj_1.pdb``
    (``experiments/inference_se3_diffusion.py``, jasonkyuyim/se3_diffusion @ 53359d7) and our ``traces.npz``.
    """
    if layout == "framediff":
        d = f"length_{L}/sample_{i}"
        return {"pdb": f"{d}/sample_1.pdb", "traj": f"{d}/bb_traj_1.pdb", "traces": f"{d}/traces.npz"}
    return {"pdb": f"length_{L}/sample_{i}.pdb", "traj": f"length_{L}/sample_{i}_traj.pdb",
            "traces": f"length_{L}/sample_{i}_traces.npz"}


def _csv_columns(labels: list[str], comps: list[str], scope: str, bias_convention: str = "algorithm1") -> list[str]:
    conv = [] if bias_convention == "algorithm1" else ["bias_convention"]   # the default's columns stay as they were
    cols = ["id", "length", "sample", "seed", "models", "rule", "temperature", "bias", *conv, "kappa_scope",
            "estimator", "noise_scale", "num_steps", "final", "final_model"]
    for lab in labels:
        if scope == "joint":
            cols.append(f"kappa.{lab}")
        else:
            cols += [f"kappa.{lab}.{c}" for c in comps]
    for lab in labels:
        cols += [f"logq.{lab}.{c}" for c in comps] + [f"logq.{lab}"]
    return cols + ["wall_time_s", "pdb_path", "traj_path", "traces_path"]


def _shard_csvs(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("samples.shard-*.csv"))


def _read_all_rows(out_dir: Path) -> list[dict]:
    """Rows of ``samples.csv`` plus those of shard files left by sharded runs (later files win)."""
    rows: dict[tuple[str, str], dict] = {}
    for p in [out_dir / "samples.csv"] + _shard_csvs(out_dir):
        for r in _read_rows(p):
            rows[(r.get("length", ""), r.get("sample", ""))] = r
    return list(rows.values())


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise GenerateError(f"{path}: cannot read the existing samples.csv ({e}); move it away or use a new out_dir")


def _write_rows(path: Path, rows: list[dict], cols: list[str]) -> None:
    rows = sorted(rows, key=lambda r: (int(r["length"]), int(r["sample"])))
    allcols = cols + [c for r in rows for c in r if c not in cols]
    allcols = list(dict.fromkeys(allcols))
    with atomic_open(path, "w", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=allcols, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in allcols})


def _yaml_text(cfg: dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(cfg))


def _device_name(device: torch.device) -> str:
    """``cpu`` or ``cuda:N`` (a bare ``cuda`` names the current CUDA device)."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bf16", torch.float16: "float16"}


def _model_weight_dtype(m: Any) -> torch.dtype | None:
    """The floating dtype of a model's weights (a FrameScoreModel's predictor, or the model itself when it
    is a torch module); None for models without weights (the exact models)."""
    for obj in (getattr(m, "predictor", None), m):
        params = getattr(obj, "parameters", None)
        if callable(params):
            try:
                for p in params():
                    if p.is_floating_point():
                        return p.dtype
            except TypeError:
                continue
    return None


def _auto_precision(models: Sequence[Any]) -> str:
    """What ``precision=auto`` resolved to for these loaded models: the dtype of the networks' weights
    (float32 unless a factory chose otherwise); ``float64`` when no model has weights (exact models
    compute in float64)."""
    names = sorted({_DTYPE_NAMES.get(d, str(d).replace("torch.", "")) for d in map(_model_weight_dtype, models)
                    if d is not None})
    return ",".join(names) if names else "float64"


def _canon_precision(v: Any, auto_precision: str) -> str:
    s = str(v).lower()
    s = {"bfloat16": "bf16"}.get(s, s)
    return auto_precision if s == "auto" else s


# options added later: a config.yaml of an older run that lacks them ran with these values
_ADDED_KEY_DEFAULTS = {"bias_convention": "algorithm1", "layout": "flat"}


def _canon(cfg: Mapping[str, Any], auto_precision: str | None = None) -> dict:
    """The sample-defining part of a config, normalised for comparison (``precision: auto`` counts as what
    it resolves to for the run's models, so a directory written before config.yaml recorded the resolved
    precision still resumes)."""
    out = {}
    for k in _SAMPLE_KEYS:
        v = cfg.get(k, _ADDED_KEY_DEFAULTS.get(k))
        if k == "precision" and v is not None and auto_precision is not None:
            v = _canon_precision(v, auto_precision)
        if k in ("temperature", "min_t", "noise_scale") and v is not None:
            v = float(v)
        if k in ("bias", "weights") and v is not None:
            v = [float(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
        if k == "models" and isinstance(v, (list, tuple)):
            v = [str(x) for x in v]
        if k == "exact" and isinstance(v, Mapping):
            v = {kk: (float(vv) if kk == "trans_std" else int(vv)) for kk, vv in v.items()}
        out[k] = v
    return out


def _check_resume(out_dir: Path, cfg: dict, auto_precision: str | None = None) -> None:
    p = out_dir / "config.yaml"
    if not p.is_file():
        return
    from omegaconf import OmegaConf

    try:
        old = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    except Exception as e:
        raise GenerateError(f"{p}: unreadable config of a previous run ({e}); use a new out_dir") from None
    a, b = _canon(old, auto_precision), _canon(cfg, auto_precision)
    diffs = [f"{k}: {a[k]!r} -> {b[k]!r}" for k in _SAMPLE_KEYS if a[k] != b[k]]
    if diffs:
        raise GenerateError(f"{out_dir} holds samples made with other settings ({'; '.join(diffs)}); "
                            "resuming would mix them: use a new out_dir (or the previous settings)")


def _prepare_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GenerateError(f"out_dir: cannot create {out_dir} ({e.strerror or e})") from None
    if not out_dir.is_dir():
        raise GenerateError(f"out_dir: {out_dir} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write_test.", dir=out_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise GenerateError(f"out_dir: {out_dir} is not writable ({e.strerror or e})") from None


class _OutDirLock:
    """``out_dir/.generate.lock`` (O_EXCL, holds the pid): two runs never write one directory at once.
    A lock left by a killed run (its pid is gone) is taken over."""

    def __init__(self, out_dir: Path, name: str = ".generate.lock"):
        self.path = out_dir / name
        self.fd: int | None = None

    def __enter__(self):
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
                    raise GenerateError(f"out_dir: another generate_backbones run (pid {pid}) is writing to "
                                        f"{self.path.parent}; wait for it or remove {self.path} if it is gone")
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
        raise GenerateError(f"out_dir: cannot lock {self.path.parent}")

    def __exit__(self, *exc):
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


def _remove_stale_temp_files(out_dir: Path) -> None:
    """Temporary files of atomic writes left by a killed run (``.<name>.<random>.tmp``)."""
    for d in [out_dir, *out_dir.glob("length_*"), *out_dir.glob("length_*/sample_*")]:
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                try:
                    p.unlink()
                except OSError:
                    pass


def _save_npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with atomic_open(path, "wb", encoding=None) as fh:
        fh.write(buf.getvalue())


def _plot_length(length_dir: Path, traces: list[Path]) -> list[Path]:
    """kappa_traces.png and logq_traces.png for one length from its samples' trace files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [np.load(p, allow_pickle=False) for p in sorted(traces, key=lambda p: _sample_index(p))]
    if not data:
        return []
    labels = [str(s) for s in data[0]["models"]]
    comps = [str(s) for s in data[0]["components"]]
    scope = str(data[0]["kappa_scope"])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []
    panels = [("joint", 0)] if scope == "joint" else [(c, i) for i, c in enumerate(comps)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, ci) in zip(axes[0], panels):
        for d in data:
            t = d["t"][:-1]
            for mi, lab in enumerate(labels):
                ax.plot(t, d["kappa"][:, ci, mi], color=colors[mi % len(colors)], lw=0.8, alpha=0.6,
                        label=lab if d is data[0] else None)
        ax.set_xlim(float(data[0]["t"][0]), float(data[0]["t"][-1]))
        ax.set_xlabel("t (sampling runs 1 -> min_t)")
        ax.set_ylabel("kappa")
        ax.set_title(f"kappa ({title}), {len(data)} samples")
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_savefig(fig, length_dir / "kappa_traces.png"))
    plt.close(fig)

    ncol = 2 if len(labels) > 1 else 1
    fig, axes = plt.subplots(1, ncol, figsize=(5.5 * ncol, 3.8), squeeze=False)
    for d in data:
        t = d["t"]
        tot = d["logq"].sum(1)                                         # (S+1, M)
        for mi, lab in enumerate(labels):
            axes[0, 0].plot(t, tot[:, mi], color=colors[mi % len(colors)], lw=0.8, alpha=0.6,
                            label=lab if d is data[0] else None)
            if ncol == 2 and mi > 0:
                axes[0, 1].plot(t, tot[:, mi] - tot[:, 0], color=colors[mi % len(colors)], lw=0.8, alpha=0.6,
                                label=f"{lab} - {labels[0]}" if d is data[0] else None)
    axes[0, 0].set_ylabel("log q_t (sum over components)")
    axes[0, 0].set_title("log-density of each model along the path")
    if ncol == 2:
        axes[0, 1].set_ylabel("log q_i - log q_1")
        axes[0, 1].set_title("log-density differences")
    for ax in axes[0]:
        ax.set_xlim(float(data[0]["t"][0]), float(data[0]["t"][-1]))
        ax.set_xlabel("t (sampling runs 1 -> min_t)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_savefig(fig, length_dir / "logq_traces.png"))
    plt.close(fig)
    return written


def _savefig(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    with atomic_open(path, "wb", encoding=None) as fh:
        fh.write(buf.getvalue())
    return path


def _sample_index(p: Path) -> int:
    """The sample index of a trace file: ``sample_3_traces.npz`` or ``sample_3/traces.npz``."""
    m = re.search(r"sample_(\d+)", p.name) or re.fullmatch(r"sample_(\d+)", p.parent.name)
    return int(m.group(1)) if m else -1


def plot_ca_trace(pdb_path: str | os.PathLike, png_path: str | os.PathLike, title: str | None = None) -> Path:
    """Render the CA trace of a backbone PDB as a 3-D line plot (PNG, matplotlib Agg), coloured from
    N- to C-terminus: a quick look at a sample without a molecular viewer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..frames.pdb_io import read_backbone

    bb = read_backbone(pdb_path)
    ca = np.asarray(bb.atoms[:, 1], dtype=np.float64)
    ca = ca - ca.mean(0)
    fig = plt.figure(figsize=(5, 5))
    ax = fig.add_subplot(projection="3d")
    cmap = plt.get_cmap("viridis")
    n = len(ca)
    for k in range(n - 1):
        ax.plot(*ca[k:k + 2].T, color=cmap(k / max(1, n - 2)), lw=2.2)
    ax.scatter(*ca.T, c=np.arange(n), cmap="viridis", s=9, depthshade=False)
    r = np.abs(ca).max()
    for setter in (ax.set_xlim, ax.set_ylim, ax.set_zlim):
        setter(-r, r)
    ax.set_box_aspect((1, 1, 1))
    ax.set_xlabel("x (A)")
    ax.set_ylabel("y (A)")
    ax.set_zlabel("z (A)")
    ax.set_title(title or f"{Path(pdb_path).name}: CA trace, {n} residues (N -> C: purple -> yellow)", fontsize=9)
    fig.tight_layout()
    out = _savefig(fig, Path(png_path))
    plt.close(fig)
    return out


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
        return self.generated + self.skipped

    def text(self) -> str:
        per = f", {self.wall_time_s / self.generated:.2f} s/sample" if self.generated else ""
        return (f"{_PROG}: {self.generated} sample(s) generated, {self.skipped} already complete "
                f"(lengths {_fmt_lengths(self.lengths)}; models {', '.join(self.models)}) in "
                f"{self.wall_time_s:.1f} s{per} -> {self.csv_path}")


def _fmt_lengths(ls: list[int]) -> str:
    return ",".join(map(str, ls)) if len(ls) <= 8 else f"{ls[0]}..{ls[-1]} ({len(ls)} lengths)"


# ----------------------------------------------------------------------------------- main loop
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


def _final_choice(res) -> list[int]:
    """Per sample, the model with the largest final kappa (summed over components; first on ties)."""
    return [int(i) for i in torch.argmax(res.kappa_trace[-1].sum(1), -1).tolist()]


def _final_predictions(res, models: list, mstar: list[int], mask: Tensor | None, opts: _Opts) -> dict[int, tuple]:
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


def _final_frames(res, b: int, L: int, mstar: int, preds: dict[int, tuple], labels: list[str],
                  scale: float) -> tuple[Tensor, Tensor, Tensor | None, str, str]:
    """Frames (Angstrom), psi, model label and source (prediction/state) of sample ``b``."""
    ex = res.extras[mstar] if res.extras else {}
    psi = ex.get("psi")
    psi = psi[b, :L].to(torch.float64) if psi is not None else None
    if mstar in preds:
        R, T = preds[mstar]
        return R[b, :L].to(torch.float64), T[b, :L].to(torch.float64), psi, labels[mstar], "prediction"
    return (res.x["rot"][b, :L].to(torch.float64), res.x["trans"][b, :L].to(torch.float64) * scale, psi,
            labels[mstar], "state")


def _atoms(rot: Tensor, trans: Tensor, psi: Tensor | None) -> np.ndarray:
    a = backbone_atoms_from_frames(rot.cpu(), trans.cpu(), None if psi is None else psi.cpu())
    # round once to the PDB's 3 decimals (the writer prints %.3f of these exact values)
    return np.round(a.numpy().astype(np.float64), 3)


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
            over.update({k: getattr(cfg, k) for k in _FIELDS})
        else:
            try:
                from omegaconf import DictConfig, OmegaConf

                if isinstance(cfg, DictConfig):
                    cfg = OmegaConf.to_container(cfg, resolve=True)
            except ImportError:  # pragma: no cover
                pass
            if not isinstance(cfg, Mapping):
                raise GenerateError(f"generate: expected a mapping of options, got {type(cfg).__name__}")
            over.update(_strip_hydra(dict(cfg)))
    over.update(kwargs)
    preset = over.pop("preset", None)
    merged = load_config(over, preset=preset)
    opts = _validate(merged)
    check_out_dir(opts.out_dir, "out_dir", GenerateError)     # before loading models; created only later

    # models: load and check before anything is written
    models = [_load_one(s, opts) for s in opts.models]
    labels = _labels(models, opts.models)
    space = _space_for(models)
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
    try:
        rule = make_rule(opts.rule, temperature=opts.temperature, bias=opts.bias, weights=opts.weights,
                         index=opts.single_index, bias_convention=opts.bias_convention)
    except ValueError as e:
        raise GenerateError(f"rule: {e}") from None
    scfg = SamplerConfig(num_steps=opts.num_steps, min_t=opts.min_t, noise_scale=opts.noise_scale,
                         sampling=opts.sampling, estimator=opts.estimator, kappa_scope=opts.kappa_scope,
                         num_probes=opts.num_probes, dtype=torch.float64, device=opts.device,
                         time_grid=opts.time_grid, and_correction=opts.and_correction)
    try:
        scfg.validate()
    except ValueError as e:
        raise GenerateError(str(e)) from None

    # resolved config (what config.yaml records): device and precision as resolved, not "auto"
    resolved = {k: merged[k] for k in _FIELDS}
    resolved["models"] = [m if isinstance(m, str) else f"<object {lab}>" for m, lab in zip(opts.models, labels)]
    resolved["lengths"] = list(opts.lengths)
    resolved["exact"] = dict(opts.exact)
    # under torchrun each rank runs on its own cuda:LOCAL_RANK, so the shared file records the device type
    resolved["device"] = opts.device.type if opts.distributed else _device_name(opts.device)
    auto_precision = _auto_precision(models)
    resolved["precision"] = _canon_precision(opts.precision, auto_precision)
    resolved["out_dir"] = str(opts.out_dir)

    out_dir = opts.out_dir
    _check_resume(out_dir, resolved, auto_precision)
    _read_all_rows(out_dir)                      # unreadable csv: refuse before writing anything
    _prepare_out_dir(out_dir)
    rank, world = opts.shard
    lock = ".generate.lock" if world == 1 else f".generate.shard-{rank}-of-{world}.lock"
    try:
        with _OutDirLock(out_dir, lock):
            return _generate_into(out_dir, opts, models, labels, space, rule, scfg, resolved, t_start)
    finally:
        if opts.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _generate_into(out_dir: Path, opts: _Opts, models: list, labels: list[str], space: ProductSpace, rule,
                   scfg: SamplerConfig, resolved: dict, t_start: float) -> GenerateSummary:
    rank, world = opts.shard
    if world == 1:
        _remove_stale_temp_files(out_dir)   # with shards, another process may be writing its temp files
    csv_path = out_dir / "samples.csv" if world == 1 else out_dir / f"samples.shard-{rank}-of-{world}.csv"
    old_rows = _read_all_rows(out_dir)
    with atomic_open(out_dir / "config.yaml", "w", encoding="utf-8") as fh:
        fh.write(_yaml_text(resolved))

    rows = {(int(r["length"]), int(r["sample"])): r for r in old_rows
            if r.get("length", "").isdigit() and r.get("sample", "").isdigit()}
    done = {k for k, r in rows.items() if (out_dir / r.get("pdb_path", "")).is_file() and r.get("pdb_path")}
    rows = {k: r for k, r in rows.items() if k in done}       # rows whose PDB vanished are redone
    todo = [(L, i) for L in opts.lengths for i in range(opts.samples_per_length) if (L, i) not in done]
    skipped = sum(1 for L in opts.lengths for i in range(opts.samples_per_length) if (L, i) in done)
    comps = space.names
    scale = _angstrom_per_unit(space)
    cols = _csv_columns(labels, comps, opts.kappa_scope, opts.bias_convention)

    pad = opts.pad_lengths and all(_supports_padding(m) for m in models)
    if opts.pad_lengths and not pad:
        _log("pad_lengths=true ignored: not every model supports padded batches")
    batches = _make_batches(todo, opts.batch_size, pad)
    if world > 1:
        # this shard's batches: the single-process plan of ALL jobs dealt round-robin (so every shard sees
        # the same plan whatever is done already), then finished samples dropped
        alljobs = [(L, i) for L in opts.lengths for i in range(opts.samples_per_length)]
        plan = _make_batches(alljobs, opts.batch_size, pad)[rank::world]
        batches = [[x for x in bt if x not in done] for bt in plan]
        batches = [bt for bt in batches if bt]
        mine = {x for bt in batches for x in bt}
        todo = [x for x in todo if x in mine]
        # the shard file holds this shard's rows only (plus those of its own interrupted earlier run)
        own = {(int(r["length"]), int(r["sample"])) for r in _read_rows(csv_path)
               if r.get("length", "").isdigit() and r.get("sample", "").isdigit()}
        rows = {k: r for k, r in rows.items() if k in own}

    warned: list[str] = []
    pbar = None
    if opts.progress and todo:
        from tqdm import tqdm

        pbar = tqdm(total=len(todo), unit="sample", desc=_PROG, file=sys.stderr, dynamic_ncols=True,
                    mininterval=0.2 if sys.stderr.isatty() else 2.0,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} samples "
                               "[{elapsed}<{remaining}, {rate_fmt}]")
    generated = 0
    touched_lengths: set[int] = set()
    try:
        for batch in batches:
            B = len(batch)
            Ls = [L for L, _ in batch]
            N = max(Ls)
            seeds = [sample_seed(opts.seed, L, i) for L, i in batch]
            mask = None
            if pad and min(Ls) != N:
                mask = torch.zeros(B, N, dtype=torch.float64, device=opts.device)
                for b, L in enumerate(Ls):
                    mask[b, :L] = 1
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as wl:
                warnings.simplefilter("always")

                def cb(s: int, n: int, _B: int = B, _base: int = generated) -> None:
                    _surface_warnings(wl, warned)
                    if pbar is not None:
                        pbar.update(_base + _B * s / n - pbar.n)
                try:
                    res = superpose(space, models, rule, scfg, seeds, {"rot": (N,), "trans": (N, 3)}, mask=mask,
                                    save_trajectory=opts.save_traj, callback=cb, check_models=False)
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
            finals = [_final_frames(res, b, L, mstar[b], preds, labels, scale) for b, (L, _) in enumerate(batch)]
            for b, (L, i) in enumerate(batch):
                if not all(bool(torch.isfinite(v).all()) for v in finals[b][:2]):
                    raise GenerationFailed(f"length {L} sample {i}: the final structure is not finite; nothing "
                                           "of this batch was written")
            for b, (L, i) in enumerate(batch):
                rows[(L, i)] = _write_sample(out_dir, res, b, L, i, seeds[b], opts, labels, comps, dt, scale,
                                             finals[b])
                touched_lengths.add(L)
                generated += 1
            _write_rows(csv_path, list(rows.values()), cols)
        if world > 1:
            rows = _merge_shard(out_dir, csv_path, cols)
        elif _shard_csvs(out_dir):   # rows of an interrupted sharded run are folded into samples.csv
            _write_rows(csv_path, list(rows.values()), cols)
            for p in _shard_csvs(out_dir):
                p.unlink(missing_ok=True)
        if opts.plots:
            for L in sorted(set(opts.lengths)):
                if L in touched_lengths or not (out_dir / f"length_{L}" / "kappa_traces.png").is_file():
                    traces = [out_dir / r["traces_path"] for (LL, _), r in rows.items()
                              if LL == L and r.get("traces_path") and (out_dir / r["traces_path"]).is_file()]
                    if traces:
                        _plot_length(out_dir / f"length_{L}", traces)
    finally:
        if pbar is not None:
            pbar.close()
    return GenerateSummary(out_dir=out_dir, generated=generated, skipped=skipped, lengths=opts.lengths,
                           models=labels, wall_time_s=time.perf_counter() - t_start,
                           csv_path=out_dir / "samples.csv",
                           rows=sorted(rows.values(), key=lambda r: (int(r["length"]), int(r["sample"]))),
                           warnings=warned)


def _merge_shard(out_dir: Path, shard_csv: Path, cols: list[str]) -> dict:
    """Fold this shard's rows into ``samples.csv`` (under a lock, so shards can finish in any order)
    and remove the shard file. Returns all rows now in ``samples.csv``."""
    deadline = time.monotonic() + 600
    while True:
        try:
            with _OutDirLock(out_dir, ".samples_csv.lock"):
                rows = {(int(r["length"]), int(r["sample"])): r for r in _read_rows(out_dir / "samples.csv")}
                for r in _read_rows(shard_csv):
                    rows[(int(r["length"]), int(r["sample"]))] = r
                _write_rows(out_dir / "samples.csv", list(rows.values()), cols)
                shard_csv.unlink(missing_ok=True)
                return rows
        except GenerateError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _space_for(models: Sequence[Any]) -> ProductSpace:
    """The sampler's space: the first model's ``space`` (or ``diffuser.space``), else the frame space.
    (All models must share its signature; that is checked separately.)"""
    for m in models:
        for sp in (getattr(m, "space", None), getattr(getattr(m, "diffuser", None), "space", None)):
            if isinstance(sp, ProductSpace):
                return sp
    return _exact_space()


def _supports_padding(m: Any) -> bool:
    """Frame networks (FrameScoreModel) take residue masks; others must say ``supports_padding = True``."""
    flag = getattr(m, "supports_padding", None)
    if flag is not None:
        return bool(flag)
    return hasattr(m, "predictor") and hasattr(m, "diffuser")


def _make_batches(todo: list[tuple[int, int]], bs: int, pad: bool) -> list[list[tuple[int, int]]]:
    if pad:
        order = sorted(todo, key=lambda x: (-x[0], x[1]))
        return [order[k:k + bs] for k in range(0, len(order), bs)]
    out = []
    for L in dict.fromkeys(L for L, _ in todo):
        items = [x for x in todo if x[0] == L]
        out += [items[k:k + bs] for k in range(0, len(items), bs)]
    return out


def _fmt(v: float) -> str:
    return f"{float(v):.12g}"


def _write_sample(out_dir: Path, res, b: int, L: int, i: int, seed: int, opts: _Opts, labels: list[str],
                  comps: list[str], wall: float, scale: float, final: tuple) -> dict:
    files = _sample_files(L, i, opts.layout)
    (out_dir / files["pdb"]).parent.mkdir(parents=True, exist_ok=True)
    rot, trans, psi, mlab, source = final
    atoms = _atoms(rot, trans, psi)
    bias = "" if opts.bias is None else ";".join(_fmt(x) for x in opts.bias)
    conv = "" if opts.bias_convention == "algorithm1" else f" bias_convention={opts.bias_convention}"
    remarks = [
        "superdiff_protein generate_backbones",
        f"models: {' + '.join(labels)}",
        f"rule={opts.rule} T={_fmt(opts.temperature)} bias={bias or 'none'}{conv} kappa_scope={opts.kappa_scope}",
        f"steps={opts.num_steps} min_t={_fmt(opts.min_t)} noise_scale={_fmt(opts.noise_scale)} "
        f"estimator={opts.estimator}",
        f"length={L} sample={i} seed={seed}",
        f"final={source} model={mlab}",
    ]
    try:
        text = format_backbone_pdb(atoms, remarks=remarks)
    except PDBWriteError as e:
        raise GenerationFailed(f"length {L} sample {i}: cannot write the PDB ({e})") from None
    traj_rel = ""
    if opts.save_traj and res.trajectory is not None:
        frames = []
        stride = opts.traj_stride
        idx = list(range(0, len(res.trajectory), stride))
        if idx[-1] != len(res.trajectory) - 1:
            idx.append(len(res.trajectory) - 1)
        for k in idx:
            st = res.trajectory[k]
            frames.append(_atoms(st["rot"][b, :L].to(torch.float64),
                                 st["trans"][b, :L].to(torch.float64) * scale, None))
        traj_rel = files["traj"]
        if opts.layout == "framediff":      # FrameDiff's bb_traj order: newest state first
            frames = frames[::-1]
            what = f"noisy states from t=min_t (model 1) to t=1 (model {len(frames)}), stride {stride}"
        else:
            what = f"noisy states from t=1 (model 1) to t=min_t (model {len(frames)}), stride {stride}"
        write_trajectory_pdb(out_dir / traj_rel, frames, remarks=remarks[:1] + [what])
    traces_rel = files["traces"]
    _save_npz(out_dir / traces_rel, t=res.t.cpu().numpy(), kappa=res.kappa_trace[:, b].cpu().numpy(),
              logq=res.logq_trace[:, b].cpu().numpy(), models=np.array(labels), components=np.array(comps),
              kappa_scope=np.array(opts.kappa_scope), seed=np.array(seed, dtype=np.uint64))
    pdb_rel = files["pdb"]
    with atomic_open(out_dir / pdb_rel, "w") as fh:
        fh.write(text)
    kap = res.kappa_trace[-1, b].cpu()
    lq = res.logq[b].cpu()
    row = {"id": f"L{L}_s{i}", "length": str(L), "sample": str(i), "seed": str(seed),
           "models": ";".join(labels), "rule": opts.rule, "temperature": _fmt(opts.temperature), "bias": bias,
           **({"bias_convention": opts.bias_convention} if conv else {}), "kappa_scope": opts.kappa_scope,
           "estimator": opts.estimator, "noise_scale": _fmt(opts.noise_scale),
           "num_steps": str(opts.num_steps), "final": source, "final_model": mlab}
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
    row.update({"wall_time_s": f"{wall:.3f}", "pdb_path": pdb_rel, "traj_path": traj_rel, "traces_path": traces_rel})
    return row


# ----------------------------------------------------------------------------------------- CLI
def _run_from_cfg(cfg) -> None:
    from omegaconf import OmegaConf

    opts = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    summary = generate(_strip_hydra(opts))
    print(summary.text())


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``generate_backbones`` (Hydra overrides, e.g. ``rule=and lengths=[60,100]``).

    Exit codes (``superdiff_protein.cli.common``): 0 done, 1 sampling failed (NaN), 2 bad input (one line on
    stderr, nothing written), 130 interrupted.
    """
    import signal

    from .runtime import tune_malloc

    tune_malloc()                           # reuse big freed blocks (docs/benchmarks.md, main job)

    def _on_term(signum, frame):            # let atomic writes clean up their temporary files
        raise KeyboardInterrupt

    if argv is None:
        signal.signal(signal.SIGTERM, _on_term)
    code = run_hydra(_PROG, CONFIG_NAME, _run_from_cfg, argv=argv, list_keys=("lengths", "models", "bias", "weights"),
                     node=_dataclass_defaults(),
                     interrupted="interrupted; complete samples are kept, rerun the same command to resume")
    sys.exit(code)


if __name__ == "__main__":
    main()
