"""FrameDiff's training loss (jasonkyuyim/se3_diffusion @ 53359d7, ``experiments/train_se3_diffusion.py::loss_fn``),
batched over chains of different lengths, plus our optional CA clash loss. Pure torch: no Lightning.

* rotation loss: FrameDiff's *separate* axis / angle loss on the rotation score, the angle part divided by
  ``rot_score_scaling`` and only for ``t > rot_loss_t_threshold``;
* translation loss: the score loss divided by ``trans_score_scaling`` for ``t > trans_x0_threshold``, otherwise
  the x0 loss in scaled (nm) coordinates (official default threshold 1.0: always x0);
* optional auxiliary losses (``aux_loss``) for ``t < 0.25``: idealised backbone atoms (N, CA, C, O, CB) and
  pairwise atom distances below 6 A;
* optional CA clash loss (``clash_loss_weight > 0``; not official), see :func:`ca_clash_loss`;
* optional CA bond loss (``bond_loss_weight > 0``; not official), see :func:`ca_bond_loss`.

The Lightning module that draws t, noise and self-conditioning and calls these is
:class:`models.framediff.training.FrameDiffusionModule`. Documentation: ``docs/training.md``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from superdiff_protein.frames.geometry import backbone_atoms_from_frames, psi_from_backbone

__all__ = ["framediff_loss", "ca_clash_loss", "ca_bond_loss", "seq_idx", "psi_targets"]


def seq_idx(batch: Mapping[str, Tensor], mode: str) -> Tensor:
    """Residue index fed to the network: ``file`` numbering (1-based, gaps kept; official) or ``consecutive``."""
    mask = batch["res_mask"]
    if mode == "consecutive":
        return (torch.arange(1, mask.shape[1] + 1, device=mask.device)[None] * mask).long()
    rid = batch["res_ids"].long()
    return ((rid - rid[:, :1] + 1) * mask.long()).clamp_min(0)


def framediff_loss(
    pred_rotmats: Tensor, pred_trans: Tensor, pred_psi: Tensor,
    pred_rot_score: Tensor, pred_trans_score: Tensor,
    gt: Mapping[str, Tensor], noised: Any, t: Tensor, res_mask: Tensor, exp: Mapping[str, Any],
) -> dict[str, Tensor]:
    """FrameDiff's training loss, per chain (official ``loss_fn``; every input float32).

    Args:
        pred_*: network predictions (frames in Angstrom, psi (sin, cos)) and the scores derived from
            them by ``SE3Diffuser.scores_from_prediction``.
        gt: ``rotmats``, ``trans`` (Angstrom), ``psi`` (B, N, 2), ``psi_mask`` (B, N).
        noised: ``forward_marginal`` output (``rot_score``, ``trans_score``, ``*_score_scaling``).
        t: (B,) times; res_mask: (B, N).
        exp: the ``experiment`` config section (official weight names).

    Returns:
        dict of (B,) tensors ``loss``, ``rot_loss``, ``trans_loss``, ``bb_atom_loss``,
        ``dist_mat_loss`` (weighted, already gated by their t ranges), plus ``clash_loss`` when
        ``exp["clash_loss_weight"] > 0`` (our addition, :func:`ca_clash_loss`; included in ``loss``), and
        ``bond_loss`` when ``exp["bond_loss_weight"] > 0`` (:func:`ca_bond_loss`; included in ``loss``).
    """
    mask = res_mask.float()
    m3 = mask[..., None]
    n_res = mask.sum(-1)
    scale = float(exp["coordinate_scaling"])

    # translation: score loss above trans_x0_threshold, x0 loss (nm) below / at it
    ts_scal = noised.trans_score_scaling.float()
    trans_score_loss = (((noised.trans_score.float() - pred_trans_score * m3) ** 2) * m3).sum((-1, -2)) / (
        ts_scal ** 2) / (n_res + 1e-10)
    trans_x0_loss = (((gt["trans"] - pred_trans) * scale) ** 2 * m3).sum((-1, -2)) / (n_res + 1e-10)
    thr = float(exp["trans_x0_threshold"])
    trans_loss = trans_score_loss * (t > thr) + trans_x0_loss * (t <= thr)
    trans_loss = trans_loss * float(exp["trans_loss_weight"])

    # rotation
    gt_rs = noised.rot_score.float()
    pr_rs = pred_rot_score * m3
    rs_scal = noised.rot_score_scaling.float()
    gate = (t > float(exp["rot_loss_t_threshold"])).float()
    if exp["separate_rot_loss"]:
        gt_ang = gt_rs.norm(dim=-1, keepdim=True)
        pr_ang = pr_rs.norm(dim=-1, keepdim=True)
        axis_loss = (((gt_rs / (gt_ang + 1e-6) - pr_rs / (pr_ang + 1e-6)) ** 2) * m3).sum((-1, -2)) / (n_res + 1e-10)
        angle_loss = (((gt_ang - pr_ang) ** 2) * m3).sum((-1, -2)) / rs_scal ** 2 / (n_res + 1e-10)
        rot_loss = angle_loss * float(exp["rot_loss_weight"]) * gate + axis_loss
    else:
        rot_loss = (((gt_rs - pr_rs) ** 2) * m3).sum((-1, -2)) / rs_scal ** 2 / (n_res + 1e-10)
        rot_loss = rot_loss * float(exp["rot_loss_weight"]) * gate

    zero = torch.zeros_like(rot_loss)
    bb_atom_loss, dist_mat_loss = zero, zero
    if exp["aux_loss"]:
        # idealised backbone (N, CA, C, O, CB) from frames + psi, as official compute_backbone
        pred_atoms = backbone_atoms_from_frames(pred_rotmats, pred_trans, pred_psi, with_cb=True)
        gt_atoms = backbone_atoms_from_frames(gt["rotmats"], gt["trans"], gt["psi"], with_cb=True)
        atom_mask = mask[..., None].expand(*mask.shape, 5).clone()
        atom_mask[..., 3] = atom_mask[..., 3] * gt["psi_mask"].float()  # O unknown where O is missing
        bb_atom_loss = (((pred_atoms - gt_atoms) ** 2).sum(-1) * atom_mask).sum((-1, -2)) / (
            atom_mask.sum((-1, -2)) + 1e-10)
        bb_atom_loss = bb_atom_loss * float(exp["bb_atom_loss_weight"]) * (t < float(exp["bb_atom_loss_t_filter"]))
        bb_atom_loss = bb_atom_loss * float(exp["aux_loss_weight"])

        b, n = mask.shape
        gflat = gt_atoms.reshape(b, n * 5, 3)
        pflat = pred_atoms.reshape(b, n * 5, 3)
        fmask = atom_mask.reshape(b, n * 5)
        gd = torch.cdist(gflat, gflat) * fmask[..., None]
        pd = _safe_pdist(pflat) * fmask[..., None]
        pmask = fmask[..., None] * fmask[:, None, :] * (gd < 6).float()
        # official denominator: (#pairs - num_res); with single-protein batches num_res = real length
        dist_mat_loss = ((gd - pd) ** 2 * pmask).sum((1, 2)) / (pmask.sum((1, 2)) - n_res).clamp_min(1.0)
        dist_mat_loss = dist_mat_loss * float(exp["dist_mat_loss_weight"]) * (t < float(exp["dist_mat_loss_t_filter"]))
        dist_mat_loss = dist_mat_loss * float(exp["aux_loss_weight"])
    cap = exp.get("small_t_weight_cap")
    if cap is not None:
        # FrameFlow-like emphasis on nearly clean states: the x0 terms weighted by 1 / sigma_t^2 of the translation
        # noise (= trans_score_scaling^2), capped; about 1 at t >= 0.5, 10 at t = 0.1, the cap below t ~ 0.03.
        # Without it an error of 0.2 A at small t costs 4e-4 nm^2 against a loss near 2 (docs/training.md, "Session 23").
        w = torch.clamp(ts_scal ** 2, max=float(cap))
        trans_loss = trans_loss * torch.where(t <= thr, w, torch.ones_like(w))
        bb_atom_loss, dist_mat_loss = bb_atom_loss * w, dist_mat_loss * w
    rot_loss = rot_loss * bool(exp.get("diffuse_rot", True))
    trans_loss = trans_loss * bool(exp.get("diffuse_trans", True))
    loss = rot_loss + trans_loss + bb_atom_loss + dist_mat_loss
    out = {"loss": loss, "rot_loss": rot_loss, "trans_loss": trans_loss,
           "bb_atom_loss": bb_atom_loss, "dist_mat_loss": dist_mat_loss}
    w_clash = float(exp.get("clash_loss_weight") or 0.0)
    if w_clash > 0:
        clash = ca_clash_loss(pred_trans, gt["trans"], mask, float(exp.get("clash_dist", 3.8)),
                              int(exp.get("clash_min_sep", 3)))
        clash = clash * w_clash * (t < float(exp.get("clash_loss_t_filter", 0.5)))
        out["clash_loss"] = clash
        out["loss"] = out["loss"] + clash
    w_bond = float(exp.get("bond_loss_weight") or 0.0)
    if w_bond > 0:
        bond = ca_bond_loss(pred_trans, gt["trans"], mask)
        bond = bond * w_bond * (t < float(exp.get("bond_loss_t_filter", 0.1)))
        out["bond_loss"] = bond
        out["loss"] = out["loss"] + bond
    return out


def ca_clash_loss(pred_ca: Tensor, gt_ca: Tensor | None, mask: Tensor, clash_dist: float = 3.8,
                  min_sep: int = 3) -> Tensor:
    """One-sided CA clash penalty per chain (not in official FrameDiff; off unless ``clash_loss_weight > 0``).

    For residue pairs ``|i - j| >= min_sep``: ``relu(min(d_gt, clash_dist) - d_pred)^2`` summed over pairs
    and divided by the number of residues (A^2). The threshold never exceeds the true distance, so the
    ground truth costs exactly zero; only predicted pairs closer than both the truth and ``clash_dist``
    are pushed apart. FrameDiff's distance loss only sees pairs closer than 6 A in the *truth*, so it
    never penalises two distant segments predicted on top of each other -- the clashes small models make.
    ``gt_ca=None``: no true structure (the model's own sampled states, :mod:`models.framediff.self_states`);
    every threshold is ``clash_dist``.
    """
    m = mask.float()
    n = m.shape[-1]
    idx = torch.arange(n, device=m.device)
    far = ((idx[:, None] - idx[None, :]).abs() >= min_sep).to(m.dtype)
    pm = m[:, :, None] * m[:, None, :] * far
    pd = _safe_pdist(pred_ca.float())
    if gt_ca is None:
        thr = torch.full_like(pd, clash_dist)
    else:
        thr = torch.cdist(gt_ca.float(), gt_ca.float()).clamp_max(clash_dist)
    pen = torch.relu(thr - pd) ** 2 * pm
    return pen.sum((1, 2)) / 2.0 / m.sum(-1).clamp_min(1.0)


def ca_bond_loss(pred_ca: Tensor, gt_ca: Tensor, mask: Tensor) -> Tensor:
    """Consecutive CA-CA distance loss per chain, A^2 (not in official FrameDiff; off unless
    ``bond_loss_weight > 0``).

    Mean over neighbouring pairs (i, i + 1) with both residues present of ``(d_pred - d_true)^2``. The target
    is the true distance itself, so a chain break in the data (a long true gap) asks for the same gap, and the
    ground truth costs exactly zero. Why: at small t the x0 loss weighs a 0.2 A error -- the half-width of the
    3.6-4.0 A CA-CA window -- at 4e-4 nm^2, which the rotation loss drowns; the shipped models' clean
    predictions from real chains noised to t = 0.002 put only 95-97 % of CA-CA distances in that window.
    Gate it to small t (``bond_loss_t_filter``): at larger t the MSE-optimal prediction is a posterior mean,
    whose distances are shorter than any one structure's, and a bond term would pull it off that mean.
    """
    m = mask.float()
    pair = m[:, 1:] * m[:, :-1]
    dp = _safe_norm(pred_ca[:, 1:].float() - pred_ca[:, :-1].float())
    dg = _safe_norm(gt_ca[:, 1:].float() - gt_ca[:, :-1].float())   # the same arithmetic: truth costs exactly 0
    return ((dp - dg) ** 2 * pair).sum(-1) / pair.sum(-1).clamp_min(1.0)


def _safe_norm(v: Tensor) -> Tensor:
    """Vector norms over the last axis with a finite gradient at zero."""
    n2 = (v ** 2).sum(-1)
    pos = n2 > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, n2, torch.ones_like(n2))), torch.zeros_like(n2))


def _safe_pdist(x: Tensor) -> Tensor:
    """Pairwise distances with a finite gradient at zero distance (diagonal)."""
    d2 = ((x[:, :, None, :] - x[:, None, :, :]) ** 2).sum(-1)
    return torch.sqrt(d2 + 1e-10) * (d2 > 0)


def psi_targets(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Ground-truth psi (sin, cos) from the N, CA, C, O atoms, and where it is defined (O present)."""
    a = batch["atoms"].float()
    psi = psi_from_backbone(a[..., 0, :], a[..., 1, :], a[..., 2, :], a[..., 3, :])
    ok = batch["atom_mask"][..., 3] & batch["atom_mask"][..., 0] & batch["atom_mask"][..., 2]
    psi = torch.where(ok[..., None], psi, torch.tensor([0.0, -1.0], device=psi.device))
    return torch.nan_to_num(psi), ok
