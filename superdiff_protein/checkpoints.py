"""Safe loading of official FrameDiff / Proteus checkpoints (shared by both model packages).

Loading never executes code from the file unless the caller passes ``trust_checkpoint=True``:

1. ``torch.load(weights_only=True)`` inside ``torch.serialization.safe_globals(SAFE_GLOBALS)``:
   torch's own weights-only unpickler with only the OmegaConf classes and builtin types that the
   official containers need allow-listed.
2. The official checkpoints are written with ``pickle_protocol=pickle.HIGHEST_PROTOCOL`` (5).  Torch's
   weights-only unpickler only understands protocol-2 opcodes and stops at the first ``FRAME``
   opcode ("Unsupported operand 149").  For such files we fall back to a *restricted* unpickler:
   the standard ``pickle.Unpickler`` whose ``find_class`` resolves **only** the same allow-list
   (plus torch's own weights-only allow-list for tensor rebuilding).  Every global a pickle can
   reference goes through ``find_class`` (GLOBAL, STACK_GLOBAL and the EXT opcodes), so nothing
   outside the allow-list can be imported or called; anything else raises
   :class:`CheckpointError`.
3. ``trust_checkpoint=True`` skips both and uses plain ``torch.load(weights_only=False)`` - only
   for files you created yourself or fully trust.

Key/shape checking (:func:`load_state_dict_checked`) always names missing, unexpected and
shape-mismatched keys; a partial load never happens silently.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import types
import warnings
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "SAFE_GLOBALS",
    "LoadedCheckpoint",
    "load_checkpoint_file",
    "load_framediff_checkpoint",
    "load_proteus_checkpoint",
    "strip_module_prefix",
    "load_state_dict_checked",
    "conf_to_container",
]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, unsafe or does not match the model."""


def _omegaconf_globals() -> list[Any]:
    try:
        import omegaconf
        from omegaconf import base, dictconfig, listconfig, nodes
    except ImportError:  # pragma: no cover - omegaconf is a hard dependency
        return []
    out: list[Any] = [
        dictconfig.DictConfig,
        listconfig.ListConfig,
        base.ContainerMetadata,
        base.Metadata,
        nodes.AnyNode,
    ]
    # Value nodes that appear in typed (structured) configs; harmless data classes.
    for name in ("StringNode", "IntegerNode", "FloatNode", "BooleanNode", "EnumNode", "BytesNode", "PathNode"):
        if hasattr(nodes, name):
            out.append(getattr(nodes, name))
    del omegaconf
    return out


#: Globals (beyond torch's own tensor-rebuilding allow-list) that official FrameDiff / Proteus
#: containers need: OmegaConf config objects and plain builtin containers.  Found by listing the
#: globals referenced by the official checkpoint files (``framediff_small_public.pth``,
#: ``proteus_small_public.pth``).
SAFE_GLOBALS: list[Any] = [
    *_omegaconf_globals(),
    dict,
    list,
    tuple,
    set,
    int,
    float,
    str,
    bool,
    collections.OrderedDict,
    collections.defaultdict,
    typing.Any,
]


def _global_name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', repr(obj)))}"


def _allowed_globals() -> dict[str, Any]:
    allowed: dict[str, Any] = {}
    try:  # torch's own weights-only allow-list (rebuild helpers, dtypes, storages)
        from torch import _weights_only_unpickler as wou

        allowed.update(wou._get_allowed_globals())
    except Exception:  # pragma: no cover - private API moved: minimal fallback
        allowed.update(
            {
                "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
                "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
                "collections.OrderedDict": collections.OrderedDict,
            }
        )
    for obj in SAFE_GLOBALS:
        allowed[_global_name(obj)] = obj
    # builtins are pickled as "builtins.<name>"
    for obj in (dict, list, tuple, set, int, float, str, bool):
        allowed[f"builtins.{obj.__name__}"] = obj
    allowed["typing.Any"] = typing.Any
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only allow-listed globals."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401
        full = f"{module}.{name}"
        allowed = _allowed_globals()
        if full in allowed:
            return allowed[full]
        raise CheckpointError(
            f"refusing to load global {full!r} from the checkpoint: it is not on the safe allow-list "
            "(OmegaConf configs, builtin containers, tensors). Pass trust_checkpoint=True only if you "
            "trust the file completely (it may then execute arbitrary code)."
        )


_restricted_pickle_module = types.ModuleType("superdiff_restricted_pickle")
_restricted_pickle_module.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_restricted_pickle_module.load = pickle.load  # type: ignore[attr-defined]
_restricted_pickle_module.loads = pickle.loads  # type: ignore[attr-defined]
_restricted_pickle_module.__name__ = "superdiff_restricted_pickle"


def load_checkpoint_file(
    path: str | os.PathLike, map_location: Any = "cpu", trust_checkpoint: bool = False
) -> Any:
    """Unpickle a torch checkpoint safely (see module docstring).

    Args:
        path: checkpoint file (``.pth`` / ``.pt``, torch zip format or legacy).
        map_location: passed to ``torch.load``.
        trust_checkpoint: if True, use ``torch.load(weights_only=False)``, which can run arbitrary
            code embedded in the file.  Default False.

    Raises:
        CheckpointError: missing/corrupt file, or a global outside the allow-list.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file not found: {p}")
    if trust_checkpoint:
        try:
            return torch.load(p, map_location=map_location, weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"could not read checkpoint {p}: {type(e).__name__}: {e}") from e
    first_error: Exception | None = None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first_error = e
    except Exception as e:  # noqa: BLE001 - corrupt / truncated / not a torch file
        raise CheckpointError(
            f"could not read checkpoint {p} (corrupt or not a torch file?): {type(e).__name__}: {e}"
        ) from e
    # Fallback for pickle protocols > 2 (the official files): restricted unpickler.
    try:
        return torch.load(
            p, map_location=map_location, weights_only=False, pickle_module=_restricted_pickle_module
        )
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"could not read checkpoint {p} safely: {type(e).__name__}: {e} "
            f"(torch weights-only loader said: {first_error})"
        ) from e


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> "collections.OrderedDict[str, torch.Tensor]":
    """Remove DataParallel/DDP ``module.`` prefixes (every occurrence, as the official loaders)."""
    return collections.OrderedDict((k.replace("module.", ""), v) for k, v in state_dict.items())


def conf_to_container(conf: Any) -> dict:
    """OmegaConf config (or plain mapping) -> plain dict with interpolations resolved.

    Interpolations that cannot be resolved inside the stored config are left as strings.
    """
    if conf is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(conf, DictConfig):
            try:
                return OmegaConf.to_container(conf, resolve=True)  # type: ignore[return-value]
            except Exception:  # noqa: BLE001
                return OmegaConf.to_container(conf, resolve=False)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    if isinstance(conf, Mapping):
        return {k: conf_to_container(v) if isinstance(v, Mapping) else v for k, v in conf.items()}
    raise CheckpointError(f"checkpoint 'conf' has unsupported type {type(conf).__name__}")


@dataclass
class LoadedCheckpoint:
    """A parsed official checkpoint.

    Attributes:
        state_dict: model weights, ``module.`` prefixes removed.
        conf: the full training config as a plain dict (interpolations resolved).
        model_conf: ``conf['model']`` (what sizes the architecture).
        raw: the remaining container entries (epoch, step, ...; the optimizer state is dropped).
        path: the file.
    """

    state_dict: "collections.OrderedDict[str, torch.Tensor]"
    conf: dict
    model_conf: dict
    raw: dict = field(default_factory=dict)
    path: Path | None = None


def _parse_container(
    obj: Any, path: Path, required: Iterable[str], kind: str, weights_key: str = "model"
) -> LoadedCheckpoint:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected an official {kind} checkpoint container (a dict), got {type(obj).__name__}"
        )
    missing = [k for k in required if k not in obj]
    if missing:
        raise CheckpointError(
            f"{path}: not an official {kind} checkpoint: container lacks {missing} "
            f"(has {sorted(map(str, obj.keys()))})"
        )
    sd = obj[weights_key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: container entry {weights_key!r} is not a state_dict of tensors")
    conf = conf_to_container(obj["conf"])
    if "model" not in conf:
        raise CheckpointError(f"{path}: checkpoint conf has no 'model' section")
    raw = {k: v for k, v in obj.items() if k not in (weights_key, "conf", "optimizer", "ema")}
    return LoadedCheckpoint(strip_module_prefix(sd), conf, conf["model"], raw, path)


def load_framediff_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", trust_checkpoint: bool = False
) -> LoadedCheckpoint:
    """Read an official FrameDiff container ``{model, conf, optimizer, epoch, step}``."""
    p = Path(path)
    obj = load_checkpoint_file(p, map_location, trust_checkpoint)
    return _parse_container(obj, p, ("model", "conf"), "FrameDiff")


def load_proteus_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", trust_checkpoint: bool = False
) -> LoadedCheckpoint:
    """Read an official Proteus container ``{model, ema, conf, optimizer, epoch, step, dataset_csvs}``.

    Only ``model`` is used (as the official sampler); ``ema`` is ignored.
    """
    p = Path(path)
    obj = load_checkpoint_file(p, map_location, trust_checkpoint)
    return _parse_container(obj, p, ("model", "conf"), "Proteus")


def _fmt_keys(keys: list[str], limit: int = 20) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_checked(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    ignore_unexpected: Iterable[str] = (),
    source: str = "checkpoint",
) -> dict[str, list[str]]:
    """Load ``state_dict`` into ``model`` after checking keys and shapes.

    Args:
        strict: if True (FrameDiff), any missing or unexpected key is an error.  If False
            (Proteus, whose official loader is non-strict), unexpected keys are tolerated and
            reported, but *missing* keys are still an error (a model with uninitialised weights is
            never returned silently).
        ignore_unexpected: key prefixes that may be present in the file without being used.

    Returns:
        ``{"missing": [...], "unexpected": [...]}`` (both empty for an exact match).

    Raises:
        CheckpointError: naming missing, unexpected and shape-mismatched keys.
    """
    own = model.state_dict()
    sd = dict(state_dict)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and not any(k.startswith(p) for p in ignore_unexpected)]
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or mismatched or (strict and unexpected):
        raise CheckpointError(
            f"{source} does not match the {type(model).__name__} architecture built from its config:\n"
            f"  missing keys ({len(missing)}): {_fmt_keys(missing)}\n"
            f"  unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}\n"
            f"  shape mismatches ({len(mismatched)}): {_fmt_keys(mismatched)}"
        )
    filtered = {k: v for k, v in sd.items() if k in own}
    model.load_state_dict(filtered, strict=True)
    return {"missing": missing, "unexpected": unexpected}
