"""Sequential Monte Carlo over the sampler's particles: groups, effective sample size and resampling.

Particles come in groups of ``group_size`` consecutive samples of the batch (the same length within a
group: resampling never mixes particles whose state spaces differ, since ``div f`` on translations
depends on the residue count). Each group resamples on its own, with its own random stream seeded from
the group's first seed, so a run is deterministic for the same seeds and group size, whatever batch
the group ran in. Resampling copies positions, tracked log-densities and the models' carried state; every
particle keeps its own noise stream (so trajectories stay batch-independent).

After a group resamples, its weights reset to 0 and the running estimate of the log normalising
constant gains ``log mean w`` of the group (the standard SMC estimate ``log Z = sum_k log mean w_k``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["SMCConfig", "SMCTracker", "ess", "resample_indices", "systematic_indices", "select_batch", "RESAMPLING_SCHEMES"]

RESAMPLING_SCHEMES = ("systematic", "multinomial", "none")


@dataclass
class SMCConfig:
    """Options of the particle system (``generate_backbones`` ``smc.*``)."""

    group_size: int = 1               # K particles per group (1: weights only, nothing to resample among)
    resample: str = "systematic"      # "systematic" | "multinomial" | "none" (weights only)
    ess_threshold: float = 0.5        # resample a group when ESS < threshold * K (1.0: every step)
    t_max: float = 1.0                # resampling only while t_min <= t <= t_max (the active window)
    t_min: float = 0.0

    def validate(self) -> None:
        if int(self.group_size) < 1:
            raise ValueError(f"smc.group_size must be >= 1, got {self.group_size}")
        if self.resample not in RESAMPLING_SCHEMES:
            raise ValueError(f"smc.resample must be one of {', '.join(RESAMPLING_SCHEMES)}, got {self.resample!r}")
        if not (0.0 <= float(self.ess_threshold) <= 1.0):
            raise ValueError(f"smc.ess_threshold must lie in [0, 1], got {self.ess_threshold}")
        if not (0.0 <= float(self.t_min) <= float(self.t_max) <= 1.0):
            raise ValueError(f"smc window must satisfy 0 <= t_min <= t_max <= 1, got t_min={self.t_min}, "
                             f"t_max={self.t_max}")


def ess(logw: Tensor) -> Tensor:
    """Effective sample size ``(sum w)^2 / sum w^2`` along the last axis (from log-weights)."""
    return torch.exp(2 * torch.logsumexp(logw, -1) - torch.logsumexp(2 * logw, -1))


def systematic_indices(logw: Tensor, u: Tensor) -> Tensor:
    """Systematic resampling of groups: log-weights (..., K) and one uniform per group (...,) -> ancestor
    indices (..., K) in [0, K), on the weights' device."""
    k = logw.shape[-1]
    cdf = torch.cumsum(torch.softmax(logw.to(torch.float64), -1), -1)
    cdf[..., -1] = 1.0
    pos = (u.to(cdf)[..., None] + torch.arange(k, dtype=torch.float64, device=cdf.device)) / k
    return torch.searchsorted(cdf, pos.contiguous()).clamp_(max=k - 1)


def resample_indices(logw: Tensor, scheme: str, generator: torch.Generator) -> Tensor:
    """K ancestor indices in [0, K) for one group's log-weights (K,), drawn on the CPU."""
    w = torch.softmax(logw.detach().to("cpu", torch.float64), 0)
    k = w.numel()
    if scheme == "multinomial":
        return torch.multinomial(w, k, replacement=True, generator=generator)
    if scheme == "systematic":
        return systematic_indices(logw.detach().to("cpu", torch.float64),
                                  torch.rand((), generator=generator, dtype=torch.float64))
    raise ValueError(f"unknown resampling scheme {scheme!r}")


def select_batch(obj: Any, idx: Tensor, batch: int) -> Any:
    """Re-index every tensor with leading dimension ``batch`` inside ``obj`` (tensors, dicts, lists,
    tuples, dataclasses); anything else is shared unchanged."""
    if isinstance(obj, Tensor):
        return obj[idx.to(obj.device)] if obj.dim() > 0 and obj.shape[0] == batch else obj
    if isinstance(obj, dict):
        return {k: select_batch(v, idx, batch) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [select_batch(v, idx, batch) for v in obj]
        if isinstance(obj, list):
            return out
        return type(obj)(*out) if hasattr(obj, "_fields") else tuple(out)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: select_batch(getattr(obj, f.name), idx, batch)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _group_seed(first_seed: int) -> int:
    # a stream distinct from the particles' own (which are seeded with the sample seeds themselves)
    return (int(first_seed) * 0x9E3779B1 + 0x5DEECE66D) % (2**63 - 1)


class SMCTracker:
    """The per-group bookkeeping of one batch: weights, ESS trace, ancestors, log Z, resampling."""

    def __init__(self, config: SMCConfig, seeds: Sequence[int], mask: Tensor | None = None,
                 num_steps: int = 0, device: str | torch.device = "cpu"):
        config.validate()
        self.config = config
        B, K = len(seeds), int(config.group_size)
        if B % K:
            raise ValueError(f"smc.group_size={K} does not divide the batch of {B} samples: batches must hold "
                             "whole groups (make samples_per_length and batch_size multiples of the group size)")
        if mask is not None and K > 1:
            n = mask.to(torch.long).sum(-1).reshape(B // K, K)
            if bool((n != n[:, :1]).any()):
                raise ValueError("smc: particles of one group must have the same length (resampling never mixes "
                                 "residue counts); order the batch by length in whole groups")
        self.B, self.K, self.G = B, K, B // K
        self.generators = [torch.Generator().manual_seed(_group_seed(seeds[g * K])) for g in range(self.G)]
        dev = torch.device(device)
        self.ancestor = torch.arange(B, device=dev)     # each particle's root ancestor (batch index at t = 1)
        self.log_z = torch.zeros(self.G, dtype=torch.float64, device=dev)
        # systematic resampling: one uniform per group and step, drawn up front from the group's stream (a
        # host-to-device copy inside the loop would sync); multinomial draws from the streams when it resamples
        self.uniforms = None
        if config.resample == "systematic" and K > 1 and num_steps > 0:
            self.uniforms = torch.stack([torch.rand(num_steps, generator=g, dtype=torch.float64)
                                         for g in self.generators], 1).to(dev)              # (S, G)
        self.ess_trace: list[Tensor] = []               # per step: (G,) ESS / K before any resampling
        self.resampled: list[Tensor] = []               # per step: (G,) bool

    def group_of(self) -> Tensor:
        return torch.arange(self.B) // self.K

    def after_step(self, state, t_next: float, step: int = 0) -> Any:
        """Record the ESS after a step; resample the groups whose ESS fell below the threshold inside the
        window. Returns the (possibly re-indexed) state.

        Systematic resampling runs on the state's device without a host sync: each group's uniform is drawn
        from its CPU stream at every step inside the window (whether or not the group resamples, so the
        draws do not depend on the weights; all of them are drawn when the tracker is made), the ESS test and
        the index search run on the device, and every particle is gathered (groups that keep their particles
        gather themselves). Multinomial resampling reads the weights on the host (one sync per step).
        ``step``: the index of the step just taken (selects its uniforms)."""
        cfg, K, G = self.config, self.K, self.G
        lw_dev = state.logw.detach().reshape(G, K)
        e_dev = ess(lw_dev) / K
        self.ess_trace.append(e_dev)
        if cfg.resample == "none" or K == 1 or not (cfg.t_min <= t_next <= cfg.t_max):
            self.resampled.append(torch.zeros(G, dtype=torch.bool, device=e_dev.device))
            return state
        dev = lw_dev.device
        ar = torch.arange(K, device=dev)
        if cfg.resample == "systematic":
            if self.uniforms is not None:
                u = self.uniforms[step].to(dev)
            else:
                u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators]).to(dev)
            a = systematic_indices(lw_dev, u)
        else:
            lw_host = lw_dev.to("cpu", torch.float64)
            a = torch.stack([resample_indices(lw_host[g], cfg.resample, self.generators[g]) for g in range(G)]).to(dev)
        do = e_dev < cfg.ess_threshold - 1e-12 if cfg.ess_threshold < 1.0 else torch.ones(G, dtype=torch.bool, device=dev)
        self.resampled.append(do)
        a = torch.where(do[:, None], a, ar)
        idx = (torch.arange(G, device=dev)[:, None] * K + a).reshape(-1)
        self.log_z = self.log_z.to(dev) + torch.where(do, torch.logsumexp(lw_dev.to(torch.float64), -1) - math.log(K),
                                                      torch.zeros((), dtype=torch.float64, device=dev))
        self.ancestor = self.ancestor.to(dev)[idx]
        state = state.select(idx)
        state.logw = torch.where(do[:, None].expand(G, K).reshape(-1), torch.zeros_like(state.logw), state.logw)
        return state

    def traces(self) -> tuple[Tensor, Tensor]:
        """(S, G) ESS / K before resampling (float64, CPU) and (S, G) whether each group resampled."""
        if not self.ess_trace:
            return torch.zeros(0, self.G, dtype=torch.float64), torch.zeros(0, self.G, dtype=torch.bool)
        return (torch.stack([e.to("cpu", torch.float64) for e in self.ess_trace]),
                torch.stack([d.to("cpu") for d in self.resampled]))

    def ancestors(self) -> Tensor:
        """(B,) each particle's root ancestor (batch index at t = 1), on the CPU."""
        return self.ancestor.to("cpu")

    def final_log_z(self, logw: Tensor) -> Tensor:
        """(G,) the estimate of log(Z_end / Z_start) per group, including the weights still carried."""
        lw = logw.detach().to("cpu", torch.float64).reshape(self.G, self.K)
        return self.log_z.to("cpu") + torch.logsumexp(lw, -1) - math.log(self.K)
