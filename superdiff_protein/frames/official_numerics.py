"""The official FrameDiff / Proteus diffuser, bit for bit: its config section (:class:`SE3DiffuserConfig`),
tabulated sigma, the truncated IGSO(3) series and the scores from predicted clean frames.

These reproduce jasonkyuyim/se3_diffusion @ 53359d7 (``data/so3_diffuser.py``, ``data/r3_diffuser.py``,
``data/so3_utils.py``; Proteus's copy is numerically identical for these functions). They matter at
float32-rounding level:

* the rotation score uses the *tabulated* sigma ``discrete_sigma[digitize(sigma(t)) - 1]`` (not
  ``sigma(t)``), the IGSO(3) series with ``L = 1000`` terms, ``omega = |v| + 1e-6``, trig factors in
  the dtype of ``v`` (float32 for network predictions) and the series weights in float64; the
  derivative ``lo dhi - hi dlo`` cancels catastrophically at small sigma / large omega, where the
  official score is rounding noise;
* IGSO(3) sampling by inverse CDF on a 1000-point omega grid (``np.interp``: :func:`np_interp`);
* translations: the VP-SDE on coordinates scaled by ``coordinate_scaling`` (nm), scores in 1/nm.

Series terms whose float64 weight ``(2l+1) exp(-l(l+1) sigma^2/2)`` underflows to exactly 0 are
skipped (they contribute exactly 0); only the summation order then differs from numpy.

:class:`~superdiff_protein.frames.se3.SE3Diffuser` (which re-exports the config) builds its tables, forward
marginal and reverse step on these functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from .geometry import quat_multiply, quat_to_rotvec

__all__ = [
    "SE3DiffuserConfig",
    "DiffuserConfigError",
    "discrete_sigma",
    "tabulated_sigma",
    "igso3_expansion",
    "official_omega_score",
    "official_rot_score",
    "official_trans_score",
    "np_linspace",
    "np_interp",
    "sigma_of_t",
    "sigma_index",
    "igso3_series",
    "igso3_score_from_rotvec",
    "marginal_b",
]


class DiffuserConfigError(ValueError):
    """The ``diffuser`` section of a config is not supported (names the offending entry)."""


# ------------------------------------------------------------------------------------- config
@dataclass
class SE3DiffuserConfig:
    """The ``diffuser`` section of the official config (defaults: FrameDiff ``config/base.yaml``).

    ``center_rule``: ``"framediff"`` (reverse takes ``center``, default True) or ``"proteus"``
    (recentre only when every real residue is diffused).
    """

    min_sigma: float = 0.1
    max_sigma: float = 1.5
    num_sigma: int = 1000
    num_omega: int = 1000
    schedule: str = "logarithmic"
    use_cached_score: bool = False  # recorded only: the score is always computed on the fly (official 53359d7)
    min_b: float = 0.1
    max_b: float = 20.0
    coordinate_scaling: float = 0.1
    num_terms: int = 1000  # IGSO(3) series truncation L (official: 1000)
    diffuse_rot: bool = True
    diffuse_trans: bool = True
    center_rule: str = "framediff"

    def __post_init__(self) -> None:
        if self.schedule != "logarithmic":
            raise DiffuserConfigError(f"unsupported SO(3) sigma schedule {self.schedule!r} (official: logarithmic)")
        if self.center_rule not in ("framediff", "proteus"):
            raise DiffuserConfigError(f"center_rule must be 'framediff' or 'proteus', got {self.center_rule!r}")
        if not (self.coordinate_scaling > 0 and self.min_sigma > 0 and self.max_sigma > self.min_sigma):
            raise DiffuserConfigError(f"invalid diffuser config {self}")

    @classmethod
    def from_conf(cls, conf: Any, center_rule: str | None = None) -> "SE3DiffuserConfig":
        """From an official config: the full run config (with a ``diffuser`` section), the ``diffuser``
        section itself, an OmegaConf object or ``None`` (defaults). Missing entries keep the defaults;
        unresolved interpolations (``${...}``) are ignored."""
        d = _to_plain(conf)
        if "diffuser" in d:
            d = _to_plain(d["diffuser"])
        so3, r3 = _to_plain(d.get("so3")), _to_plain(d.get("r3"))
        kw: dict[str, Any] = {}
        names = {f.name: f for f in fields(cls)}
        for src, keys in ((so3, ("min_sigma", "max_sigma", "num_sigma", "num_omega", "schedule", "use_cached_score")),
                          (r3, ("min_b", "max_b", "coordinate_scaling")),
                          (d, ("diffuse_rot", "diffuse_trans"))):
            for k in keys:
                v = src.get(k)
                if v is None or (isinstance(v, str) and v.startswith("${")):
                    continue
                typ = type(names[k].default)
                kw[k] = typ(v) if typ is not bool else bool(v)
        if center_rule is not None:
            kw["center_rule"] = center_rule
        return cls(**kw)


def _to_plain(conf: Any) -> dict:
    """OmegaConf / mapping -> plain dict (the checkpoint module's conversion, with this module's error)."""
    from .checkpoints import CheckpointError, conf_to_container

    try:
        return conf_to_container(conf)
    except CheckpointError:
        raise DiffuserConfigError(f"expected a mapping / OmegaConf config, got {type(conf).__name__}") from None


# ------------------------------------------------------------------------------------- numerics
def np_linspace(start: float, stop: float, num: int, device: Any = None) -> Tensor:
    """``numpy.linspace`` bit for bit (float64): ``arange(num) * step + start``, last = ``stop``."""
    if num == 1:
        return torch.tensor([start], dtype=torch.float64, device=device)
    step = (stop - start) / (num - 1)
    y = torch.arange(num, dtype=torch.float64, device=device) * step + start
    y[-1] = stop
    return y


def sigma_of_t(t: Tensor, cfg: SE3DiffuserConfig) -> Tensor:
    """The logarithmic schedule ``log(t e^max_sigma + (1 - t) e^min_sigma)``."""
    return torch.log(t * math.exp(cfg.max_sigma) + (1 - t) * math.exp(cfg.min_sigma))


_GRIDS: dict = {}


def discrete_sigma(cfg: SE3DiffuserConfig, device: Any = None) -> Tensor:
    """The official sigma grid ``sigma(linspace(0, 1, num_sigma))`` (float64), computed on the CPU (as numpy does)
    once per schedule and device, then kept: building it on a GPU at every model call wrote its last entry from
    the host, a device sync per call. Treat it as read-only."""
    key = (cfg.num_sigma, float(cfg.min_sigma), float(cfg.max_sigma), str(torch.device(device or "cpu")))
    grid = _GRIDS.get(key)
    if grid is None:
        grid = sigma_of_t(np_linspace(0.0, 1.0, cfg.num_sigma), cfg)
        grid = _GRIDS[key] = grid.to(device) if device is not None else grid
    return grid


def sigma_index(t: Tensor, cfg: SE3DiffuserConfig, grid: Tensor | None = None) -> Tensor:
    """Row of the sigma table used at time t (``np.digitize(sigma(t), discrete_sigma) - 1``)."""
    grid = discrete_sigma(cfg, t.device) if grid is None else grid.to(t.device)
    idx = torch.bucketize(sigma_of_t(t.to(torch.float64), cfg), grid, right=True) - 1
    return idx.clamp(0, cfg.num_sigma - 1)


def tabulated_sigma(t: Tensor, cfg: SE3DiffuserConfig) -> Tensor:
    """``discrete_sigma[digitize(sigma(t), discrete_sigma) - 1]`` (float64), as the official lookup.

    ``t`` keeps its dtype's value (the official samplers pass float32 times) and is promoted to
    float64 like numpy does with the float64 schedule constants.
    """
    grid = discrete_sigma(cfg, t.device)
    return grid[sigma_index(t, cfg, grid)]


def _num_terms_needed(sigma_min: float, num_terms: int) -> int:
    """Terms beyond this have weight ``(2l+1) exp(-l(l+1) sigma^2/2) == 0.0`` exactly in float64."""
    if sigma_min <= 0:
        return num_terms
    return int(min(num_terms, math.ceil(math.sqrt(2 * 760.0) / sigma_min) + 2))


def _smallest_sigma(sigma: Tensor, sigma_floor: float | None) -> float:
    """The smallest sigma that sets the number of series terms: the batch's own (a device-to-host read), or a
    lower bound known on the host (``sigma_floor``), which adds only terms of weight exactly 0."""
    if sigma_floor is not None:
        return float(sigma_floor)
    return float(sigma.min()) if sigma.numel() else 1.0


def _series(omega: Tensor, sigma: Tensor, num_terms: int, deriv: bool,
            sigma_floor: float | None = None) -> tuple[Tensor, Tensor | None]:
    """(expansion, d expansion / d omega or None). omega (...,), sigma broadcast to omega.

    Official dtype flow: ``ls`` int64, weights in float64 (from the float64 sigma), trig factors in
    omega's dtype (float32 for network predictions), products promoted to float64.
    """
    L = _num_terms_needed(_smallest_sigma(sigma, sigma_floor), num_terms)
    ls = torch.arange(L, device=omega.device)
    om = omega[..., None]
    w = (2 * ls + 1) * torch.exp(-ls * (ls + 1) * sigma[..., None] ** 2 / 2)
    arg = om * (ls + 0.5)
    hi = torch.sin(arg)
    lo = torch.sin(om / 2)
    exp = (w * hi / lo).sum(-1)
    if not deriv:
        return exp, None
    dhi = (ls + 0.5) * torch.cos(arg)
    dlo = 0.5 * torch.cos(om / 2)
    return exp, (w * (lo * dhi - hi * dlo) / lo**2).sum(-1)


def igso3_series(omega: Tensor, sigma: Tensor, num_terms: int, deriv: bool,
                 max_elems: int = 1 << 23, sigma_floor: float | None = None) -> tuple[Tensor, Tensor | None]:
    """(series, d series / d omega or None), in chunks of at most ``max_elems`` terms (memory).

    The number of terms follows from the smallest sigma: ``sigma.min()`` (a device sync on a GPU), or
    ``sigma_floor``, a lower bound of every sigma known on the host (the extra terms have weight exactly 0, so the
    value changes by the summation order's rounding only)."""
    sigma = torch.broadcast_to(sigma, omega.shape)
    floor = _smallest_sigma(sigma, sigma_floor)
    L = _num_terms_needed(floor, num_terms)
    per = max(1, max_elems // L)
    if omega.numel() <= per:
        return _series(omega, sigma, num_terms, deriv, floor)
    flat_o, flat_s = omega.reshape(-1), sigma.reshape(-1)
    parts = [_series(flat_o[i:i + per], flat_s[i:i + per], num_terms, deriv, floor)
             for i in range(0, flat_o.numel(), per)]
    exp = torch.cat([p[0] for p in parts]).reshape(omega.shape)
    d = torch.cat([p[1] for p in parts]).reshape(omega.shape) if deriv else None
    return exp, d


def igso3_expansion(omega: Tensor, sigma: Tensor, num_terms: int = 1000) -> Tensor:
    """Truncated IGSO(3) series ``sum_l (2l+1) e^{-l(l+1) s^2/2} sin((l+1/2) w) / sin(w/2)``.

    ``sigma`` broadcasts against ``omega``; dtype flow as official (trig in omega's dtype).
    """
    return igso3_series(omega, sigma, num_terms, False)[0]


def official_omega_score(omega: Tensor, sigma: Tensor, expansion: Tensor, num_terms: int = 1000) -> Tensor:
    """The official ``so3_utils.score``: d/domega of the truncated series divided by ``expansion + 1e-4``.

    The regularised, truncated-series version of d log f / d omega, with the official numerics (at small
    sigma and large omega it is rounding noise). The exact closed form is
    :func:`superdiff_protein.core.igso3.igso3_dlog_domega`."""
    return igso3_series(omega, sigma, num_terms, True)[1] / (expansion + 1e-4)


def igso3_score_from_rotvec(vec: Tensor, sigma: Tensor, num_terms: int, eps: float = 1e-6,
                            sigma_floor: float | None = None) -> Tensor:
    """Official ``SO3Diffuser.torch_score`` body with a given (tabulated) sigma broadcastable to |vec|
    (``sigma_floor``: see :func:`igso3_series`)."""
    omega = torch.linalg.norm(vec, dim=-1) + eps
    exp, d = igso3_series(omega, sigma, num_terms, True, sigma_floor=sigma_floor)
    s = d / (exp + 1e-4)
    return s[..., None] * vec / (omega[..., None] + eps)


def _quat_invert(q: Tensor) -> Tensor:
    conj = torch.cat([q[..., :1], -q[..., 1:]], -1)
    return conj / (q * q).sum(-1, keepdim=True)


def official_rot_score(quats_t: Tensor, quats_pred: Tensor, t: Tensor, cfg: SE3DiffuserConfig,
                       res_mask: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Rotation score (B, N, 3) as ``SE3Diffuser.calc_rot_score(rots_t, rots_pred, t)``.

    ``quats_*`` (B, N, 4) w-first (float32 in the official code), ``t`` (B,). Returns float64 body-frame
    rotation vectors (1/rad) of the IGSO(3) score of ``q_pred^-1 q_t``; masked by ``res_mask`` if given.
    """
    q0t = quat_multiply(_quat_invert(quats_pred), quats_t)
    vec = quat_to_rotvec(q0t)
    sigma = tabulated_sigma(t, cfg)[:, None]  # (B, 1) float64
    # on a GPU the term count comes from the grid's smallest sigma (host-known): no device sync per model call.
    # On a CPU reading sigma.min() costs nothing, and the CPU results stay bit for bit those of the official order
    floor = float(sigma_of_t(torch.zeros((), dtype=torch.float64), cfg)) if vec.is_cuda else None
    score = igso3_score_from_rotvec(vec, sigma, cfg.num_terms, eps, sigma_floor=floor)
    if res_mask is not None:
        score = score * res_mask[..., None].to(score.dtype)
    return score


def marginal_b(t: Tensor, cfg: SE3DiffuserConfig) -> Tensor:
    """``B(t) = int_0^t beta``, beta linear from ``min_b`` to ``max_b``."""
    return t * cfg.min_b + 0.5 * t**2 * (cfg.max_b - cfg.min_b)


def official_trans_score(trans_t: Tensor, trans_pred: Tensor, t: Tensor, cfg: SE3DiffuserConfig,
                         res_mask: Tensor | None = None) -> Tensor:
    """Translation score (B, N, 3) in 1/nm as ``calc_trans_score(x_t, x_0, t[:, None, None], use_torch=True)``
    (``scale=True``): inputs in Angstrom, computed in the inputs' dtype (float32 in the official code)."""
    tt = t[:, None, None]
    b = marginal_b(tt, cfg)
    x_t = trans_t * cfg.coordinate_scaling
    x_0 = trans_pred * cfg.coordinate_scaling
    score = -(x_t - torch.exp(-0.5 * b) * x_0) / (1 - torch.exp(-b))
    if res_mask is not None:
        score = score * res_mask[..., None].to(score.dtype)
    return score


def np_interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Row-wise ``numpy.interp``: x (B, N), xp (B, K) increasing, fp (K,)."""
    K = xp.shape[-1]
    i = torch.searchsorted(xp.contiguous(), x.contiguous(), right=True) - 1
    ic = i.clamp(0, K - 2)
    x0, x1 = torch.gather(xp, -1, ic), torch.gather(xp, -1, ic + 1)
    f0, f1 = fp[ic], fp[ic + 1]
    den = x1 - x0
    slope = torch.where(den != 0, (f1 - f0) / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(den))
    y = slope * (x - x0) + f0
    y = torch.where(i < 0, fp[0].expand_as(y), y)
    y = torch.where(x >= xp[..., -1:], fp[-1].expand_as(y), y)
    return y
