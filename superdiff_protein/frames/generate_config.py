"""The options of ``generate_backbones``, defined once: the schema :class:`GenerateConfig`.

Each option is one field of :class:`GenerateConfig`: its name, type, default and check (``metadata``). The
rest derives from the fields:

* ``configs/generate_backbones.yaml`` states the same defaults, with a line of documentation each (the schema
  is registered in Hydra's ConfigStore as ``generate_backbones_schema``, the YAML's first default);
* :func:`validate`, the one validation (no side effects): every field's check, then the checks across fields;
* :func:`sampler_config`: the :class:`~superdiff_protein.core.sampler.SamplerConfig` from the fields of the
  same names;
* :data:`SAMPLE_KEYS` and :func:`canonical`: the fields whose change changes the samples (``sample=True``),
  compared when a run resumes into a directory;
* the ``samples.csv`` setting columns (:data:`superdiff_protein.runs.rundir.SETTING_COLUMNS`) are fields too.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from ..core.kappa import BIAS_CONVENTIONS
from ..core.smc import RESAMPLING_SCHEMES, SMCConfig
from ..core.sampler import SamplerConfig
from ..errors import UserError
from ..runs.checks import resolve_device as _resolve_device
from ..runs.rundir import LAYOUTS, SETTING_COLUMNS
from .compiling import COMPILE_CHOICES, COMPILE_MODES
from .plan import parse_shard, torchrun_world

__all__ = ["GenerateError", "GenerationFailed", "GenerateConfig", "Options", "ExactOptions", "SMCOptions", "CONFIG_DIR",
           "CONFIG_NAME", "RULES", "smc_config", "ClashGuidanceOptions",
           "SCHEMA_NAME", "MAX_LENGTH", "MAX_SAMPLES", "TIME_GRIDS", "FIELDS", "SAMPLE_KEYS", "load_config",
           "parse_lengths", "validate", "canonical", "canon_precision", "sampler_config", "resolve_device",
           "register_schema", "strip_hydra", "option_tree"]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIG_NAME = "generate_backbones"
SCHEMA_NAME = "generate_backbones_schema"
MAX_LENGTH = 2000            # longer chains are refused as absurd
MAX_SAMPLES = 1_000_000
TIME_GRIDS = ("uniform", "quadratic", "cosine", "framediff")
RULES = ("or", "and", "average", "single", "product", "anneal", "geometric")
ANNEAL_OF = ("auto", "single", "product", "or")


class GenerateError(RuntimeError, UserError):
    """Bad input or environment: nothing was written for the offending request (exit code 2)."""

    exit_code = 2


class GenerationFailed(GenerateError):
    """Sampling failed (NaN/inf): the failing batch was not written (exit code 1)."""

    exit_code = 1


# ------------------------------------------------------------------------------------------ checks
def _int(v: Any, what: Any) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise GenerateError(f"{what!r}: expected an integer, got {v!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise GenerateError(f"{what!r}: expected an integer, got {v!r}")
    return int(f)


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


def _number(ok: Callable[[float], bool] | None = None, why: str = "") -> Callable[[Any, str], float]:
    def check(v: Any, key: str) -> float:
        f = _num(v, key)
        if ok is not None and not ok(f):
            raise GenerateError(f"{key}: {why}, got {f:g}")
        return f
    check.kind = "float"  # type: ignore[attr-defined]
    return check


def _integer(lo: int, hi: int) -> Callable[[Any, str], int]:
    def check(v: Any, key: str) -> int:
        if isinstance(v, bool):
            raise GenerateError(f"{key}: expected an integer, got {v!r}")
        i = _int(v, key)
        if not lo <= i <= hi:
            raise GenerateError(f"{key}: must lie in [{lo}, {hi}], got {i}")
        return i
    return check


def _boolean(v: Any, key: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, np.integer)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise GenerateError(f"{key}: expected true/false, got {v!r}")


def _choice(*choices: str) -> Callable[[Any, str], str]:
    def check(v: Any, key: str) -> str:
        s = str(v).lower()
        if s not in choices:
            raise GenerateError(f"{key}: must be one of {', '.join(choices)}; got {v!r}")
        return s
    return check


def _num_list(v: Any, key: str) -> list[float] | None:
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [_num(v, key)]
    if isinstance(v, str) or not isinstance(v, Iterable):
        raise GenerateError(f"{key}: expected a list of numbers (one per model), got {v!r}")
    return [_num(x, key) for x in v]


_num_list.kind = "float_list"  # type: ignore[attr-defined]


def _models(v: Any, key: str) -> list:
    default = GenerateConfig().models
    if v is None:
        return list(default)
    if (isinstance(v, (list, tuple)) and not v) or (isinstance(v, str) and not v.strip()):
        raise GenerateError(f"models: the list is empty (got {v!r}); give at least one model, or leave "
                            f"models out to use the defaults {', '.join(map(str, default))}")
    if isinstance(v, (str, os.PathLike)) or not isinstance(v, Iterable):
        v = [v]
    v = [os.fspath(m) if isinstance(m, os.PathLike) else m for m in v]
    if not v:
        raise GenerateError("models: no model given")
    return list(v)


_models.kind = "str_list"  # type: ignore[attr-defined]


def _exact(v: Any, key: str) -> dict:
    exact = asdict(v) if is_dataclass(v) and not isinstance(v, type) else dict(v or {})
    bad = set(exact) - {"trans_std", "windows_per_chain"}
    if bad:
        raise GenerateError(f"exact: unknown option(s) {sorted(bad)} (valid: trans_std, windows_per_chain)")
    exact = {"trans_std": _num(exact.get("trans_std", 0.1), "exact.trans_std"),
             "windows_per_chain": _integer(1, 1000)(exact.get("windows_per_chain", 4), "exact.windows_per_chain")}
    if exact["trans_std"] <= 0:
        raise GenerateError("exact.trans_std must be > 0 (Angstrom)")
    return exact


_exact.kind = "exact"  # type: ignore[attr-defined]


def _group(v: Any, cls: type, key: str) -> tuple[dict, Any]:
    """An option group (a dataclass or a mapping) as a dict whose keys are all ``cls``'s fields; and the defaults."""
    d = asdict(v) if is_dataclass(v) and not isinstance(v, type) else dict(v or {})
    names = [f.name for f in fields(cls)]
    bad = set(d) - set(names)
    if bad:
        raise GenerateError(f"{key}: unknown option(s) {sorted(bad)} (valid: {', '.join(names)})")
    return d, cls()


def _smc(v: Any, key: str) -> dict:
    d, dflt = _group(v, SMCOptions, "smc")
    out = {"group_size": _integer(1, 100_000)(d.get("group_size", dflt.group_size), "smc.group_size"),
           "resample": _choice(*RESAMPLING_SCHEMES)(d.get("resample", dflt.resample), "smc.resample"),
           "ess_threshold": _number(lambda f: 0.0 <= f <= 1.0, "must lie in [0, 1]")(
               d.get("ess_threshold", dflt.ess_threshold), "smc.ess_threshold"),
           "t_max": _number(lambda f: 0.0 <= f <= 1.0, "must lie in [0, 1]")(d.get("t_max", dflt.t_max), "smc.t_max"),
           "t_min": _number(lambda f: 0.0 <= f <= 1.0, "must lie in [0, 1]")(d.get("t_min", dflt.t_min), "smc.t_min")}
    if out["t_min"] > out["t_max"]:
        raise GenerateError(f"smc: t_min ({out['t_min']:g}) must not exceed t_max ({out['t_max']:g})")
    return out


_smc.kind = "smc"  # type: ignore[attr-defined]


def _guidance(v: Any, key: str) -> dict:
    d, dflt = _group(v, ClashGuidanceOptions, "clash_guidance")
    return {"weight": _number(lambda f: 0.0 <= f <= 4.0, "must lie in [0, 4]")(
                d.get("weight", dflt.weight), "clash_guidance.weight"),
            "t_max": _number(lambda f: 0.0 < f <= 1.0, "must lie in (0, 1]")(
                d.get("t_max", dflt.t_max), "clash_guidance.t_max"),
            "distance": _number(lambda f: 0.0 < f <= 20.0, "must lie in (0, 20] Angstrom")(
                d.get("distance", dflt.distance), "clash_guidance.distance")}


_guidance.kind = "clash_guidance"  # type: ignore[attr-defined]


def _out_dir(v: Any, key: str) -> Path:
    if v is None or str(v).strip() == "":
        raise GenerateError("out_dir: an output directory is required")
    return Path(os.path.expanduser(str(v)))


def _lengths(v: Any, key: str) -> list[int]:
    return parse_lengths(v)


def _keep(v: Any, key: str) -> Any:
    return v


def _opt(check: Callable[[Any, str], Any], *, sample: bool = False, added: bool = False) -> dict:
    """Field metadata: ``check(value, key)`` returns the validated value; ``sample``: a change changes the samples
    (a rerun into a directory of other values is refused); ``added``: an option added later, so a ``config.yaml``
    of an older run lacks it and ran with its default."""
    return {"check": check, "sample": sample, "added": added}


# ------------------------------------------------------------------------------------------ schema
@dataclass
class ExactOptions:
    """Options of the exact (analytic) frame models (``models.exact_frames``)."""

    trans_std: float = 0.1            # Angstrom: spread of CA positions around each chain window
    windows_per_chain: int = 4        # length-L windows taken from each chain (modes of the mixture)


@dataclass
class SMCOptions:
    """Particle groups of the FKC rules (``rule=product|anneal|geometric``; core/smc.py)."""

    group_size: int = 1               # K particles per group (same length); 1 = weights only
    resample: str = "systematic"      # systematic | multinomial | none (weights only)
    ess_threshold: float = 0.5        # resample a group when ESS < threshold * K (1.0: every step)
    t_max: float = 1.0                # resample only while t_min <= t <= t_max
    t_min: float = 0.0


@dataclass
class ClashGuidanceOptions:
    """Clash guidance (frames/guidance.py): a push apart of CA pairs closer than ``distance`` at |i - j| >= 3 in the
    predicted clean structure, at ``t <= t_max``. Off at ``weight = 0``; it changes the sampled distribution."""

    weight: float = 0.0               # fraction of the overlap corrected per step (0.5 resolves an isolated pair)
    t_max: float = 0.5                # guide only at t <= t_max
    distance: float = 4.0             # Angstrom


@dataclass
class GenerateConfig:
    """All options of :func:`~superdiff_protein.frames.generation.generate` and ``generate_backbones``; the
    defaults are those of ``configs/generate_backbones.yaml``, which documents each option."""

    models: Any = field(default_factory=lambda: ["default-helix", "default-strand"], metadata=_opt(_models, sample=True))
    rule: str = field(default="or", metadata=_opt(_choice(*RULES), sample=True))
    temperature: float = field(default=1.0, metadata=_opt(_number(lambda f: f > 0, "T must be > 0"), sample=True))
    bias: Any = field(default=None, metadata=_opt(_num_list, sample=True))
    kappa_scope: str = field(default="joint", metadata=_opt(_choice("joint", "per_component"), sample=True))
    estimator: str = field(default="ito", metadata=_opt(_choice("ito", "hutchinson"), sample=True))
    num_steps: int = field(default=40, metadata=_opt(_integer(1, 100_000), sample=True))
    min_t: float = field(default=0.002, metadata=_opt(_number(lambda f: 0.0 <= f < 1.0, "must lie in [0, 1)"),
                                                     sample=True))
    noise_scale: float = field(default=1.0, metadata=_opt(_number(lambda f: f >= 0, "must be >= 0"), sample=True))
    lengths: Any = field(default=100, metadata=_opt(_lengths))   # int, list, "60-150:10", "60,80" or {start, stop, step}
    samples_per_length: int = field(default=10, metadata=_opt(_integer(1, MAX_SAMPLES)))
    batch_size: int = field(default=10, metadata=_opt(_integer(1, 100_000)))
    seed: int = field(default=0, metadata=_opt(_integer(0, 2**63 - 1), sample=True))
    device: str = field(default="auto", metadata=_opt(_keep))          # resolved with the shard (validate)
    precision: str = field(default="auto", metadata=_opt(_choice("auto", "float32", "float64", "bf16", "bfloat16"),
                                                         sample=True))
    out_dir: str = field(default="generated_backbones", metadata=_opt(_out_dir))
    save_traj: bool = field(default=False, metadata=_opt(_boolean))
    final: str = field(default="prediction", metadata=_opt(_choice("prediction", "state"), sample=True))
    sampling: str = field(default="sde", metadata=_opt(_choice("sde", "ode"), sample=True))
    time_grid: str = field(default="cosine", metadata=_opt(_choice(*TIME_GRIDS), sample=True))
    num_probes: int = field(default=1, metadata=_opt(_integer(1, 1000), sample=True))
    and_correction: bool = field(default=True, metadata=_opt(_boolean, sample=True))
    bias_convention: str = field(default="algorithm1", metadata=_opt(_choice(*BIAS_CONVENTIONS), sample=True,
                                                                     added=True))
    weights: Any = field(default=None, metadata=_opt(_num_list, sample=True))
    single_index: int = field(default=0, metadata=_opt(_integer(0, 10_000), sample=True))
    pad_lengths: bool = field(default=False, metadata=_opt(_boolean))
    traj_stride: int = field(default=1, metadata=_opt(_integer(1, 100_000)))
    plots: bool = field(default=True, metadata=_opt(_boolean))
    progress: bool = field(default=True, metadata=_opt(_boolean))
    compile: str = field(default="auto", metadata=_opt(_choice(*COMPILE_CHOICES), added=True))
    compile_mode: str = field(default="default", metadata=_opt(_choice(*COMPILE_MODES), added=True))
    layout: str = field(default="flat", metadata=_opt(_choice(*LAYOUTS), sample=True, added=True))
    exact: ExactOptions = field(default_factory=ExactOptions, metadata=_opt(_exact, sample=True))
    beta: float = field(default=2.0, metadata=_opt(_number(lambda f: f > 0, "beta must be > 0"), sample=True,
                                                   added=True))
    anneal_of: str = field(default="auto", metadata=_opt(_choice(*ANNEAL_OF), sample=True, added=True))
    gamma: float = field(default=0.5, metadata=_opt(_number(), sample=True, added=True))
    smc: SMCOptions = field(default_factory=SMCOptions, metadata=_opt(_smc, sample=True, added=True))
    init_logq: str = field(default="prior", metadata=_opt(_choice("prior", "model"), sample=True, added=True))
    rng: str = field(default="stream", metadata=_opt(_choice("stream", "counter"), sample=True, added=True))
    clash_guidance: ClashGuidanceOptions = field(default_factory=ClashGuidanceOptions,
                                                 metadata=_opt(_guidance, sample=True, added=True))
    refine: bool = field(default=False, metadata=_opt(_boolean, sample=True, added=True))
    shard: Any = field(default=None, metadata=_opt(_keep))              # "i/n"; resolved in validate


@dataclass
class Options(GenerateConfig):
    """Validated options: a :class:`GenerateConfig` whose values are checked and normalised (``lengths`` a list of
    ints, ``out_dir`` a Path, ``device`` a ``torch.device``, ``shard`` ``(rank, world)``, lists of floats), plus
    ``distributed`` (a ``torchrun`` launch: the process group is set up when the run starts)."""

    distributed: bool = False


FIELDS = [f.name for f in fields(GenerateConfig)]
#: keys whose change changes the samples: a rerun into a directory written with other values is refused
#: (``layout`` changes no sample but where its files are; mixing layouts in one directory is refused too)
SAMPLE_KEYS = tuple(f.name for f in fields(GenerateConfig) if f.metadata["sample"])
assert set(SETTING_COLUMNS) - {"models"} <= set(FIELDS), "every samples.csv setting column is an option"


def register_schema() -> None:
    """Store :class:`GenerateConfig` in Hydra's ConfigStore as :data:`SCHEMA_NAME` (the YAML's first default)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=GenerateConfig)


def _defaults() -> dict:
    c = GenerateConfig()
    return {k: asdict(v) if is_dataclass(v) else v for k, v in ((k, getattr(c, k)) for k in FIELDS)}


def option_tree() -> dict:
    """Every option with its default (``exact`` with its sub-options), for "unknown option" messages."""
    return _defaults()


def strip_hydra(d: Mapping[str, Any]) -> dict:
    """``d`` without Hydra's own keys (``hydra``, ``defaults``)."""
    return {k: v for k, v in d.items() if k not in ("hydra", "defaults")}


def load_config(overrides: Mapping[str, Any] | None = None, preset: str | None = None) -> dict:
    """Defaults from ``configs/generate_backbones.yaml`` (the schema's defaults when the file is absent),
    then the preset ``configs/generate/<preset>.yaml``, then ``overrides``. Returns a plain dict."""
    from omegaconf import OmegaConf

    base = _defaults()
    yml = CONFIG_DIR / f"{CONFIG_NAME}.yaml"
    if yml.is_file():
        base.update(strip_hydra(OmegaConf.to_container(OmegaConf.load(yml), resolve=False)))
    if preset:
        pf = CONFIG_DIR / "generate" / f"{preset}.yaml"
        if not pf.is_file():
            avail = sorted(p.stem for p in (CONFIG_DIR / "generate").glob("*.yaml"))
            raise GenerateError(f"unknown preset {preset!r}; available: {avail}")
        base.update(strip_hydra(OmegaConf.to_container(OmegaConf.load(pf), resolve=False)))
    for k, v in (overrides or {}).items():
        if k in ("exact", "smc", "clash_guidance") and isinstance(v, Mapping):
            base[k] = {**(base.get(k) or {}), **dict(v)}
        else:
            base[k] = v
    return base


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


def resolve_device(spec: Any) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; refuses absent CUDA devices."""
    return _resolve_device(spec, "device", GenerateError)


def _placement(spec: Any, device: torch.device) -> dict:
    """This process's share of the work and device, without side effects.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the rank and world size come from its environment and each rank
    takes ``cuda:LOCAL_RANK``; otherwise ``shard="i/n"`` (e.g. one Hydra multirun job per shard) or no
    sharding. Work is split by *batches* of the single-process batch plan (:mod:`superdiff_protein.frames.plan`).
    """
    world, local = torchrun_world()
    if world > 1:
        if spec not in (None, "", "null"):
            raise GenerateError("shard: do not combine shard= with torchrun (the rank decides the shard)")
        if device.type == "cuda":
            if local >= torch.cuda.device_count():
                raise GenerateError(f"torchrun: LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA "
                                    "device(s)")
            device = torch.device("cuda", local)
        rank = int(os.environ.get("RANK", "0") or 0)
        return {"shard": (rank, world), "distributed": True, "device": device}
    return {"shard": parse_shard(spec, GenerateError) or (0, 1), "distributed": False, "device": device}


def validate(c: Mapping[str, Any]) -> Options:
    """Check and normalise a complete config (every option of :class:`GenerateConfig`); no side effects.

    Raises :class:`GenerateError` naming the first bad option; checks that need the loaded models (one
    ``bias`` per model, ...) are made when they are loaded.
    """
    unknown = set(c) - set(FIELDS)
    if unknown:
        raise GenerateError(f"unknown option(s) {sorted(unknown)}; valid options: {', '.join(FIELDS)}")
    vals = {f.name: f.metadata["check"](c[f.name], f.name) for f in fields(GenerateConfig)}
    if vals["bias_convention"] == "official" and vals["rule"] == "and" and vals["bias"] is not None:
        raise GenerateError("bias_convention=official is defined for rule=or only (the official code's AND bias is "
                            "another scheme, not implemented); drop it, or use bias_convention=algorithm1, with which "
                            "AND drives log q_i - log q_1 to l_i - l_1")
    if vals["clash_guidance"]["weight"] > 0 and vals["rule"] in ("product", "anneal", "geometric"):
        raise GenerateError(f"clash_guidance changes the drift that rule={vals['rule']}'s importance weights assume; "
                            "use it with rule=or, and, average or single, or set clash_guidance.weight=0")
    K = vals["smc"]["group_size"]
    if K > 1 and vals["rule"] not in ("product", "anneal", "geometric"):
        raise GenerateError(f"smc.group_size={K} needs a rule with importance weights (product, anneal, geometric), "
                            f"not rule={vals['rule']}; drop smc.group_size or change the rule")
    if K > 1 and vals["samples_per_length"] % K:
        raise GenerateError(f"smc.group_size={K} does not divide samples_per_length={vals['samples_per_length']}: "
                            f"use a multiple of {K} (e.g. samples_per_length={-(-vals['samples_per_length'] // K) * K})")
    if K > 1 and vals["batch_size"] % K:
        raise GenerateError(f"batch_size={vals['batch_size']} must be a multiple of smc.group_size={K} (batches hold "
                            f"whole groups), e.g. batch_size={max(K, vals['batch_size'] // K * K)}")
    if vals["compile_mode"] == "step-graph" and vals["rng"] != "counter":
        raise GenerateError("compile_mode=step-graph captures the whole sampler step as one CUDA graph, which needs "
                            "rng=counter (the per-sample generator streams are drawn in a Python loop); add rng=counter")
    vals.update(_placement(vals["shard"], resolve_device(vals["device"])))
    return Options(**vals)


def smc_config(opts: Options) -> SMCConfig:
    """The core's :class:`~superdiff_protein.core.smc.SMCConfig` from ``opts.smc``."""
    return SMCConfig(**dict(opts.smc))


def sampler_config(opts: Options) -> SamplerConfig:
    """The sampler's config from the options of the same names (``dtype`` float64: the sampler state)."""
    names = {f.name for f in fields(SamplerConfig)} & set(FIELDS)
    # step-graph: the whole step as a CUDA graph (core/step_graph.py), around compiled networks (compile on) or
    # eager ones (compile=false: no compile time); on a CPU the networks compile as in default mode
    graph = opts.compile_mode == "step-graph" and opts.device.type == "cuda"
    scfg = SamplerConfig(**{k: getattr(opts, k) for k in names}, dtype=torch.float64, step_graph=graph)
    try:
        scfg.validate()
    except ValueError as e:
        raise GenerateError(str(e)) from None
    return scfg


def canon_precision(v: Any, auto_precision: str) -> str:
    """A precision option as recorded (``bfloat16`` -> ``bf16``; ``auto`` -> what it resolved to)."""
    s = str(v).lower()
    s = {"bfloat16": "bf16"}.get(s, s)
    return auto_precision if s == "auto" else s


def _canon_value(f, v: Any, auto_precision: str | None) -> Any:
    kind = getattr(f.metadata["check"], "kind", None)
    if v is None:
        return v
    if f.name == "precision" and auto_precision is not None:
        return canon_precision(v, auto_precision)
    if kind == "float":
        return float(v)
    if kind == "float_list":
        return [float(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
    if kind == "str_list" and isinstance(v, (list, tuple)):
        return [str(x) for x in v]
    if kind == "smc" and isinstance(v, Mapping):
        return {kk: (float(vv) if kk in ("ess_threshold", "t_max", "t_min") else
                     (int(vv) if kk == "group_size" else str(vv))) for kk, vv in v.items()}
    if kind == "exact" and isinstance(v, Mapping):
        return {kk: (float(vv) if kk == "trans_std" else int(vv)) for kk, vv in v.items()}
    if kind == "clash_guidance" and isinstance(v, Mapping):
        return {kk: float(vv) for kk, vv in v.items()}
    return v


def canonical(cfg: Mapping[str, Any], auto_precision: str | None = None) -> dict:
    """The sample-defining part of a config (:data:`SAMPLE_KEYS`), normalised for comparison (``precision: auto``
    counts as what it resolves to for the run's models, so a directory written before config.yaml recorded the
    resolved precision still resumes; an option added later counts as its default when absent)."""
    out = {}
    for f in fields(GenerateConfig):
        if f.metadata["sample"]:
            default = None
            if f.metadata["added"]:
                default = f.default if f.default is not MISSING else (
                    asdict(f.default_factory()) if f.default_factory is not MISSING else None)
            out[f.name] = _canon_value(f, cfg.get(f.name, default), auto_precision)
    return out
