"""The models of a generation run: model specs -> loaded score models, their labels, space and precision.

A spec is an exact model name (``exact-helix``, ``exact-strand``, ``exact-all``: :mod:`models.exact_frames`,
imported only when asked for), a registry name or checkpoint path (:mod:`superdiff_protein.frames.registry`),
``py:package.module:factory``, or a ScoreModel object (Python API).
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import UserError
from ..core.spaces import ProductSpace
from . import registry
from .naming import unique_names
from .generate_config import GenerateError, Options, load_config, validate

__all__ = ["EXACT_MODULE", "NM_TO_ANGSTROM", "angstrom_per_unit", "exact_model_names", "load_model_spec",
           "resolve_models", "model_labels", "space_for", "supports_padding", "auto_precision", "torch_dtype"]

#: where the exact (analytic) frame models live; imported only when a run names one
EXACT_MODULE = "models.exact_frames"
NM_TO_ANGSTROM = 10.0        # frame models' translations live in nm (FrameDiff's coordinate_scaling 0.1)
_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bf16", torch.float16: "float16"}


def angstrom_per_unit(space: ProductSpace) -> float:
    """Angstrom per unit of the space's ``trans`` component (10 for FrameDiff's nm)."""
    cs = getattr(space.components.get("trans"), "coordinate_scaling", None)
    return 1.0 / float(cs) if cs else NM_TO_ANGSTROM


def _exact() -> Any:
    return importlib.import_module(EXACT_MODULE)


def exact_model_names() -> list[str]:
    """Names of the exact (analytic) frame models."""
    return list(_exact().EXACT_MODELS)


def torch_dtype(precision: str) -> torch.dtype | None:
    """The weights' dtype of a ``precision`` option (None for ``auto``)."""
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


def _is_score_model(obj: Any) -> bool:
    return callable(obj) and hasattr(obj, "signature") and hasattr(obj, "init_state")


def _load_python(spec: str, target: str, device: torch.device, precision: str) -> Any:
    mod, _, attr = target.partition(":")
    if not mod or not attr:
        raise GenerateError(f"models: {spec!r}: a Python model is given as py:package.module:factory")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise GenerateError(f"models: cannot import {target!r} ({type(e).__name__}: {e})") from e
    try:
        model = _call_with_supported(fn, device=device, dtype=torch_dtype(precision))
    except Exception as e:
        raise GenerateError(f"models: {target!r} failed to build a model ({type(e).__name__}: {e})") from e
    if not _is_score_model(model):
        raise GenerateError(f"models: {target!r} returned a {type(model).__name__}, not a ScoreModel "
                            "(a callable with signature() and init_state(); docs/frame_model_protocol.md)")
    return model


def load_model_spec(spec: Any, device: torch.device, precision: str, exact: Mapping[str, Any]) -> Any:
    """Load one model spec (module docstring) on ``device``; ``exact`` holds the exact models' options
    (``trans_std``, ``windows_per_chain``). Raises :class:`GenerateError` with one readable line."""
    if not isinstance(spec, str):
        if _is_score_model(spec):
            return spec                                   # a ScoreModel object (Python API)
        raise GenerateError(f"models: {spec!r} is neither a model name, a checkpoint path nor a ScoreModel")
    s = spec.strip()
    if s.startswith("exact-") and s in exact_model_names():
        try:
            return _exact().load_exact_model(s, **exact)
        except UserError as e:
            raise GenerateError(str(e)) from None
    if s.startswith("py:"):
        return _load_python(spec, s[3:], device, precision)
    try:
        return _call_with_supported(registry.load_model, s, device=device, dtype=torch_dtype(precision))
    except GenerateError:
        raise
    except Exception as e:
        msg = str(e).strip() or type(e).__name__
        if isinstance(e, registry.UnknownModelError):
            raise GenerateError(f"models: {msg}; exact (analytic) models: {', '.join(exact_model_names())}") from None
        raise GenerateError(f"models: cannot load {s!r}: {msg}") from None


def resolve_models(specs: Sequence[Any], opts: Options | None = None, **overrides: Any) -> list:
    """Load every model spec: exact model names, registry names, checkpoint paths, ``py:module:factory``
    or ScoreModel objects. Without ``opts``, the options are the defaults with ``overrides``."""
    if opts is None:
        opts = validate(load_config({**overrides, "models": list(specs)}))
    return [load_model_spec(s, opts.device, opts.precision, opts.exact) for s in specs]


def model_labels(models: Sequence[Any], specs: Sequence[Any]) -> list[str]:
    """One distinct, file-name-safe label per model (its ``name``, else the spec; repeats get ``#2``, ...)."""
    labels = []
    for m, s in zip(models, specs):
        lab = str(getattr(m, "name", None) or (s if isinstance(s, str) else type(m).__name__))
        labels.append(re.sub(r"[^A-Za-z0-9_.:+-]", "_", Path(lab).name if os.sep in lab else lab) or "model")
    return unique_names(labels)


def space_for(models: Sequence[Any]) -> ProductSpace:
    """The sampler's space: the first model's ``space`` (or ``diffuser.space``), else the exact models' frame
    space. (All models must share its signature; that is checked separately.)"""
    for m in models:
        for sp in (getattr(m, "space", None), getattr(getattr(m, "diffuser", None), "space", None)):
            if isinstance(sp, ProductSpace):
                return sp
    return _exact().exact_space()


def supports_padding(m: Any) -> bool:
    """Frame networks (FrameScoreModel) take residue masks; others must say ``supports_padding = True``."""
    flag = getattr(m, "supports_padding", None)
    if flag is not None:
        return bool(flag)
    return hasattr(m, "predictor") and hasattr(m, "diffuser")


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


def auto_precision(models: Sequence[Any]) -> str:
    """What ``precision=auto`` resolved to for these loaded models: the dtype of the networks' weights
    (float32 unless a factory chose otherwise); ``float64`` when no model has weights (exact models
    compute in float64)."""
    names = sorted({_DTYPE_NAMES.get(d, str(d).replace("torch.", "")) for d in map(_model_weight_dtype, models)
                    if d is not None})
    return ",".join(names) if names else "float64"
