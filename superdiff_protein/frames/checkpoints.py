"""Safe loading of official FrameDiff / Proteus checkpoints (shared by both model packages).

Loading never executes code from the file: :func:`load_checkpoint_file` parses the torch file
itself (zip and legacy formats, every pickle protocol) with the allow-listed unpickler of
:mod:`superdiff_protein.runs.safe_load`; anything outside the allow-list (OmegaConf configs, builtin
containers, tensors) is refused with one line saying why and how to convert the file.  There is no
"trust" switch: a file that needs one must be re-saved as plain data (``docs/security.md``).

Key/shape checking (:func:`load_state_dict_checked`) always names missing, unexpected and
shape-mismatched keys; a partial load never happens silently.
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..runs.safe_load import CheckpointError, UnsafeCheckpointError, safe_load

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "LoadedCheckpoint",
    "load_checkpoint_file",
    "load_framediff_checkpoint",
    "load_proteus_checkpoint",
    "strip_module_prefix",
    "load_state_dict_checked",
    "conf_to_container",
]


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Read a ``.pt/.pth/.ckpt`` file with the allow-listed unpickler (no code from the file runs).

    Raises:
        UnsafeCheckpointError: the file references a global outside the allow-list (nothing ran).
        CheckpointError: missing, empty, truncated or not a torch file.
    """
    return safe_load(path, map_location)


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


def load_framediff_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> LoadedCheckpoint:
    """Read an official FrameDiff container ``{model, conf, optimizer, epoch, step}``."""
    p = Path(path)
    obj = load_checkpoint_file(p, map_location)
    return _parse_container(obj, p, ("model", "conf"), "FrameDiff")


def load_proteus_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> LoadedCheckpoint:
    """Read an official Proteus container ``{model, ema, conf, optimizer, epoch, step, dataset_csvs}``.

    Only ``model`` is used (as the official sampler); ``ema`` is ignored.
    """
    p = Path(path)
    obj = load_checkpoint_file(p, map_location)
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
