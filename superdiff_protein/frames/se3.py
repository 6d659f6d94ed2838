"""The SE(3) diffuser of FrameDiff and Proteus, built on the core spaces.

:class:`SE3Diffuser` is THE diffuser of the package: the superposition sampler uses its
:attr:`SE3Diffuser.space` (a :class:`~superdiff_protein.core.spaces.ProductSpace` with components
``rot`` = IGSO(3) Brownian motion on SO(3)^N and ``trans`` = VP-SDE on R^{N x 3} in *scaled* units,
nm = 0.1 x Angstrom), the frame-model adapters use it to turn predicted clean frames into scores, and
the training code uses :meth:`SE3Diffuser.forward_marginal`. It is numerically equal to the official
diffusers (jasonkyuyim/se3_diffusion @ 53359d7 ``data/se3_diffuser.py``; Proteus's copy differs only
in the centring rule), see ``docs/frame_model_protocol.md`` and ``tests/test_se3_diffuser.py``.

Conventions (same as :mod:`superdiff_protein.frames.geometry` and the core):

* rotation tangents / scores are *body-frame* rotation vectors: a step is ``R @ exp(delta)``. The
  official IGSO(3) score ``score(|v|) v/|v|`` with ``v = log(R_0^T R_t)`` is already in this frame
  (the official reverse step also multiplies on the right), so no conversion is needed;
* translations are Angstrom at the API (``trans_*`` arguments) and nm (x ``coordinate_scaling``)
  inside the space; translation scores are in 1/nm (scaled coordinates), as official.

The official numerics (tabulated sigma, the truncated IGSO(3) series, scores from predicted frames,
inverse-CDF sampling) live in :mod:`superdiff_protein.frames.official_numerics`; this module builds the
diffuser on them: tables and score scaling, the forward marginal, the reference draw, the reverse step
``x - [(f - g^2 s) dt + g sqrt(dt) eta z]`` (then optional recentring, then the diffuse-mask blend).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from .geometry import rotmat_to_quat, so3_exp
# the config is defined with the official numerics it parameterises; the diffuser's API re-exports it
from .official_numerics import (DiffuserConfigError, SE3DiffuserConfig, discrete_sigma, igso3_score_from_rotvec,
                                igso3_series, marginal_b, np_interp, np_linspace, official_rot_score,
                                official_trans_score, sigma_index, sigma_of_t)
from ..core.spaces import EuclideanVPSpace, LinearVPSchedule, LogLinearSigmaSchedule, ProductSpace, SO3Space

__all__ = [
    "SE3DiffuserConfig",
    "SE3Diffuser",
    "ForwardMarginal",
    "ScaledEuclideanVPSpace",
    "DiffuserConfigError",
]


# ------------------------------------------------------------------------------------- spaces
class ScaledEuclideanVPSpace(EuclideanVPSpace):
    """Site-structured VP space for translations in scaled units (``x_nm = coordinate_scaling * x_A``).

    The scaling is part of the forward process (the same SDE in different units is a different SDE
    for a score network), so it is part of :meth:`signature`.
    """

    def __init__(self, schedule: LinearVPSchedule, coordinate_scaling: float, center: bool = True, name: str = "trans"):
        super().__init__(schedule, event_ndim=2, site_ndim=1, center=center, name=name)
        self.coordinate_scaling = float(coordinate_scaling)

    def signature(self) -> dict:
        sig = super().signature()
        sig["coordinate_scaling"] = self.coordinate_scaling
        return sig


# ------------------------------------------------------------------------------------- diffuser
@dataclass
class ForwardMarginal:
    """Output of :meth:`SE3Diffuser.forward_marginal` (translations in Angstrom, scores in 1/rad, 1/nm)."""

    rotmats_t: Tensor            # (B, N, 3, 3)
    trans_t: Tensor              # (B, N, 3) Angstrom
    rot_score: Tensor            # (B, N, 3) body-frame, 1/rad
    trans_score: Tensor          # (B, N, 3) 1/nm (scaled coordinates)
    rot_score_scaling: Tensor    # (B,)
    trans_score_scaling: Tensor  # (B,)
    rotvec_noise: Tensor         # (B, N, 3) the IGSO(3) draw: rotmats_t = rotmats_0 @ exp(rotvec_noise)


class SE3Diffuser:
    """FrameDiff / Proteus SE(3) diffuser (see module docstring).

    Construct with :meth:`framediff_default`, :meth:`proteus_default` or :meth:`from_conf`.
    Tables (IGSO(3) pdf/cdf/score norms per tabulated sigma) are computed lazily, row by row, and
    cached on the instance (CPU, float64).
    """

    def __init__(self, cfg: SE3DiffuserConfig | None = None):
        self.cfg = cfg or SE3DiffuserConfig()
        c = self.cfg
        self.space = ProductSpace({
            "rot": SO3Space(LogLinearSigmaSchedule(c.min_sigma, c.max_sigma)),
            "trans": ScaledEuclideanVPSpace(LinearVPSchedule(c.min_b, c.max_b), c.coordinate_scaling, center=True),
        })
        self.discrete_sigma = discrete_sigma(c)
        self.discrete_omega = np_linspace(0.0, math.pi, c.num_omega + 1)[1:]
        self._pdf = torch.full((c.num_sigma, c.num_omega), float("nan"), dtype=torch.float64)
        self._cdf = torch.full_like(self._pdf, float("nan"))
        self._score_norms = torch.full_like(self._pdf, float("nan"))
        self._scaling = torch.full((c.num_sigma,), float("nan"), dtype=torch.float64)
        self._done = torch.zeros(c.num_sigma, dtype=torch.bool)
        self._device_copies: dict[str, dict[str, Tensor]] = {}

    # -- construction
    @classmethod
    def framediff_default(cls) -> "SE3Diffuser":
        """The paper diffuser of FrameDiff (``config/base.yaml``)."""
        return cls(SE3DiffuserConfig())

    @classmethod
    def proteus_default(cls) -> "SE3Diffuser":
        """Proteus's diffuser: same numbers, Proteus's centring rule."""
        return cls(SE3DiffuserConfig(center_rule="proteus"))

    @classmethod
    def from_conf(cls, conf: Any, center_rule: str | None = None) -> "SE3Diffuser":
        """From an official config (full run config, its ``diffuser`` section, OmegaConf or dict)."""
        return cls(SE3DiffuserConfig.from_conf(conf, center_rule))

    @property
    def coordinate_scaling(self) -> float:
        return self.cfg.coordinate_scaling

    def signature(self) -> dict:
        """The forward-process signature (equal for every model trained with this SDE)."""
        return self.space.signature()

    # -- schedules
    def sigma(self, t: Tensor) -> Tensor:
        """Continuous ``sigma(t)`` of the logarithmic schedule (float64)."""
        return sigma_of_t(torch.as_tensor(t).to(torch.float64), self.cfg)

    def t_to_idx(self, t: Tensor) -> Tensor:
        """Row of the sigma table used at time t (``np.digitize(sigma(t), discrete_sigma) - 1``)."""
        t = torch.as_tensor(t)
        return sigma_index(t, self.cfg, self.discrete_sigma).cpu()

    def tabulated_sigma(self, t: Tensor) -> Tensor:
        """The sigma the official score actually uses (float64)."""
        t = torch.as_tensor(t)
        grid = self.discrete_sigma if t.device.type == "cpu" else self._on_device(t.device)["sigma"]
        return grid[sigma_index(t, self.cfg, grid)]

    def _on_device(self, device: torch.device) -> dict[str, Tensor]:
        """All IGSO(3) table rows, filled once and copied to ``device`` (cached per device).

        Off the CPU the lazy per-row fill would read the row indices back to the host, and gathering host rows
        copies them up at every call: both stall the device queue (a training step did both, twice). The
        full tables cost 3 x 8 MB per device; the values are the same CPU-computed rows either way.
        """
        key = str(device)
        if key not in self._device_copies:
            self._ensure_rows(torch.arange(self.cfg.num_sigma))
            self._device_copies[key] = {
                "sigma": self.discrete_sigma.to(device), "omega": self.discrete_omega.to(device),
                "cdf": self._cdf.to(device), "scaling": self._scaling.to(device)}
        return self._device_copies[key]

    def _rows_at(self, t: Tensor, table: str) -> Tensor:
        """Rows of the IGSO(3) ``table`` ("cdf" or "scaling") used at times ``t``, on ``t``'s device: the lazily
        filled host tables on the CPU, the full device copies elsewhere (no host read)."""
        if t.device.type != "cpu":
            d = self._on_device(t.device)
            return d[table][sigma_index(t, self.cfg, d["sigma"])]
        idx = self.t_to_idx(t)
        self._ensure_rows(idx)
        return {"cdf": self._cdf, "scaling": self._scaling}[table][idx]

    def rot_diffusion_coef(self, t: Tensor) -> Tensor:
        """SO(3) ``g(t) = sqrt(2 (e^max - e^min) sigma(t) / e^sigma(t))`` (float64)."""
        c, s = self.cfg, self.sigma(t)
        return torch.sqrt(2 * (math.exp(c.max_sigma) - math.exp(c.min_sigma)) * s / torch.exp(s))

    def trans_b_t(self, t: Tensor) -> Tensor:
        return self.cfg.min_b + torch.as_tensor(t).to(torch.float64) * (self.cfg.max_b - self.cfg.min_b)

    def trans_diffusion_coef(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.trans_b_t(t))

    def marginal_b_t(self, t: Tensor) -> Tensor:
        return marginal_b(torch.as_tensor(t).to(torch.float64), self.cfg)

    def trans_conditional_var(self, t: Tensor) -> Tensor:
        return 1 - torch.exp(-self.marginal_b_t(t))

    # -- tables
    def _ensure_rows(self, idx: Tensor) -> None:
        need = torch.unique(idx.flatten().cpu())
        need = need[~self._done[need]]
        if need.numel() == 0:
            return
        c, om = self.cfg, self.discrete_omega
        for chunk in need.split(16):
            sig = self.discrete_sigma[chunk][:, None].expand(-1, om.numel())
            o = om[None].expand_as(sig)
            exp, d = igso3_series(o, sig, c.num_terms, True)
            pdf = exp * (1 - torch.cos(om)) / math.pi
            cdf = torch.cumsum(pdf, -1) / c.num_omega * math.pi
            sn = d / (exp + 1e-4)
            self._pdf[chunk], self._cdf[chunk], self._score_norms[chunk] = pdf, cdf, sn
            self._scaling[chunk] = torch.sqrt(torch.abs((sn**2 * pdf).sum(-1) / pdf.sum(-1))) / math.sqrt(3)
            self._done[chunk] = True

    def igso3_tables(self, idx: Tensor | None = None) -> dict[str, Tensor]:
        """``pdf``, ``cdf``, ``score_norms`` rows (and ``score_scaling``) for sigma rows ``idx`` (default all)."""
        idx = torch.arange(self.cfg.num_sigma) if idx is None else torch.as_tensor(idx).long()
        self._ensure_rows(idx)
        return {"pdf": self._pdf[idx], "cdf": self._cdf[idx], "score_norms": self._score_norms[idx],
                "score_scaling": self._scaling[idx]}

    def rot_score_scaling(self, t: Tensor) -> Tensor:
        """SO(3) score scaling ``_score_scaling[t_to_idx(t)]`` (float64, shape of t)."""
        return self._rows_at(torch.as_tensor(t), "scaling")

    def trans_score_scaling(self, t: Tensor) -> Tensor:
        """R^3 score scaling ``1 / sqrt(1 - exp(-B(t)))`` (float64)."""
        return 1 / torch.sqrt(self.trans_conditional_var(t))

    def score_scaling(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(rot_score_scaling, trans_score_scaling)`` as the official ``SE3Diffuser.score_scaling``."""
        return self.rot_score_scaling(t), self.trans_score_scaling(t)

    # -- scores
    def rot_score_from_rotvec(self, vec: Tensor, t: Tensor) -> Tensor:
        """Official ``SO3Diffuser.torch_score(vec, t)``: vec (B, ..., 3), t (B,) (or scalar)."""
        t = torch.as_tensor(t, device=vec.device)
        sigma = self.tabulated_sigma(t.reshape(-1))
        sigma = sigma.reshape(()) if t.ndim == 0 else sigma.reshape(sigma.shape + (1,) * (vec.dim() - 2))
        return igso3_score_from_rotvec(vec, sigma, self.cfg.num_terms)

    def trans_score(self, x_t_nm: Tensor, x_0_nm: Tensor, t: Tensor) -> Tensor:
        """VP score ``-(x_t - e^{-B/2} x_0) / (1 - e^{-B})`` in scaled units, t (B,)."""
        tt = torch.as_tensor(t, device=x_t_nm.device)
        tt = tt.reshape(tt.shape + (1,) * (x_t_nm.dim() - tt.dim()))
        b = marginal_b(tt, self.cfg)
        return -(x_t_nm - torch.exp(-0.5 * b) * x_0_nm) / (1 - torch.exp(-b))

    def scores_from_prediction(self, rotmats_t: Tensor, trans_t: Tensor, pred_rotmats: Tensor, pred_trans: Tensor,
                               t: Tensor, res_mask: Tensor | None = None, *, quats_t: Tensor | None = None,
                               pred_quats: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Scores from predicted clean frames, the official way (``calc_rot_score`` / ``calc_trans_score``).

        Translations in Angstrom. Quaternions are derived from the rotation matrices unless given
        (networks that carry quaternions should pass them: the official code uses those).
        Returns ``(rot_score (B,N,3) float64, body frame, 1/rad; trans_score (B,N,3) 1/nm)``; padded
        residues get 0. Pass ``t`` as float32 to reproduce the official samplers bit for bit.
        """
        if quats_t is None:
            quats_t = rotmat_to_quat(rotmats_t)
        if pred_quats is None:
            pred_quats = rotmat_to_quat(pred_rotmats)
        t = torch.as_tensor(t, device=trans_t.device)
        if t.ndim == 0:
            t = t.expand(trans_t.shape[0])
        rot = official_rot_score(quats_t, pred_quats, t, self.cfg, res_mask)
        tr = official_trans_score(trans_t, pred_trans, t.to(trans_t.dtype) if not t.is_floating_point() else t,
                                  self.cfg, res_mask)
        if not self.cfg.diffuse_rot:
            rot = torch.zeros_like(rot)
        if not self.cfg.diffuse_trans:
            tr = torch.zeros_like(tr)
        return rot, tr

    # -- sampling
    def _per_sample_t(self, t: Any, batch: int, device: Any) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        # checked on the CPU only: off it the check would stall the device queue (training draws t itself)
        if t.device.type == "cpu" and bool(((t < 0) | (t > 1)).any()):
            raise ValueError(f"t must lie in [0, 1], got {t.tolist()}")
        return t

    def sample_igso3(self, t: Tensor, shape: tuple[int, int], generator: torch.Generator | None = None,
                     noise: Mapping[str, Tensor] | None = None) -> Tensor:
        """IGSO(3)(sigma_tab(t)) rotation vectors (B, N, 3), float64, by the official inverse-CDF method.

        ``noise`` may give the official draws: ``axis`` (B, N, 3) standard normal (drawn first) and
        ``angle_uniform`` (B, N) in [0, 1).
        """
        B, N = shape
        dev = t.device
        if noise is not None:
            axis = torch.as_tensor(noise["axis"], dtype=torch.float64, device=dev).reshape(B, N, 3)
            u = torch.as_tensor(noise["angle_uniform"], dtype=torch.float64, device=dev).reshape(B, N)
        else:
            gdev = generator.device if generator is not None else dev
            axis = torch.randn((B, N, 3), generator=generator, dtype=torch.float64, device=gdev).to(dev)
            u = torch.rand((B, N), generator=generator, dtype=torch.float64, device=gdev).to(dev)
        axis = axis / torch.linalg.norm(axis, dim=-1, keepdim=True)
        omega = self.discrete_omega if dev.type == "cpu" else self._on_device(dev)["omega"]
        angle = np_interp(u, self._rows_at(t, "cdf"), omega)
        return axis * angle[..., None]

    def forward_marginal(self, rotmats_0: Tensor, trans_0: Tensor, t: Tensor, res_mask: Tensor | None = None,
                         generator: torch.Generator | None = None, *, diffuse_mask: Tensor | None = None,
                         noise: Mapping[str, Tensor] | None = None) -> ForwardMarginal:
        """Sample ``p_t(. | x_0)`` per residue, as the official ``SE3Diffuser.forward_marginal`` (batched).

        Args:
            rotmats_0: (B, N, 3, 3) clean rotations; trans_0: (B, N, 3) clean CA positions, Angstrom.
            t: (B,) times in [0, 1] (or a scalar).
            res_mask: (B, N) 1 = real residue; padded residues keep their clean frames and get zero scores.
            generator: torch RNG (draw order as official: axis normals, angle uniforms, translation normals).
            diffuse_mask: (B, N) motif residues (0) are not noised either (official ``diffuse_mask``).
            noise: injected draws ``axis``, ``angle_uniform``, ``trans`` (standard normal, (B, N, 3)).

        Returns a :class:`ForwardMarginal`; frames in the dtype of the inputs, scores and scalings float64.
        """
        B, N = trans_0.shape[:2]
        dev, dtype = trans_0.device, trans_0.dtype
        t64 = self._per_sample_t(t, B, dev)
        cs = self.cfg.coordinate_scaling
        m = torch.ones(B, N, dtype=torch.float64, device=dev)
        if res_mask is not None:
            m = m * res_mask.to(device=dev, dtype=torch.float64)
        if diffuse_mask is not None:
            m = m * diffuse_mask.to(device=dev, dtype=torch.float64)
        keep = m[..., None] > 0

        rotvec = self.sample_igso3(t64, (B, N), generator, noise)
        if self.cfg.diffuse_rot:
            rot_score = self.rot_score_from_rotvec(rotvec, t64)
            rot_t = rotmats_0.to(torch.float64) @ so3_exp(rotvec)
        else:
            rot_score, rot_t = torch.zeros_like(rotvec), rotmats_0.to(torch.float64)
        if noise is not None:
            z = torch.as_tensor(noise["trans"], dtype=torch.float64, device=dev).reshape(B, N, 3)
        else:
            gdev = generator.device if generator is not None else dev
            z = torch.randn((B, N, 3), generator=generator, dtype=torch.float64, device=gdev).to(dev)
        x0 = (trans_0 * cs).to(torch.float64)  # official: scaled in the input dtype, then float64 maths
        mb = self.marginal_b_t(t64)[:, None, None]
        if self.cfg.diffuse_trans:
            x_t = torch.exp(-0.5 * mb) * x0 + torch.sqrt(1 - torch.exp(-mb)) * z
            trans_score = -(x_t - torch.exp(-0.5 * mb) * x0) / (1 - torch.exp(-mb))
            trans_t = x_t / cs
        else:
            trans_score, trans_t = torch.zeros_like(x0), trans_0.to(torch.float64)

        rot_t = torch.where(keep[..., None], rot_t, rotmats_0.to(torch.float64))
        trans_t = torch.where(keep, trans_t, trans_0.to(torch.float64))
        rot_score = rot_score * m[..., None]
        trans_score = trans_score * m[..., None]
        ones = torch.ones_like(t64)
        rss = self.rot_score_scaling(t64) if self.cfg.diffuse_rot else ones
        tss = self.trans_score_scaling(t64) if self.cfg.diffuse_trans else ones
        return ForwardMarginal(rot_t.to(rotmats_0.dtype), trans_t.to(dtype), rot_score, trans_score, rss, tss,
                               rotvec * m[..., None])

    def sample_ref(self, batch: int, num_res: int, res_mask: Tensor | None = None,
                   generator: torch.Generator | None = None, *, noise: Mapping[str, Tensor] | None = None,
                   dtype: torch.dtype = torch.float64, device: Any = "cpu") -> tuple[Tensor, Tensor]:
        """Official reference draw: rotations IGSO(3) at t = 1 (inverse CDF), translations N(0, 1) nm.

        Returns ``(rotmats (B,N,3,3), trans (B,N,3) Angstrom)``, not centred (as official). Padded
        residues: identity and 0. ``noise``: ``axis``, ``angle_uniform``, ``trans`` as in forward_marginal.
        """
        t = torch.ones(batch, dtype=torch.float64, device=device)
        rotvec = self.sample_igso3(t, (batch, num_res), generator, noise)
        if noise is not None:
            z = torch.as_tensor(noise["trans"], dtype=torch.float64, device=device).reshape(batch, num_res, 3)
        else:
            gdev = generator.device if generator is not None else device
            z = torch.randn((batch, num_res, 3), generator=generator, dtype=torch.float64, device=gdev).to(device)
        rot, trans = so3_exp(rotvec), z / self.cfg.coordinate_scaling
        if res_mask is not None:
            mm = res_mask.to(device=device).bool()
            rot = torch.where(mm[..., None, None], rot, torch.eye(3, dtype=rot.dtype, device=device))
            trans = trans * mm[..., None]
        return rot.to(dtype), trans.to(dtype)

    def reverse(self, rotmats_t: Tensor, trans_t: Tensor, rot_score: Tensor, trans_score: Tensor, t: Any, dt: float,
                res_mask: Tensor | None = None, diffuse_mask: Tensor | None = None, noise_scale: float = 1.0,
                center: bool | None = None, generator: torch.Generator | None = None,
                noise: Mapping[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """One official reverse step ``t -> t - dt`` (geodesic random walk on SO(3), Euler-Maruyama on R^3).

        The package samples with :mod:`superdiff_protein.core.sampler`, not with this method: it is the port of
        the official step, kept as the reference the tests hold both to (``tests/test_se3_diffuser.py``: equal to
        the official fixtures, and to one step of the core sampler with the same noise; the rotation noise test in
        ``tests/test_science_invariants.py``).

        Args:
            rotmats_t (B,N,3,3), trans_t (B,N,3) Angstrom; rot_score (B,N,3) body frame; trans_score (1/nm).
            t: scalar or (B,); dt: step size.
            res_mask: padding (those residues do not move and are excluded from the centre of mass).
            diffuse_mask: official motif mask: non-diffused residues are moved and take part in the
                recentring like the others, then reset to their old frames (exactly as official).
            center: FrameDiff rule: recentre iff ``center`` (default True). Proteus rule (``center_rule=
                "proteus"``): recentre iff every real residue is diffused; an explicit ``center`` overrides.
            noise: injected standard normals ``z_rot`` then ``z_trans`` (B,N,3) (drawn in that order).

        Returns ``(rotmats_{t-dt}, trans_{t-dt})`` in the input dtypes.
        """
        B, N = trans_t.shape[:2]
        dev = trans_t.device
        t64 = self._per_sample_t(t, B, dev)
        f64 = torch.float64
        real = torch.ones(B, N, dtype=f64, device=dev) if res_mask is None else res_mask.to(device=dev, dtype=f64)
        diff = real if diffuse_mask is None else diffuse_mask.to(device=dev, dtype=f64) * real
        if noise is not None:
            z_rot = torch.as_tensor(noise["z_rot"], dtype=f64, device=dev).reshape(B, N, 3)
            z_tr = torch.as_tensor(noise["z_trans"], dtype=f64, device=dev).reshape(B, N, 3)
        else:
            gdev = generator.device if generator is not None else dev
            z_rot = torch.randn((B, N, 3), generator=generator, dtype=f64, device=gdev).to(dev)
            z_tr = torch.randn((B, N, 3), generator=generator, dtype=f64, device=gdev).to(dev)
        sq = math.sqrt(dt)
        R = rotmats_t.to(f64)
        if self.cfg.diffuse_rot:
            g = self.rot_diffusion_coef(t64)[:, None, None]
            perturb = g**2 * rot_score.to(f64) * dt + g * sq * noise_scale * z_rot
            R_new = R @ so3_exp(perturb * diff[..., None])
        else:
            R_new = R
        cs = self.cfg.coordinate_scaling
        x = (trans_t * cs).to(f64)  # official: scaled in the input dtype
        if self.cfg.diffuse_trans:
            g = self.trans_diffusion_coef(t64)[:, None, None]
            f = -0.5 * self.trans_b_t(t64)[:, None, None] * x
            perturb = (f - g**2 * trans_score.to(f64)) * dt + g * sq * noise_scale * z_tr
            x_new = x - perturb * real[..., None]
            if center is None:
                if self.cfg.center_rule == "framediff":
                    center = True
                else:
                    center = None  # decided per sample below
            if center is None:
                do_c = (((1 - diff) * real).sum(-1) == 0).to(f64)  # every real residue diffused
            else:
                do_c = torch.full((B,), float(bool(center)), dtype=f64, device=dev)
            com = (x_new * real[..., None]).sum(-2, keepdim=True) / real.sum(-1).clamp_min(1)[:, None, None]
            x_new = x_new - do_c[:, None, None] * com * real[..., None]
            tr_new = x_new / cs
        else:
            tr_new = trans_t.to(f64)
        keep = diff[..., None] > 0
        R_new = torch.where(keep[..., None], R_new, R)
        tr_new = torch.where(keep, tr_new, trans_t.to(f64))
        return R_new.to(rotmats_t.dtype), tr_new.to(trans_t.dtype)

    # -- unit helpers
    def to_space(self, rotmats: Tensor, trans_angstrom: Tensor) -> dict[str, Tensor]:
        """Angstrom frames -> the space's state dict ``{"rot", "trans" (nm)}``."""
        return {"rot": rotmats, "trans": trans_angstrom * self.cfg.coordinate_scaling}

    def from_space(self, x: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The space's state -> ``(rotmats, trans in Angstrom)`` (division, as the official unscale)."""
        return x["rot"], x["trans"] / self.cfg.coordinate_scaling
