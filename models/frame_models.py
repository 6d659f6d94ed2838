"""Frame models (FrameDiff, Proteus, your own) as core :class:`~superdiff_protein.core.protocol.ScoreModel` s.

:class:`FrameScoreModel` wraps a *frame predictor* (anything that maps noisy frames to predicted clean
frames, e.g. :class:`~models.framediff.FrameDiffAdapter`, :class:`~models.proteus.ProteusAdapter`) and
the :class:`~superdiff_protein.frames.se3.SE3Diffuser` it was trained with into the protocol the superposition
sampler calls::

    model = FrameScoreModel.from_checkpoint("paper_weights.pth")       # FrameDiff or Proteus, autodetected
    out = model({"rot": R (B,N,3,3), "trans": x (B,N,3) in nm}, t (B,), mask (B,N), state)
    out.scores["rot"]    # (B,N,3) body-frame rotation score (tangent at R, step R @ exp(.)), 1/rad
    out.scores["trans"]  # (B,N,3) translation score in 1/nm (scaled coordinates)
    out.state            # carried self-conditioning state (FrameModelState)
    out.extras           # pred_rotmats, pred_trans (Angstrom), psi (FrameDiff), backbone, self_cond

Scores are computed from the predicted clean frames exactly as the official samplers do
(:meth:`SE3Diffuser.scores_from_prediction`: float32 network quantities, tabulated IGSO(3) score,
float32 time). Self-conditioning follows the official samplers:

* FrameDiff: on the first call (``state.calls == 0``) one extra pass with zero self-conditioning at the
  same t (the official ``inference_fn`` runs it at ``reverse_steps[0] = 1``), then every call feeds the
  previous prediction's CA positions;
* Proteus: no template on the first call, then the previous prediction's backbone atoms.

See ``docs/frame_model_protocol.md`` for the protocol and how to wrap other frame models.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from superdiff_protein.frames.geometry import rotmat_to_quat
from superdiff_protein.core.protocol import ModelOutput
from superdiff_protein.frames.se3 import SE3Diffuser

__all__ = ["FrameModelState", "FramePrediction", "FrameScoreModel"]


@dataclass
class FramePrediction:
    """What a frame predictor returns (the minimum a wrapped model must provide).

    ``rotmats`` (B,N,3,3), ``trans`` (B,N,3) Angstrom; optional ``quats`` (B,N,4) w-first (if the
    network carries quaternions, the official scores use them), ``psi`` (B,N,2), ``backbone`` (B,N,4,3),
    ``self_cond_state`` (anything: fed back on the next call).
    """

    rotmats: Tensor
    trans: Tensor
    quats: Optional[Tensor] = None
    psi: Optional[Tensor] = None
    backbone: Optional[Tensor] = None
    self_cond_state: Any = None


@dataclass
class FrameModelState:
    """Carried state: the predictor's self-conditioning input for the next call and the call count."""

    cond: Any = None
    calls: int = 0


def _first_param(module: Any) -> Optional[Tensor]:
    try:
        return next(module.parameters())
    except (AttributeError, StopIteration, TypeError):
        return None


class FrameScoreModel:
    """A frame predictor + its SE(3) diffuser as a core score model (see module docstring).

    Args:
        predictor: callable ``(rotmats, trans_A, t, res_mask, self_cond_state) -> prediction`` with
            attributes ``rotmats``, ``trans`` (Angstrom) and optionally ``quats``, ``psi``, ``backbone``,
            ``self_cond_state`` (FrameDiffAdapter / ProteusAdapter outputs qualify).
        diffuser: the diffuser the predictor was trained with (its signature is the model's).
        name: model name (shown in errors and logs).
        self_condition: FrameDiff: run the official extra first pass; Proteus/others: feed the
            previous prediction back (False: never).
        kind: ``"framediff"`` (extra first pass at the same t), ``"proteus"`` or ``"generic"``
            (no extra pass); autodetected from the adapter class.
    """

    def __init__(self, predictor: Callable, diffuser: SE3Diffuser, name: str = "frame_model",
                 self_condition: bool = True, kind: str | None = None):
        self.predictor = predictor
        self.diffuser = diffuser
        self.name = name
        self.self_condition = bool(self_condition)
        self.kind = kind or self._detect_kind(predictor)
        if self.kind not in ("framediff", "proteus", "generic"):
            raise ValueError(f"kind must be 'framediff', 'proteus' or 'generic', got {self.kind!r}")

    # -- construction
    @staticmethod
    def _detect_kind(predictor: Any) -> str:
        from models.framediff.adapter import FrameDiffAdapter
        from models.proteus.adapter import ProteusAdapter

        if isinstance(predictor, FrameDiffAdapter):
            return "framediff"
        if isinstance(predictor, ProteusAdapter):
            return "proteus"
        return "generic"

    @classmethod
    def from_adapter(cls, adapter: Any, name: str | None = None, self_condition: bool = True) -> "FrameScoreModel":
        """Wrap a loaded FrameDiffAdapter / ProteusAdapter with the diffuser of its own checkpoint config."""
        kind = cls._detect_kind(adapter)
        if kind == "framediff":
            diffuser = SE3Diffuser(adapter.diffuser_cfg)
        elif kind == "proteus":
            diffuser = SE3Diffuser.from_conf(adapter.conf, center_rule="proteus")
        else:
            raise TypeError(f"from_adapter needs a FrameDiffAdapter or ProteusAdapter, got {type(adapter).__name__}; "
                            "use FrameScoreModel(predictor, diffuser) for other models")
        return cls(adapter, diffuser, name=name or kind, self_condition=self_condition, kind=kind)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, kind: str | None = None, device: Any = "cpu",
                        dtype: torch.dtype = torch.float32,
                        name: str | None = None) -> "FrameScoreModel":
        """Load an official FrameDiff / Proteus checkpoint (``kind`` autodetected: Proteus has ``ema``)."""
        from superdiff_protein.frames.registry import load_model

        spec = f"{kind}:{os.fspath(path)}" if kind else os.fspath(path)
        return load_model(spec, device=device, dtype=dtype, name=name)

    # -- protocol
    def signature(self) -> dict:
        """The diffuser's forward process (IGSO(3) schedule, VP schedule, centring, coordinate scaling)."""
        return self.diffuser.signature()

    def init_state(self, batch: int, mask: Tensor | None) -> FrameModelState:
        return FrameModelState()

    def _device_dtype(self, like: Tensor) -> tuple[torch.device, torch.dtype]:
        p = _first_param(self.predictor)
        if p is None:
            return like.device, torch.float32
        return p.device, p.dtype

    def predict(self, rotmats: Tensor, trans_A: Tensor, t: Tensor, mask: Tensor, state: FrameModelState | None):
        """Run the predictor with the official self-conditioning schedule.

        Returns ``(prediction, new_state, net_inputs)``; inputs are cast to the predictor's device/dtype and
        ``t`` to float32 (the official samplers feed float32 times).
        """
        state = state or FrameModelState()
        dev, dt = self._device_dtype(trans_A)
        R = rotmats.to(device=dev, dtype=dt)
        T = trans_A.to(device=dev, dtype=dt)
        m = mask.to(device=dev)
        t32 = torch.as_tensor(t, device=dev).to(torch.float32)
        if t32.ndim == 0:
            t32 = t32.expand(T.shape[0])
        cond = state.cond
        if self.kind == "framediff":
            if state.calls == 0 and self.self_condition and self._embeds_self_conditioning():
                cond = self.predictor(R, T, t32, m, None).self_cond_state
        elif not self.self_condition:
            cond = None
        pred = self.predictor(R, T, t32, m, cond)
        new_cond = getattr(pred, "self_cond_state", None)
        if self.kind == "framediff" and not self._embeds_self_conditioning():
            new_cond = None
        return pred, FrameModelState(new_cond, state.calls + 1), (R, T, m, t32)

    def _embeds_self_conditioning(self) -> bool:
        cfg = getattr(self.predictor, "config", None)
        embed = getattr(cfg, "embed", None)
        return bool(getattr(embed, "embed_self_conditioning", True))

    def __call__(self, x: dict[str, Tensor], t: Tensor, mask: Tensor | None, state: Any) -> ModelOutput:
        """Scores at ``x = {"rot": (B,N,3,3), "trans": (B,N,3) nm}`` (see module docstring)."""
        rot, trans_nm = x["rot"], x["trans"]
        B, N = trans_nm.shape[:2]
        if mask is None:
            mask = torch.ones(B, N, device=trans_nm.device)
        trans_A = trans_nm / self.diffuser.coordinate_scaling
        pred, new_state, (R, T, m, t32) = self.predict(rot, trans_A, t, mask, state)
        sdt = torch.float64 if R.dtype == torch.float64 else torch.float32  # scores at >= float32
        quats_t = rotmat_to_quat(R.to(sdt))
        pq = pred.quats.to(sdt) if getattr(pred, "quats", None) is not None else None
        rs, ts = self.diffuser.scores_from_prediction(R.to(sdt), T.to(sdt), pred.rotmats.to(sdt), pred.trans.to(sdt),
                                                      t32, m, quats_t=quats_t, pred_quats=pq)
        out_dev, out_dt = trans_nm.device, trans_nm.dtype
        scores = {"rot": rs.to(device=out_dev, dtype=out_dt), "trans": ts.to(device=out_dev, dtype=out_dt)}
        extras = {"pred_rotmats": pred.rotmats.to(out_dev), "pred_trans": pred.trans.to(out_dev)}
        for k in ("psi", "backbone"):
            v = getattr(pred, k, None)
            if v is not None and callable(v):
                v = None
            if isinstance(v, Tensor):
                extras[k] = v.to(out_dev)
        if isinstance(new_state.cond, Tensor):
            extras["self_cond"] = new_state.cond.to(out_dev)
        return ModelOutput(scores, new_state, extras)

    def denoise_final(self, x: dict[str, Tensor], t_prev: Tensor, mask: Tensor | None,
                      state: FrameModelState | None = None, extras: dict[str, Tensor] | None = None
                      ) -> tuple[Tensor, Tensor]:
        """The official last step: at ``t = min_t`` both samplers call the model once more *without*
        resetting the time features (``t_prev`` = the last step's t) and return its predicted frames.

        The state is ``state`` or rebuilt from the last step's ``extras["self_cond"]``
        (``SampleResult.extras[i]``). Returns ``(rotmats, trans in Angstrom)``.
        """
        if state is None:
            cond = (extras or {}).get("self_cond")
            state = FrameModelState(cond, 1)
        B, N = x["trans"].shape[:2]
        if mask is None:
            mask = torch.ones(B, N, device=x["trans"].device)
        pred, _, _ = self.predict(x["rot"], x["trans"] / self.diffuser.coordinate_scaling, t_prev, mask, state)
        return pred.rotmats, pred.trans

    def __repr__(self) -> str:
        return f"FrameScoreModel(name={self.name!r}, kind={self.kind!r}, predictor={type(self.predictor).__name__})"
