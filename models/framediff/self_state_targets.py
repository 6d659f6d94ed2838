"""Refined targets for a self-state pool: the reference's predictions with their geometry repaired.

Why (docs/training.md, "Session 19"): asking the network, on its own states, for the reference's prediction *plus*
a clash penalty is a tug of war between terms whose balance sets the result; session 18's strand model lost
CA-CA precision (98.8 -> 92 % in window) while its clashes fell. Here the repair happens once, offline, on each
recorded prediction, and the network then regresses onto the repaired structure: one target per state, no
competing terms in the training loss.

:func:`refine_targets` moves each predicted frame ``(R, x)`` to ``(R exp(w), x + d)`` minimising

    anchor + weight * (CA clashes + backbone-atom clashes + CA-CA bond + C-N peptide bond),

* ``anchor``: mean over residues of ``|d|^2`` (A^2) + ``|exp(w) - I|_F^2`` (the same metric as the training anchor);
* CA clashes: ``relu(clash_dist - d_ij)^2`` summed over CA pairs ``|i - j| >= min_sep``;
* backbone-atom clashes: the same over N, CA, C of residues ``|i - j| >= 2`` with ``bb_clash_dist``;
* bonds: squared distance outside ``bond_window`` (consecutive CA-CA) and ``cn_window`` (C(i)-N(i+1), atoms from
  the ideal frame geometry), only for states with ``t <= geometry_t_max``: at larger ``t`` the prediction is a
  posterior mean whose bonds are legitimately short (``bond_loss_t_filter``'s reason).

Each state's energy is separate and Adam acts element-wise, so a state's target does not depend on what else is
in its batch.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from superdiff_protein.core.so3 import so3_exp
from superdiff_protein.frames.geometry import backbone_atoms_from_frames

from .losses import _safe_pdist

__all__ = ["refine_targets", "target_stats"]

#: thresholds of the summary in :func:`target_stats` (those of eval/metrics.py, restated: models never import eval)
_STAT_CA_CLASH, _STAT_CA_WINDOW, _STAT_CN_WINDOW = 3.0, (3.6, 4.0), (1.229, 1.429)


def _window_pen(d: Tensor, lo: float, hi: float) -> Tensor:
    return torch.relu(lo - d) ** 2 + torch.relu(d - hi) ** 2


def _backbone(r: Tensor, x: Tensor) -> Tensor:
    """N, CA, C of ideal residues on frames (B, L, 3, 3), (B, L, 3) -> (B, L, 3, 3)."""
    return backbone_atoms_from_frames(r, x)[..., :3, :]


def _energy(r: Tensor, x: Tensor, m: Tensor, geo: Tensor, cfg: Mapping[str, float]) -> dict[str, Tensor]:
    """Penalty terms per state (B,) of frames ``r``, ``x`` under mask ``m``; ``geo`` (B,) gates the bond terms."""
    B, L = m.shape
    idx = torch.arange(L, device=m.device)
    sep = (idx[:, None] - idx[None, :]).abs()
    pm = m[:, :, None] * m[:, None, :]
    ca = _safe_pdist(x)
    clash = (torch.relu(cfg["clash_dist"] - ca) ** 2 * pm * (sep >= cfg["min_sep"])).sum((1, 2)) / 2
    bb = _backbone(r, x)                                               # (B, L, 3, 3)
    ab = _safe_pdist(bb.reshape(B, L * 3, 3))
    am = m.repeat_interleave(3, 1)
    asep = sep.repeat_interleave(3, 0).repeat_interleave(3, 1)
    bbc = (torch.relu(cfg["bb_clash_dist"] - ab) ** 2 * am[:, :, None] * am[:, None, :] * (asep >= 2)).sum((1, 2)) / 2
    link = m[:, 1:] * m[:, :-1]
    d_ca = (x[:, 1:] - x[:, :-1]).norm(dim=-1)
    d_cn = (bb[:, :-1, 2] - bb[:, 1:, 0]).norm(dim=-1)
    bond = (_window_pen(d_ca, *cfg["bond_window"]) * link).sum(-1) * geo
    cn = (_window_pen(d_cn, *cfg["cn_window"]) * link).sum(-1) * geo
    return {"clash": clash, "bb_clash": bbc, "bond": bond, "cn": cn}


def refine_targets(pool: Mapping[str, Tensor], *, clash_dist: float = 4.0, min_sep: int = 3,
                   bb_clash_dist: float = 2.6, bond_window: tuple[float, float] = (3.7, 3.9),
                   cn_window: tuple[float, float] = (1.28, 1.38), geometry_t_max: float = 0.1,
                   weight: float = 100.0, steps: int = 300, lr: float = 0.02, batch_size: int = 256,
                   device: str | torch.device | None = None, progress: bool = False) -> dict[str, Tensor]:
    """Repaired frames of a pool's predictions (module docstring): ``{"target_rot", "target_trans"}`` on the CPU,
    float32, with the pool's shapes (padding left as it was).

    Adam on the displacement ``d`` (A) and rotation vector ``w`` (rad) of every residue, ``steps`` steps at
    ``lr`` decaying linearly to ``lr / 10``; computed in float32 on ``device`` (default: the pool's).
    """
    cfg = {"clash_dist": float(clash_dist), "min_sep": int(min_sep), "bb_clash_dist": float(bb_clash_dist),
           "bond_window": tuple(map(float, bond_window)), "cn_window": tuple(map(float, cn_window))}
    dev = torch.device(device) if device is not None else pool["pred_trans"].device
    S = int(pool["t"].shape[0])
    out_r, out_x = pool["pred_rot"].float().clone().cpu(), pool["pred_trans"].float().clone().cpu()
    chunks = range(0, S, batch_size)
    if progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, desc="refine targets", unit="batch")
    for k in chunks:
        sl = slice(k, min(S, k + batch_size))
        n = int(pool["lengths"][sl].max())
        m = pool["mask"][sl, :n].to(dev).float()
        r0 = pool["pred_rot"][sl, :n].to(dev).float()
        x0 = pool["pred_trans"][sl, :n].to(dev).float()
        geo = (pool["t"][sl].to(dev).float() <= geometry_t_max).float()
        n_res = m.sum(-1).clamp_min(1.0)
        d = torch.zeros_like(x0, requires_grad=True)
        w = torch.zeros_like(x0, requires_grad=True)
        opt = torch.optim.Adam([d, w], lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - 0.9 * i / max(1, steps))
        eye = torch.eye(3, device=dev)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            rw = so3_exp(w)
            anchor = (((d ** 2).sum(-1) + ((rw - eye) ** 2).sum((-1, -2))) * m).sum(-1) / n_res
            e = _energy(r0 @ rw, x0 + d, m, geo, cfg)
            (anchor + weight * sum(e.values())).sum().backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            # padded residues get no gradient: their d, w stay 0 and their frames unchanged
            out_r[sl, :n] = (r0 @ so3_exp(w)).cpu()
            out_x[sl, :n] = (x0 + d).cpu()
    return {"target_rot": out_r, "target_trans": out_x}


def target_stats(pool: Mapping[str, Tensor], geometry_t_max: float = 0.1, rot_key: str = "pred_rot",
                 trans_key: str = "pred_trans") -> dict[str, float]:
    """Summary of a pool's predictions (``pred_*``) or targets (``target_*``): share of states with a CA clash
    (< 3.0 A at ``|i - j| >= 3``), and, over states with ``t <= geometry_t_max``, the shares of CA-CA and C-N
    distances in the evaluation windows (eval/metrics.py)."""
    x, r, m = pool[trans_key].float(), pool[rot_key].float(), pool["mask"].float()
    L = m.shape[1]
    idx = torch.arange(L)
    far = ((idx[:, None] - idx[None, :]).abs() >= 3)
    clashed = []
    for k in range(0, x.shape[0], 256):
        d = torch.cdist(x[k:k + 256], x[k:k + 256])
        pm = m[k:k + 256, :, None] * m[k:k + 256, None, :] * far
        clashed.append(((d < _STAT_CA_CLASH) & (pm > 0)).flatten(1).any(-1))
    geo = pool["t"].float() <= geometry_t_max
    link = (m[:, 1:] * m[:, :-1] > 0) & geo[:, None]
    d_ca = (x[:, 1:] - x[:, :-1]).norm(dim=-1)[link]
    bb = _backbone(r, x)
    d_cn = (bb[:, :-1, 2] - bb[:, 1:, 0]).norm(dim=-1)[link]

    def share(v: Tensor, lo: float, hi: float) -> float:
        return float(((v >= lo) & (v <= hi)).float().mean()) if v.numel() else float("nan")

    return {"clashed": float(torch.cat(clashed).float().mean()), "ca_ca_in_window": share(d_ca, *_STAT_CA_WINDOW),
            "c_n_in_window": share(d_cn, *_STAT_CN_WINDOW)}
