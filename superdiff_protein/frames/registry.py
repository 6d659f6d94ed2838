"""Model registry: names and checkpoint paths -> ready core score models.

``load_model(spec)`` accepts

* a registered name (:func:`register_model`, the built-in table :data:`BUILTIN_CHECKPOINTS`, or a
  third-party entry point in the group ``superdiff_protein.models``);
* ``framediff:<path>`` / ``proteus:<path>``: an official (or our own training) checkpoint of that kind;
* a checkpoint path: the container kind is detected from its keys (Proteus containers have ``ema``).

The registry imports no concrete model: the checkpoint kinds are a table of ``"module:attr"`` strings
(:data:`CHECKPOINT_ADAPTERS`, :data:`FRAME_SCORE_MODEL`) resolved only when a checkpoint of that kind is
loaded, so ``superdiff_protein`` never imports ``models`` statically (docs/architecture.md).

Third-party packages register models in their ``pyproject.toml``::

    [project.entry-points."superdiff_protein.models"]
    my-model = "my_package.superdiff:load"      # load(device="cpu", dtype=torch.float32, **kw) -> ScoreModel

Errors: unknown names raise :class:`UnknownModelError` (listing the available names); missing,
corrupt, unsafe or wrong-architecture checkpoints raise
:class:`~superdiff_protein.frames.checkpoints.CheckpointError`.
"""
from __future__ import annotations

import importlib
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoints import CheckpointError, load_checkpoint_file

__all__ = [
    "ENTRY_POINT_GROUP",
    "BUILTIN_CHECKPOINTS",
    "CHECKPOINT_ADAPTERS",
    "FRAME_SCORE_MODEL",
    "UnknownModelError",
    "register_model",
    "unregister_model",
    "available_models",
    "load_model",
    "load_frame_checkpoint",
    "detect_checkpoint_kind",
    "resolve_object",
]

ENTRY_POINT_GROUP = "superdiff_protein.models"
REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT_DIR = REPO_ROOT / "models" / "checkpoints"

#: Built-in names -> (kind, checkpoint file relative to ``models/checkpoints/``). A name is offered
#: only when its file exists. The trained default models go here (lead: fill in the files).
BUILTIN_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "default-helix": ("auto", "default_helix.pt"),
    "default-strand": ("auto", "default_strand.pt"),
}

#: Checkpoint kind -> ``"module:attr"`` of its adapter class (a ``from_checkpoint(path, device=, dtype=)``
#: classmethod), imported only when a checkpoint of that kind is loaded. A new container kind adds a row here.
CHECKPOINT_ADAPTERS: dict[str, str] = {
    "framediff": "models.framediff.adapter:FrameDiffAdapter",
    "proteus": "models.proteus.adapter:ProteusAdapter",
}
#: ``"module:attr"`` of the wrapper that turns a loaded adapter into a core score model (``from_adapter``).
FRAME_SCORE_MODEL = "models.frame_models:FrameScoreModel"

Factory = Callable[..., Any]
_REGISTRY: dict[str, Factory] = {}
_KINDS = tuple(CHECKPOINT_ADAPTERS)


class UnknownModelError(KeyError):
    """A model spec that is neither a registered name nor a checkpoint path."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown model"


def register_model(name: str, factory: Factory, overwrite: bool = False) -> None:
    """Register ``factory(device=..., dtype=..., **kw) -> ScoreModel`` under ``name``."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"model names must be non-empty strings without ':', got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for {name!r} is not callable")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"model {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory


def unregister_model(name: str) -> None:
    """Remove a name registered with :func:`register_model` (no error if absent)."""
    _REGISTRY.pop(name, None)


def _entry_points() -> dict[str, Any]:
    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # noqa: BLE001 - broken metadata of some unrelated distribution
        return {}
    return {ep.name: ep for ep in eps}


def _builtin_files() -> dict[str, tuple[str, Path]]:
    out = {}
    for name, (kind, rel) in BUILTIN_CHECKPOINTS.items():
        p = CHECKPOINT_DIR / rel
        if p.is_file():
            out[name] = (kind, p)
    return out


def available_models() -> list[str]:
    """Registered names, built-in checkpoints that exist, and entry-point names (sorted)."""
    return sorted(set(_REGISTRY) | set(_builtin_files()) | set(_entry_points()))


def resolve_object(ref: str) -> Any:
    """Import ``"package.module:attr"`` (dotted ``attr`` allowed) and return the attribute."""
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def detect_checkpoint_kind(container: Any, path: str | os.PathLike = "") -> str:
    """``"proteus"`` (has ``ema``) or ``"framediff"`` (``model`` + ``conf``) from a loaded container."""
    if not isinstance(container, dict):
        raise CheckpointError(f"{path}: not a FrameDiff/Proteus checkpoint container (got {type(container).__name__})")
    keys = set(map(str, container))
    if "model" not in keys or "conf" not in keys:
        raise CheckpointError(f"{path}: not a FrameDiff/Proteus checkpoint: container keys {sorted(keys)} "
                              "lack 'model'/'conf'")
    return "proteus" if "ema" in keys else "framediff"


def load_frame_checkpoint(path: str | os.PathLike, kind: str = "auto", device: Any = "cpu",
                          dtype: torch.dtype | None = torch.float32,
                          name: str | None = None, self_condition: bool = True):
    """Load a FrameDiff / Proteus checkpoint as a score model (:data:`FRAME_SCORE_MODEL`, resolved lazily)."""
    p = Path(path)
    if kind not in ("auto",) + _KINDS:
        raise UnknownModelError(f"unknown checkpoint kind {kind!r}; use one of {', '.join(_KINDS)} or auto-detect")
    if kind == "auto":
        kind = detect_checkpoint_kind(load_checkpoint_file(p, "cpu"), p)
    dtype = dtype or torch.float32
    Adapter = resolve_object(CHECKPOINT_ADAPTERS[kind])
    try:
        adapter = Adapter.from_checkpoint(p, device=device, dtype=dtype)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # config of another architecture
        raise CheckpointError(f"{p}: cannot build a {kind} model from this checkpoint's config "
                              f"({type(e).__name__}: {e}); is it a {kind} checkpoint?") from e
    wrapper = resolve_object(FRAME_SCORE_MODEL)
    return wrapper.from_adapter(adapter, name=name or f"{kind}:{p.stem}", self_condition=self_condition)


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.endswith((".pt", ".pth", ".ckpt")) or Path(spec).exists()


def load_model(spec: str | os.PathLike, device: Any = "cpu", dtype: torch.dtype | None = torch.float32,
               **kw: Any):
    """Build a score model from a registry name, ``kind:path`` or a checkpoint path (module docstring).

    Extra keywords go to the factory (registered / entry-point models) or to
    :func:`load_frame_checkpoint` (``name``, ``self_condition``).
    """
    s = os.fspath(spec) if not isinstance(spec, str) else spec.strip()
    if not s:
        raise UnknownModelError("empty model spec")
    if s in _REGISTRY:
        return _REGISTRY[s](device=device, dtype=dtype, **kw)
    builtins = _builtin_files()
    if s in builtins:
        kind, path = builtins[s]
        kw.setdefault("name", s)
        return load_frame_checkpoint(path, kind, device=device, dtype=dtype, **kw)
    kind, sep, rest = s.partition(":")
    if sep and kind in _KINDS:
        return load_frame_checkpoint(rest, kind, device=device, dtype=dtype, **kw)
    eps = _entry_points()
    if s in eps:
        try:
            factory = eps[s].load()
        except Exception as e:  # noqa: BLE001
            raise UnknownModelError(f"model {s!r}: entry point {eps[s].value!r} failed to import "
                                    f"({type(e).__name__}: {e})") from e
        return factory(device=device, dtype=dtype, **kw)
    if _looks_like_path(s):
        if not Path(s).exists():
            raise CheckpointError(f"checkpoint file not found: {s}")
        return load_frame_checkpoint(s, "auto", device=device, dtype=dtype, **kw)
    names = available_models()
    raise UnknownModelError(
        f"unknown model {s!r}. Available names: {', '.join(names) if names else '(none registered)'}; "
        f"or pass a checkpoint path, 'framediff:<path>' or 'proteus:<path>'")
