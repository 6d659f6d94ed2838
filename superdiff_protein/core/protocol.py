"""The score-model protocol every model adapter implements (analytic, frame networks, images).

A model is called on a batched state and returns its score per component, in the tangent
coordinates of the corresponding :class:`~superdiff_protein.core.spaces.ComponentSpace`, plus any
carried state (self-conditioning) and optional extras (e.g. predicted clean frames).
See ``docs/frame_model_protocol.md`` for the frame-model specifics.

Optional: ``log_density(x, t, mask) -> dict[str, Tensor]``, the model's own marginal log-density
``log q_t`` per component (shape (B,) each), w.r.t. the same reference measure as the space's
``prior_log_prob`` (Lebesgue on R^d, normalised Haar on SO(3)). Only models that know their density
(the exact models of ``models/analytic.py``) provide it; ``SamplerConfig(init_logq="model")`` calls
it at t = 1 to start the tracked log-densities there (``docs/superposition.md``, "Start value").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["ModelOutput", "ScoreModel", "IncompatibleModelsError", "check_compatible"]


@dataclass
class ModelOutput:
    """What a model returns for one evaluation.

    ``scores`` drive the sampler (the superposed drift ``sum_i kappa_i s_i``). ``density_scores``
    (optional) are the scores ``grad log q_i^t`` of the model's own forward-process marginal, whose
    log-density the sampler tracks, when they differ from the drift: a classifier-free-guided prompt
    drives the sampler with ``s_u + w (s_c - s_u)`` but only its conditional ``s_c`` is the score of a
    marginal (``docs/images.md``). ``None`` (every model without guidance) means ``scores``.
    """

    scores: dict[str, Tensor]
    state: Any = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    density_scores: dict[str, Tensor] | None = None


@runtime_checkable
class ScoreModel(Protocol):
    """Protocol of a score model usable by the superposition sampler."""

    name: str

    def signature(self) -> dict:
        """Forward-process signature; must equal the sampler space's ``signature()``."""
        ...

    def init_state(self, batch: int, mask: Tensor | None) -> Any:
        """Initial carried state (e.g. ``None`` = no self-conditioning yet)."""
        ...

    def __call__(self, x: dict[str, Tensor], t: Tensor, mask: Tensor | None, state: Any) -> ModelOutput:
        """Scores at state ``x`` and time ``t`` (shape (B,))."""
        ...


class IncompatibleModelsError(ValueError):
    """Raised when models do not share the forward process and so cannot be superposed."""


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}{k}: only in {'space' if k in a else 'model'}")
            else:
                out += _diff(a[k], b[k], f"{path}{k}.")
        return out
    return [] if a == b else [f"{path.rstrip('.')}: {a!r} != {b!r}"]


def check_compatible(space_signature: dict, models: list) -> None:
    """Refuse models whose forward process differs from the space's (say which field differs)."""
    problems = []
    for m in models:
        d = _diff(space_signature, m.signature())
        if d:
            problems.append(f"model {getattr(m, 'name', m)!r}: " + "; ".join(d))
    if problems:
        raise IncompatibleModelsError(
            "these models cannot be superposed: superposition is only defined for models that share the "
            "forward SDE (schedule, coordinate scaling, centring). Differences: " + " | ".join(problems)
        )
