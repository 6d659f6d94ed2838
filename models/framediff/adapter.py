"""FrameDiff frame-model adapter: checkpoint in, batched frames -> predicted clean frames out.

Typical use::

    model = FrameDiffAdapter.from_checkpoint("paper_weights.pth", device="cuda")
    out = model(rotmats_t, trans_t, t, res_mask)                 # first call: no self-cond.
    out = model(rotmats_t, trans_t, t, res_mask, out.self_cond_state)  # later calls
    rot_score, trans_score = model.official_scores(out, rotmats_t, trans_t, t, res_mask)

Units: translations in Angstrom in and out (the network works in nm internally).  Rotation
matrices act on column vectors (``x_global = R x_local + t``), as everywhere in the package.
The self-conditioning state is the previous prediction's CA positions (B, N, 3) in Angstrom;
``None`` means "no self-conditioning" (zeros, as the official first pass).  The official
sampler runs one extra pass at t=1 with zeros and then always feeds the previous prediction;
that schedule is the sampler's business, not the adapter's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from superdiff_protein.frames.checkpoints import load_framediff_checkpoint, load_state_dict_checked
from superdiff_protein.frames.geometry import backbone_atoms_from_frames, rotmat_to_quat
from superdiff_protein.frames.official_numerics import official_rot_score, official_trans_score
from superdiff_protein.frames.se3 import SE3DiffuserConfig

from .config import FrameDiffConfig
from .network import FrameDiffScoreNetwork

__all__ = ["FrameDiffOutput", "FrameDiffAdapter"]


@dataclass
class FrameDiffOutput:
    """Predicted clean frames and psi for a batch.

    Attributes:
        rotmats: (B, N, 3, 3) predicted rotations.
        trans: (B, N, 3) predicted CA positions, Angstrom.
        quats: (B, N, 4) the same rotations as unit quaternions (w-first; the network's native form).
        psi: (B, N, 2) predicted psi as unit (sin, cos).
        self_cond_state: (B, N, 3) state for the next call (predicted CA, Angstrom, padding zeroed).
    """

    rotmats: Tensor
    trans: Tensor
    quats: Tensor
    psi: Tensor
    self_cond_state: Tensor

    def backbone(self) -> Tensor:
        """(B, N, 4, 3) idealised N, CA, C, O atoms (O placed from psi), Angstrom."""
        return backbone_atoms_from_frames(self.rotmats, self.trans, self.psi)


class FrameDiffAdapter(nn.Module):
    """Thin wrapper around :class:`FrameDiffScoreNetwork` with Angstrom frames in and out."""

    def __init__(self, network: FrameDiffScoreNetwork, diffuser_cfg: Optional[SE3DiffuserConfig] = None):
        super().__init__()
        self.network = network
        self.diffuser_cfg = diffuser_cfg or SE3DiffuserConfig()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: Any = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "FrameDiffAdapter":
        """Load an official FrameDiff checkpoint (``paper_weights.pth`` or any training checkpoint).

        The architecture is sized from the checkpoint's own ``conf.model``; keys are matched
        strictly (``module.`` prefixes stripped).  The file is read by the allow-listed loader
        (:mod:`superdiff_protein.runs.safe_load`): no code from it runs.  The model is returned in ``eval()`` mode.

        Raises:
            superdiff_protein.frames.checkpoints.CheckpointError: unreadable/unsafe file or key mismatch.
        """
        ck = load_framediff_checkpoint(path, map_location="cpu")
        net = FrameDiffScoreNetwork(FrameDiffConfig.from_dict(ck.model_conf))
        load_state_dict_checked(net, ck.state_dict, strict=True, source=str(path))
        model = cls(net, SE3DiffuserConfig.from_conf(ck.conf))
        return model.to(device=device, dtype=dtype).eval()

    @property
    def config(self) -> FrameDiffConfig:
        return self.network.cfg

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
        seq_idx: Optional[Tensor] = None,
    ) -> FrameDiffOutput:
        """Predict clean frames from noisy frames.

        Args:
            rotmats: (B, N, 3, 3) noisy rotations (or ``None`` and pass ``quats`` (B, N, 4)).
            trans: (B, N, 3) noisy CA positions in Angstrom.
            t: (B,) diffusion times in [0, 1] (or a scalar, broadcast).
            res_mask: (B, N) 1 = real residue, 0 = padding (any mix of lengths is fine).
            self_cond_state: previous output's ``self_cond_state`` or ``None``.
            fixed_mask: (B, N) motif residues kept fixed (default none).
            seq_idx: (B, N) residue indices (default 1..N, as the official sampler).
        """
        if quats is None:
            if rotmats is None:
                raise ValueError("pass either rotmats or quats")
            quats = rotmat_to_quat(rotmats)
        b, n = res_mask.shape
        t = torch.as_tensor(t, device=trans.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(b)
        out = self.network(quats, trans, t, res_mask, seq_idx=seq_idx, fixed_mask=fixed_mask, sc_ca=self_cond_state)
        m = res_mask.to(out["trans"].dtype)[..., None]
        return FrameDiffOutput(out["rotmats"], out["trans"], out["quats"], out["psi"], out["trans"] * m)

    def official_scores(
        self, out: FrameDiffOutput, rotmats_t: Optional[Tensor], trans_t: Tensor, t: Tensor, res_mask: Tensor,
        quats_t: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        """Scores exactly as the official ``IpaScore`` (:mod:`superdiff_protein.frames.official_numerics`).

        Returns ``(rot_score (B,N,3) float64, 1/rad; trans_score (B,N,3), 1/nm, scaled coords)``.
        """
        if quats_t is None:
            quats_t = rotmat_to_quat(rotmats_t)
        t = torch.as_tensor(t, device=trans_t.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(res_mask.shape[0])
        rot = official_rot_score(quats_t, out.quats, t, self.diffuser_cfg, res_mask)
        tr = official_trans_score(trans_t, out.trans, t, self.diffuser_cfg, res_mask)
        return rot, tr
