"""Exact (analytic) frame models of ``generate_backbones``: joint mixtures over windows of real protein chains.

``models=[exact-helix]`` (helix-rich PDownB chains), ``exact-strand`` (strand-rich) or ``exact-all`` load an
:class:`ExactFrameMixture` from the shipped data file ``models/checkpoints/exact_frames_pdownb.pt``
(:func:`build_exact_frame_set` writes it). Their scores and log-densities are exact, so they test the sampler
and the density estimators without a network.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from superdiff_protein.errors import UserError
from superdiff_protein.frames.model_loading import angstrom_per_unit
from superdiff_protein.frames.geometry import frames_from_backbone, psi_from_backbone, so3_log
from superdiff_protein.core.igso3 import igso3_dlog_domega, igso3_log_density
from superdiff_protein.core.protocol import ModelOutput
from superdiff_protein.runs.atomic import atomic_open
from superdiff_protein.core.spaces import ProductSpace, frame_space

__all__ = ["EXACT_FRAMES_FILE", "EXACT_FORMAT", "EXACT_MODELS", "ExactModelError", "ExactFrameMixture",
           "exact_space", "load_exact_frame_set", "load_exact_model", "build_exact_frame_set"]

EXACT_FRAMES_FILE = Path(__file__).resolve().parent / "checkpoints" / "exact_frames_pdownb.pt"
EXACT_FORMAT = "superdiff_exact_frames"
#: model name -> the chain group it takes (None: all chains)
EXACT_MODELS = {"exact-helix": "helix", "exact-strand": "strand", "exact-all": None}


class ExactModelError(RuntimeError, UserError):
    """The exact models' data file is missing or not such a file, or an unknown exact model name (exit code 2)."""

    exit_code = 2


class ExactFrameMixture:
    """An exact score model on SE(3)^N: a joint mixture over windows of real protein chains.

    Every mode ``k`` is one contiguous ``N``-residue window of a real chain (frames from its N, CA,
    C atoms; CA centred, in nm): at data time the rotations are the mode's rotations (blurred to
    IGSO(3) by the schedule's ``sigma_min``) and the translations are Gaussian around the mode's CA
    positions with standard deviation ``trans_std`` (Angstrom). Under the forward SDEs of ``space``
    the marginals are closed-form::

        q_t(R, x) = 1/K sum_k prod_n IGSO3(R_n; R_kn, sigma(t)) N(x_n; alpha_t m_kn, alpha_t^2 v0 + sigma_t^2)

    so scores and log-densities are exact. The mixture is joint (rotations and translations of a
    sample come from the same window), unlike ``models.analytic.frame_mixture_model``. The model
    adapts to any length ``N <= max_length`` (modes are built per length and cached); it does not
    support padded batches.

    ``extras``: ``pred_rotmats`` / ``pred_trans`` (Angstrom) -- the posterior mean of the clean
    frames given the most responsible mode (that mode's rotations; Tweedie's formula for the
    translations) -- and ``psi`` (sin, cos) of that mode, as neural frame models report them.
    """

    supports_padding = False

    def __init__(self, chains: Sequence[Tensor], space: ProductSpace, name: str = "exact",
                 trans_std: float = 0.1, windows_per_chain: int = 4, chain_names: Sequence[str] | None = None):
        if not chains:
            raise ValueError("ExactFrameMixture needs at least one chain")
        self.chains = [torch.as_tensor(c, dtype=torch.float64) for c in chains]   # (L, 4, 3) Angstrom N, CA, C, O
        for c in self.chains:
            if c.dim() != 3 or c.shape[1:] != (4, 3) or not torch.isfinite(c).all():
                raise ValueError("chains must be finite (L, 4, 3) N, CA, C, O arrays")
        self.chain_names = list(chain_names) if chain_names is not None else [f"chain{i}" for i in range(len(chains))]
        self.space = space
        self.name = name
        self.to_angstrom = angstrom_per_unit(space)
        self.trans_var = (float(trans_std) / self.to_angstrom) ** 2               # (space units)^2
        self.windows_per_chain = int(windows_per_chain)
        self.max_length = max(int(c.shape[0]) for c in self.chains)
        self._cache: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}

    def signature(self) -> dict:
        """The state-space signature the sampler checks (the space's)."""
        return self.space.signature()

    def init_state(self, batch: int, mask: Tensor | None) -> None:
        """No per-batch state."""
        return None

    def windows(self, n: int) -> list[tuple[int, int]]:
        """(chain index, start) of the modes of length ``n``."""
        if not 1 <= n <= self.max_length:
            raise ValueError(f"model {self.name!r} supports lengths 1..{self.max_length}, got {n}")
        out = []
        for ci, c in enumerate(self.chains):
            L = int(c.shape[0])
            if L < n:
                continue
            w = min(self.windows_per_chain, L - n + 1)
            starts = sorted({int(round(s)) for s in np.linspace(0, L - n, w)})
            out += [(ci, s) for s in starts]
        return out

    def modes(self, n: int, dtype=torch.float64, device="cpu") -> tuple[Tensor, Tensor, Tensor]:
        """Rotations (K, n, 3, 3), centred CA in nm (K, n, 3) and psi (K, n, 2) of the length-``n`` modes."""
        key = (n, dtype, str(device))
        if key not in self._cache:
            rots, trans, psis = [], [], []
            for ci, s in self.windows(n):
                a = self.chains[ci][s:s + n]
                r, ca = frames_from_backbone(a[:, 0], a[:, 1], a[:, 2])
                u, _, vh = torch.linalg.svd(r)                  # exact rotations (the eps of
                rots.append(u @ vh)                             # frames_from_backbone leaves ~1e-9)
                trans.append((ca - ca.mean(0)) / self.to_angstrom)
                psis.append(psi_from_backbone(a[:, 0], a[:, 1], a[:, 2], a[:, 3]))
            self._cache[key] = tuple(torch.stack(v).to(device=device, dtype=dtype) for v in (rots, trans, psis))
        return self._cache[key]

    def _terms(self, x: dict[str, Tensor], t: Tensor):
        rot, tr = x["rot"], x["trans"]
        R, m, _ = self.modes(rot.shape[1], rot.dtype, rot.device)
        rs = self.space.components["rot"].schedule
        vs = self.space.components["trans"].schedule
        t = t.to(rot.dtype)
        sig = rs.sigma(t)[:, None, None]                                        # (B, 1, 1)
        v = so3_log(R.transpose(-1, -2)[None] @ rot[:, None])                   # (B, K, N, 3)
        omega = v.norm(dim=-1)
        lc_rot = igso3_log_density(omega, sig).sum(-1)                          # (B, K)
        a = vs.alpha(t).to(tr.dtype)[:, None, None, None]
        var = a * a * self.trans_var + vs.sigma(t).to(tr.dtype)[:, None, None, None] ** 2
        diff = tr[:, None] - a * m[None]                                        # (B, K, N, 3)
        lc_tr = (-0.5 * (diff * diff / var + torch.log(2 * math.pi * var))).flatten(2).sum(-1)
        lc = lc_rot + lc_tr - math.log(R.shape[0])
        return lc, v, omega, sig, diff, var, a

    def __call__(self, x, t, mask, state) -> ModelOutput:
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError(f"model {self.name!r} does not support padded residues")
        lc, v, omega, sig, diff, var, a = self._terms(x, t)
        resp = torch.softmax(lc, -1)                                            # (B, K)
        tiny = 1e-6 if v.dtype == torch.float64 else 1e-3
        rot_sc = (igso3_dlog_domega(omega, sig) / omega.clamp_min(tiny))[..., None] * v
        rot_score = (resp[..., None, None] * rot_sc).sum(1)
        tr_score = (resp[..., None, None] * (-diff / var)).sum(1)
        with torch.no_grad():
            R, m, psi = self.modes(x["rot"].shape[1], x["rot"].dtype, x["rot"].device)
            k = resp.argmax(-1)                                                 # (B,)
            a_b, var_b = a[:, 0], var[:, 0]                                     # (B, 1, 1)
            x0 = m[k] + (a_b * self.trans_var / var_b) * (x["trans"] - a_b * m[k])
            extras = {"pred_rotmats": R[k], "pred_trans": x0 * self.to_angstrom, "psi": psi[k], "mode_index": k}
        return ModelOutput({"rot": rot_score, "trans": tr_score}, None, extras)

    def denoise_final(self, x, t_prev, mask=None, state=None, extras=None) -> tuple[Tensor, Tensor]:
        """Predicted clean frames ``(rotmats, trans in Angstrom)`` at the final state, evaluated at
        ``t_prev`` (the last step's time), as :meth:`FrameScoreModel.denoise_final` does for networks."""
        B = x["trans"].shape[0]
        t = torch.as_tensor(t_prev, dtype=x["trans"].dtype, device=x["trans"].device).expand(B)
        ex = self(x, t, mask, state).extras
        return ex["pred_rotmats"], ex["pred_trans"]

    def log_prob(self, x, t, mask=None) -> Tensor:
        """Exact joint ``log q_t(R, x)`` per sample (B,)."""
        return torch.logsumexp(self._terms(x, t)[0], -1)

    def log_density(self, x, t, mask=None) -> dict[str, Tensor]:
        """The protocol's optional hook (``init_logq=model``; FKC start weights): ``log q_t`` per component
        w.r.t. the space's reference measures. ``rot``: the rotations' marginal (normalised Haar); ``trans``:
        the translations given the rotations, so the two add up to the joint. On a centred translation space
        the density lives on the zero-centre subspace (``3 (N - 1)`` dimensions, as the space's prior): the
        full-space Gaussian of each mode differs from it by the centre's own 3-d Gaussian, ``(2 pi var)^(-3/2)``
        at a centred point (the modes are centred, so the factor is the same for every mode)."""
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError(f"model {self.name!r} does not support padded residues")
        lc, v, omega, sig, diff, var, a = self._terms(x, t)
        joint = torch.logsumexp(lc, -1)
        if getattr(self.space.components["trans"], "center", False):
            joint = joint + 1.5 * torch.log(2 * math.pi * var.reshape(-1))
        rs = self.space.components["rot"].schedule
        lc_rot = igso3_log_density(omega, rs.sigma(t.to(omega.dtype))[:, None, None]).sum(-1)
        rot = torch.logsumexp(lc_rot, -1) - math.log(lc.shape[-1])
        return {"rot": rot, "trans": joint - rot}


def exact_space() -> ProductSpace:
    """The frame space of the neural frame models when available (so exact and neural models can be
    superposed), else FrameDiff's schedules via :func:`frame_space`."""
    try:
        from superdiff_protein.frames import se3  # type: ignore[attr-defined]

        return se3.SE3Diffuser().space
    except Exception:
        return frame_space()


def load_exact_frame_set(path: str | os.PathLike = EXACT_FRAMES_FILE) -> dict:
    """The shipped file of real chains (written by :func:`build_exact_frame_set`)."""
    p = Path(path)
    if not p.is_file():
        raise ExactModelError(f"exact models: data file {p} is missing (rebuild it with "
                              "models.exact_frames.build_exact_frame_set)")
    from superdiff_protein.frames.checkpoints import CheckpointError, load_checkpoint_file

    try:
        d = load_checkpoint_file(p, "cpu")
    except CheckpointError as e:
        raise ExactModelError(f"exact models: {e}") from e
    if not isinstance(d, dict) or d.get("format") != EXACT_FORMAT:
        raise ExactModelError(f"exact models: {p} is not a {EXACT_FORMAT} file")
    return d


def load_exact_model(name: str, trans_std: float = 0.1, windows_per_chain: int = 4,
                     space: ProductSpace | None = None) -> ExactFrameMixture:
    """``exact-helix`` / ``exact-strand`` (helix-rich / strand-rich PDownB chains) or ``exact-all``."""
    if name not in EXACT_MODELS:
        raise ExactModelError(f"unknown exact model {name!r}; available: {', '.join(EXACT_MODELS)}")
    d = load_exact_frame_set()
    group = EXACT_MODELS[name]
    idx = [i for i, g in enumerate(d["groups"]) if group is None or g == group]
    return ExactFrameMixture([d["atoms"][i] for i in idx], space or exact_space(), name=name,
                             trans_std=trans_std, windows_per_chain=windows_per_chain,
                             chain_names=[d["names"][i] for i in idx])


def build_exact_frame_set(archive: str | os.PathLike, members: Mapping[str, Sequence[str]],
                          out: str | os.PathLike = EXACT_FRAMES_FILE) -> Path:
    """Write the exact models' data file from real PDB files of a tar archive (e.g. PDownB).

    ``members`` maps a group name (``helix``/``strand``) to archive member paths. Each chain must be
    complete (N, CA, C, O for every residue), unbroken and free of cis peptides (all CA-CA distances
    within [3.7, 3.9] A), so every window of it is a physically valid backbone.
    """
    import tarfile

    from superdiff_protein.frames.pdb_io import read_backbone

    names, groups, atoms, sources = [], [], [], []
    with tarfile.open(archive) as tf, tempfile.TemporaryDirectory() as tmp:
        for group, mems in members.items():
            for mem in mems:
                tf.extract(mem, tmp, filter="data")
                bb = read_backbone(Path(tmp) / mem)
                a = np.asarray(bb.atoms, dtype=np.float64)
                if not bb.atom_mask.all():
                    raise ValueError(f"{mem}: incomplete backbone")
                d = np.linalg.norm(a[1:, 1] - a[:-1, 1], axis=-1)
                if d.min() < 3.7 or d.max() > 3.9:
                    raise ValueError(f"{mem}: chain break or cis peptide (CA-CA {d.min():.2f}..{d.max():.2f} A)")
                names.append(f"{bb.name}_{bb.chain_id}")
                groups.append(group)
                sources.append(mem)
                atoms.append(torch.from_numpy(np.round(a, 3)).to(torch.float32))
    data = {"format": EXACT_FORMAT, "version": 1, "names": names, "groups": groups, "sources": sources,
            "atoms": atoms, "note": "N, CA, C, O in Angstrom of real PDownB chains (PDB, CC0)"}
    with atomic_open(out, "wb", encoding=None) as fh:
        torch.save(data, fh)
    return Path(out)
