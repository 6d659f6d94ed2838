"""Training on the model's own sampled states: a pool of reverse-SDE states and the loss on them.

Why (models/checkpoints/README.md, "Session 17"): 87-92 % of the embedded models' CA clashes are between residues
more than 12 apart, segments passing through each other. A clash loss on real chains noised by the forward process
only trims them: the sampler visits states the forward process never makes (its own interpenetrating
intermediates), and there the network's prediction was never asked to be clash-free.

So, like DAgger in imitation learning, we record the states the sampler itself visits:

* :func:`models.self_state_pool.collect_self_states` runs the reverse SDE of one network (the sampler of ``generate_backbones``,
  ``rule=single``, self-conditioning as there) and records, at every network call with ``t <= t_max``, the
  network's input (frames, ``t``, self-conditioning CA trace) and its prediction. This network is the frozen
  *reference*; the pool is a plain tensor file, read back through the allow-listed loader.
* :func:`self_state_loss` asks the network being trained, on those states, for the reference's prediction (an
  anchor on CA positions in Angstrom^2 and on rotation matrices) with no CA pair at ``|i - j| >= min_sep`` closer
  than ``clash_dist`` (the one-sided clash penalty of :func:`~models.framediff.losses.ca_clash_loss` with no
  true structure: every pair's threshold is ``clash_dist``). The anchor keeps the fold the reference chose; the
  clash term moves the overlapping segments apart. The minimiser is the reference's prediction with its
  clashes resolved: what clash guidance does at sampling time (frames/guidance.py), learnt by the network.

The training module adds ``experiment.self_state_weight * self_state_loss`` on a batch of
``experiment.self_state_batch`` pool states drawn each step (docs/training.md).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import Tensor

from .losses import ca_bond_loss, ca_clash_loss

__all__ = ["POOL_KEYS", "TARGET_KEYS", "PDOWNB_RG_FIT", "save_pool", "load_pool", "pool_batch", "self_state_loss",
           "radius_of_gyration"]

#: tensors of a pool file, each with the state index first
POOL_KEYS = ("rot_t", "trans_t", "t", "mask", "sc", "pred_rot", "pred_trans")
#: optional tensors: refined targets (:mod:`models.framediff.self_state_targets`); the loss anchors to them if present
TARGET_KEYS = ("target_rot", "target_trans")
#: (a, b) of PDownB's median CA radius of gyration, Rg = a n^b Angstrom (a least-absolute-deviation fit; docs/training.md,
#: "Session 21"): the default of ``self_state_rg_ref``.
PDOWNB_RG_FIT = (2.69, 0.344)


def save_pool(pool: Mapping[str, Tensor], path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> None:
    """Write a pool atomically (a temporary file renamed into place)."""
    from superdiff_protein.runs.atomic import atomic_open

    with atomic_open(path, "wb") as fh:
        torch.save({"pool": {k: v.contiguous() for k, v in pool.items()}, "meta": dict(meta or {})}, fh)


def load_pool(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a pool through the allow-listed loader and check its keys and shapes (ValueError if wrong)."""
    from superdiff_protein.runs.safe_load import safe_load

    obj = safe_load(path)
    pool = obj.get("pool") if isinstance(obj, dict) else None
    if not isinstance(pool, dict) or any(not isinstance(pool.get(k), Tensor) for k in (*POOL_KEYS, "lengths")):
        raise ValueError(f"{os.fspath(path)}: not a self-state pool (needs tensors {', '.join(POOL_KEYS)}, lengths)")
    S, N = pool["mask"].shape
    want = {"rot_t": (S, N, 3, 3), "trans_t": (S, N, 3), "t": (S,), "sc": (S, N, 3), "pred_rot": (S, N, 3, 3),
            "pred_trans": (S, N, 3), "lengths": (S,)}
    if any(k in pool for k in TARGET_KEYS):
        want.update(target_rot=(S, N, 3, 3), target_trans=(S, N, 3))
        if any(not isinstance(pool.get(k), Tensor) for k in TARGET_KEYS):
            raise ValueError(f"{os.fspath(path)}: a pool with targets needs both {' and '.join(TARGET_KEYS)}")
    for k, shape in want.items():
        if tuple(pool[k].shape) != shape:
            raise ValueError(f"{os.fspath(path)}: pool tensor {k} has shape {tuple(pool[k].shape)}, expected {shape}")
    if S == 0:
        raise ValueError(f"{os.fspath(path)}: the pool holds no states")
    return pool


def pool_batch(pool: Mapping[str, Tensor], idx: Tensor, device: torch.device) -> dict[str, Tensor]:
    """The states ``idx`` of a pool on ``device``, cropped to their longest chain."""
    n = int(pool["lengths"][idx].max())
    keys = (*POOL_KEYS, "lengths", *(k for k in TARGET_KEYS if k in pool))
    return {k: (pool[k][idx] if k in ("t", "lengths") else pool[k][idx, :n]).to(device) for k in keys}


def self_state_loss(pred_rot: Tensor, pred_trans: Tensor, batch: Mapping[str, Tensor], exp: Mapping[str, Any]
                    ) -> dict[str, Tensor]:
    """Per-state loss terms (module docstring), each (S,):

    * ``anchor``: mean over residues of ``|x - x_ref|^2`` (Angstrom^2) plus ``|R - R_ref|_F^2``, where the reference
      is the pool's refined target (``target_*``) when it has one, else the recorded prediction (``pred_*``);
    * ``clash``: ``ca_clash_loss`` with every threshold ``clash_dist`` (pairs ``|i - j| >= clash_min_sep``),
      times ``self_state_clash_weight``;
    * ``bond``: ``ca_bond_loss`` against the reference's (or target's) consecutive CA-CA distances, times
      ``self_state_bond_weight`` (the anchor alone lets a push on one CA stretch its bonds; ``ca_bond_loss`` is a
      mean over links where the clash term is a sum over pairs per residue, hence a larger weight);
    * ``rg``: a one-sided compactness term, ``relu(Rg - (1 + self_state_rg_margin) * a * n^b)^2`` (Angstrom^2) with
      ``Rg`` the CA radius of gyration of the prediction, ``n`` the chain's residues and ``(a, b) =
      self_state_rg_ref`` (PDownB's median, fitted: 2.69 n^0.344), times ``self_state_rg_weight`` (default 0: off).
      The clash term can be met by spreading a chain out; this term charges a chain only above the spread of
      most real chains of its length (docs/training.md, "Session 21");
    * ``loss``: their sum.
    """
    m = batch["mask"].float()
    n_res = m.sum(-1).clamp_min(1.0)
    src = "target" if "target_trans" in batch else "pred"
    ref_t, ref_r = batch[f"{src}_trans"].float(), batch[f"{src}_rot"].float()
    anchor = (((pred_trans.float() - ref_t) ** 2).sum(-1) * m).sum(-1) / n_res
    anchor = anchor + (((pred_rot.float() - ref_r) ** 2).sum((-1, -2)) * m).sum(-1) / n_res
    clash = ca_clash_loss(pred_trans, None, m, float(exp.get("clash_dist", 3.8)), int(exp.get("clash_min_sep", 3)))
    clash = clash * float(exp.get("self_state_clash_weight", 8.0))
    bond = ca_bond_loss(pred_trans, ref_t, m) * float(exp.get("self_state_bond_weight", 4.0))
    out = {"anchor": anchor, "clash": clash, "bond": bond}
    w_rg = float(exp.get("self_state_rg_weight") or 0.0)
    if w_rg > 0:
        a, b = (float(v) for v in exp.get("self_state_rg_ref", PDOWNB_RG_FIT))
        cap = (1.0 + float(exp.get("self_state_rg_margin", 0.1))) * a * n_res ** b
        out["rg"] = torch.relu(radius_of_gyration(pred_trans, m) - cap) ** 2 * w_rg
    return {"loss": sum(out.values()), **out}


def radius_of_gyration(ca: Tensor, mask: Tensor) -> Tensor:
    """CA radius of gyration per chain (Angstrom, like ``ca``), over the residues of ``mask``; shape (S,)."""
    m = mask.float()
    n = m.sum(-1).clamp_min(1.0)
    centre = (ca.float() * m[..., None]).sum(-2) / n[:, None]
    msd = (((ca.float() - centre[:, None]) ** 2).sum(-1) * m).sum(-1) / n
    return (msd + 1e-8).sqrt()
