"""Collecting a self-state pool: the states the reverse SDE of one network visits, with its predictions there.

It runs the sampler (``superdiff_protein.core``) on a :class:`~models.frame_models.FrameScoreModel`, so it lives
beside ``frame_models`` rather than inside the FrameDiff package (which ``frame_models`` imports). The pool format,
its loader and the loss on it are in :mod:`models.framediff.self_states`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from models.frame_models import FrameScoreModel
from models.framediff.self_states import POOL_KEYS

__all__ = ["RecordingPredictor", "collect_self_states"]


@dataclass
class _Records:
    t_max: float
    rows: list[dict[str, Tensor]] = field(default_factory=list)


class RecordingPredictor(nn.Module):
    """A FrameDiff adapter that records its inputs and predictions at ``t <= t_max`` (CPU, float32)."""

    def __init__(self, adapter: nn.Module, t_max: float):
        super().__init__()
        self.adapter = adapter
        self.records = _Records(float(t_max))

    @property
    def config(self) -> Any:
        return self.adapter.config

    def forward(self, rotmats: Tensor, trans: Tensor, t: Tensor, res_mask: Tensor, self_cond_state: Any = None,
                **kw: Any) -> Any:
        out = self.adapter(rotmats, trans, t, res_mask, self_cond_state, **kw)
        keep = t.float() <= self.records.t_max
        if bool(keep.any()):
            sc = self_cond_state if isinstance(self_cond_state, Tensor) else torch.zeros_like(trans)
            row = {"rot_t": rotmats, "trans_t": trans, "t": t, "mask": res_mask, "sc": sc,
                   "pred_rot": out.rotmats, "pred_trans": out.trans}
            self.records.rows.append({k: v[keep].detach().float().cpu() for k, v in row.items()})
        return out


def collect_self_states(adapter: nn.Module, lengths: Sequence[int], per_length: int, seed: int = 0,
                        num_steps: int = 40, time_grid: str = "cosine", min_t: float = 0.002, t_max: float = 0.5,
                        keep_per_trajectory: int | None = None, batch_size: int = 64,
                        device: str | torch.device = "cpu", progress: bool = False) -> dict[str, Tensor]:
    """Sample ``per_length`` chains of each length with ``adapter`` alone and return its recorded states.

    The sampler is ``generate_backbones``' (reverse SDE, ``noise_scale = 1``, float64 state), the final call at
    ``min_t`` included. ``keep_per_trajectory``: keep that many of each chain's recorded states, drawn at random
    (seeded), or all when None. Returns a pool: :data:`POOL_KEYS` padded to the longest length (``mask`` marks
    real residues) and ``lengths`` (S,).
    """
    from superdiff_protein.core.kappa import make_rule
    from superdiff_protein.core.sampler import SamplerConfig, superpose
    from superdiff_protein.frames.model_loading import space_for
    from superdiff_protein.frames.se3 import SE3Diffuser

    dev = torch.device(device)
    rec = RecordingPredictor(adapter.to(dev).eval(), t_max)
    model = FrameScoreModel(rec, SE3Diffuser(adapter.diffuser_cfg), name="reference", kind="framediff")
    space = space_for([model])
    rule = make_rule("single", index=0)
    scfg = SamplerConfig(num_steps=num_steps, min_t=min_t, time_grid=time_grid, dtype=torch.float64, device=dev)
    scfg.validate()
    gen = torch.Generator().manual_seed(int(seed) * 7_919 + 17)
    pools: list[dict[str, Tensor]] = []
    jobs = [(L, i) for L in lengths for i in range(per_length)]
    batches = [jobs[k:k + batch_size] for k in range(0, len(jobs), batch_size)]
    it = batches
    if progress:
        from tqdm import tqdm
        it = tqdm(batches, desc="self states", unit="batch")
    with torch.no_grad():
        for batch in it:
            Ls = [L for L, _ in batch]
            N = max(Ls)
            mask = torch.zeros(len(batch), N, dtype=torch.float64, device=dev)
            for b, L in enumerate(Ls):
                mask[b, :L] = 1
            seeds = [int(seed) * 1_000_003 + L * 1_009 + i for L, i in batch]
            rec.records.rows.clear()
            res = superpose(space, [model], rule, scfg, seeds, {"rot": (N,), "trans": (N, 3)}, mask=mask,
                            check_models=False)
            model.denoise_final(res.x, res.t[-2].expand(len(batch)), mask, extras=res.extras[0])
            rows = rec.records.rows
            per = {k: torch.stack([r[k] for r in rows], 1) for k in POOL_KEYS}   # (B, calls, ...)
            calls = per["t"].shape[1]
            pick = torch.arange(calls)
            for b, L in enumerate(Ls):
                if keep_per_trajectory is not None and keep_per_trajectory < calls:
                    pick = torch.randperm(calls, generator=gen)[:keep_per_trajectory].sort().values
                pools.append({**{k: v[b, pick] for k, v in per.items()},
                              "lengths": torch.full((len(pick),), L, dtype=torch.long)})
    return _pad_cat(pools)


def _pad_cat(pools: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate per-chain pools of different lengths, zero-padded along the residue axis."""
    n = max(int(p["mask"].shape[1]) for p in pools)
    out: dict[str, list[Tensor]] = {k: [] for k in (*POOL_KEYS, "lengths")}
    for p in pools:
        for k, v in p.items():
            if k not in ("t", "lengths") and v.shape[1] < n:
                pad = torch.zeros((v.shape[0], n - v.shape[1], *v.shape[2:]), dtype=v.dtype)
                if k in ("rot_t", "pred_rot"):
                    pad[..., :, :] = torch.eye(3)
                v = torch.cat([v, pad], 1)
            out[k].append(v)
    return {k: torch.cat(v, 0) for k, v in out.items()}
