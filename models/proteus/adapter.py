"""Proteus frame-model adapter: official checkpoint in, batched noisy frames -> predicted clean frames.

Typical use::

    model = ProteusAdapter.from_checkpoint("paper_weights.pt", device="cuda")
    out = model(rotmats_t, trans_t, t, res_mask)                        # first step: no template
    out = model(rotmats_t, trans_t, t, res_mask, out.self_cond_state)   # later steps
    rot_score, trans_score = model.official_scores(out, rotmats_t, trans_t, t, res_mask)

Units: translations in Angstrom in and out (the trunk works in nm internally); rotation matrices
act on column vectors (``x_global = R x_local + t``). The self-conditioning state is the previous
prediction's backbone atoms (B, N, 4, 3) = N, CA, C, O in Angstrom (padding zeroed), exactly the
template the official sampler feeds back; ``None`` means "no self-conditioning" (first step).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from superdiff_protein.frames.checkpoints import load_proteus_checkpoint, load_state_dict_checked
from superdiff_protein.frames.geometry import rotmat_to_quat
from superdiff_protein.frames.official_numerics import official_rot_score, official_trans_score
from superdiff_protein.frames.se3 import SE3DiffuserConfig

from .network import ProteusNetwork

__all__ = ["ProteusOutput", "ProteusAdapter", "official_scores_from_frames"]


def official_scores_from_frames(quats_t: Tensor, trans_t: Tensor, quats_pred: Tensor, trans_pred: Tensor, t: Tensor,
                                res_mask: Tensor | None = None, conf: Any = None) -> tuple[Tensor, Tensor]:
    """Scores the way the official Proteus sampler derives them from the predicted frames.

    ``FoldModule.diffusion_sample`` calls its ``SE3Diffuser``: ``calc_rot_score(R_t, Rotation(pred_rotmats), t)``
    (the IGSO(3) score of the rotation vector of ``q_pred^-1 q_t`` with the tabulated sigma, mixed float32/float64)
    and ``calc_trans_score(x_t, x_pred, t, use_torch=True)`` in scaled coordinates. The two official SE(3)
    diffusers (FrameDiff, Proteus) are numerically identical for these functions (``diffuser_differences.json``:
    only ``rot_to_quat`` differs, by an ``1e-7 I`` shift of the 4x4 matrix, which does not change its
    eigenvectors), so this is :mod:`superdiff_protein.frames.official_numerics` with Proteus's config.

    ``conf`` is the full run config (its ``diffuser`` section; defaults = the official base.yaml); translations in
    Angstrom. Returns ``(rot_score (B, N, 3) float64 in 1/rad, trans_score (B, N, 3) in 1/nm)``; padded residues
    (``res_mask == 0``) get zero scores (the official code does not mask them).
    """
    cfg = SE3DiffuserConfig.from_conf(conf, center_rule="proteus")
    return (official_rot_score(quats_t, quats_pred, t, cfg, res_mask),
            official_trans_score(trans_t, trans_pred, t, cfg, res_mask))


@dataclass
class ProteusOutput:
    """Predicted clean frames for a batch.

    Attributes:
        rotmats: (B, N, 3, 3) predicted rotations.
        trans: (B, N, 3) predicted CA positions, Angstrom.
        quats: (B, N, 4) the same rotations as unit quaternions (w-first; the network's native form).
        backbone: (B, N, 4, 3) N, CA, C, O of the prediction (O as the official code places it).
        self_cond_state: (B, N, 4, 3) template for the next call (= ``backbone``, padding zeroed).
    """

    rotmats: Tensor
    trans: Tensor
    quats: Tensor
    backbone: Tensor
    self_cond_state: Tensor


class ProteusAdapter(nn.Module):
    """Thin wrapper around :class:`ProteusNetwork` with Angstrom frames in and out."""

    def __init__(self, network: ProteusNetwork, conf: Optional[dict] = None):
        super().__init__()
        self.network = network
        self.conf = conf or {}

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: Any = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "ProteusAdapter":
        """Load an official Proteus checkpoint ``{model, ema, conf, optimizer, epoch, step, dataset_csvs}``.

        The architecture is sized from the checkpoint's own pickled ``conf.model``. Only ``model`` is
        used (``ema`` is ignored, as by the official sampler). Unlike the official non-strict load,
        keys and shapes must match exactly: any missing or unexpected key raises
        :class:`~superdiff_protein.frames.checkpoints.CheckpointError` naming them (the official
        checkpoints have no unused keys, so nothing needs to be ignored). The file is read by the
        allow-listed loader (:mod:`superdiff_protein.runs.safe_load`): no code from it runs.
        Returns the model in ``eval()`` mode.
        """
        ck = load_proteus_checkpoint(path, map_location="cpu")
        net = ProteusNetwork(ck.model_conf)
        load_state_dict_checked(net, ck.state_dict, strict=True, source=str(path))
        model = cls(net, ck.conf)
        return model.to(device=device, dtype=dtype).eval()

    def forward(
        self,
        rotmats: Optional[Tensor],
        trans: Tensor,
        t: Tensor,
        res_mask: Tensor,
        self_cond_state: Optional[Tensor] = None,
        *,
        quats: Optional[Tensor] = None,
        fixed_mask: Optional[Tensor] = None,
        chain_index: Optional[Tensor] = None,
    ) -> ProteusOutput:
        """Predict clean frames from noisy frames.

        Args:
            rotmats: (B, N, 3, 3) noisy rotations (or ``None`` and pass ``quats`` (B, N, 4)).
            trans: (B, N, 3) noisy CA positions in Angstrom.
            t: (B,) diffusion times in [0, 1] (or a scalar, broadcast).
            res_mask: (B, N) 1 = real residue, 0 = padding (any mix of lengths).
            self_cond_state: previous output's ``self_cond_state`` or ``None`` (first step).
            fixed_mask: (B, N) motif residues kept fixed (default none).
            chain_index: (B, N) chain ids (default single chain).
        """
        if quats is None:
            if rotmats is None:
                raise ValueError("pass either rotmats or quats")
            quats = rotmat_to_quat(rotmats.float())
        b, _ = res_mask.shape
        t = torch.as_tensor(t, device=trans.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(b)
        out = self.network(quats, trans, t, res_mask, template_atoms=self_cond_state, fixed_mask=fixed_mask,
                           chain_index=chain_index)
        m = res_mask.to(out["pred_trans"].dtype)
        bb = out["backbone_atoms"]
        return ProteusOutput(out["pred_rotmats"], out["pred_trans"], out["pred_quats"], bb, bb * m[..., None, None])

    def official_scores(self, out: ProteusOutput, rotmats_t: Optional[Tensor], trans_t: Tensor, t: Tensor,
                        res_mask: Tensor, quats_t: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Scores as the official Proteus sampler computes them from the prediction (see
        :func:`official_scores_from_frames`).

        Returns ``(rot_score (B,N,3) float64 1/rad, trans_score (B,N,3) 1/nm)``."""
        if quats_t is None:
            quats_t = rotmat_to_quat(rotmats_t.float())
        t = torch.as_tensor(t, device=trans_t.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(res_mask.shape[0])
        return official_scores_from_frames(quats_t, trans_t, out.quats, out.trans, t, res_mask, self.conf)
