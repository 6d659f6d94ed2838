"""Scores the way the official Proteus sampler derives them from the predicted frames.

Proteus predicts clean frames; ``FoldModule.diffusion_sample`` turns them into scores with its
``SE3Diffuser``:

* ``rot_score = calc_rot_score(R_t, Rotation(rot_mats=pred_rotmats), t)``: IGSO(3) score of the
  rotation vector of ``q_pred^-1 q_t`` with the tabulated sigma(t) (mixed float32/float64).
* ``trans_score = calc_trans_score(x_t, x_pred, t, use_torch=True)`` in scaled coordinates (1/nm).

The two official SE(3) diffusers (FrameDiff, Proteus) are numerically identical for these
functions (see ``diffuser_differences.json``: only ``rot_to_quat`` differs by an ``1e-7 I``
shift of the 4x4 matrix, which does not change its eigenvectors), so this delegates to the shared
diffuser :mod:`superdiff_protein.frames.se3` (the same code FrameDiff uses).
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from superdiff_protein.frames.se3 import SE3DiffuserConfig, official_rot_score, official_trans_score

__all__ = ["official_scores"]


def official_scores(quats_t: Tensor, trans_t: Tensor, quats_pred: Tensor, trans_pred: Tensor, t: Tensor,
                    res_mask: Tensor | None = None, conf: Mapping[str, Any] | None = None) -> tuple[Tensor, Tensor]:
    """(rot_score (B, N, 3) float64 in 1/rad, trans_score (B, N, 3) in 1/nm); translations in Angstrom.

    ``conf`` is the full run config (its ``diffuser`` section; defaults = the official base.yaml).
    Padded residues (``res_mask == 0``) get zero scores (the official code does not mask them).
    """
    cfg = SE3DiffuserConfig.from_conf(conf, center_rule="proteus")
    rot = official_rot_score(quats_t, quats_pred, t, cfg, res_mask)
    tr = official_trans_score(trans_t, trans_pred, t, cfg, res_mask)
    return rot, tr
