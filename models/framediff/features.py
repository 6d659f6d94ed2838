"""FrameDiff's input features: sinusoidal time and index embeddings and the one-hot CA distogram (official
definitions; shared by the network, its no-grad fast paths and Proteus)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["timestep_embedding", "index_embedding", "calc_distogram"]


def timestep_embedding(t: Tensor, dim: int, max_positions: int = 10000) -> Tensor:
    """Sinusoidal embedding of diffusion times ``t`` (B,) -> (B, dim), as the official one."""
    t = t * max_positions
    half = dim // 2
    scale = math.log(max_positions) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -scale)
    emb = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def index_embedding(indices: Tensor, dim: int, max_len: int = 2056) -> Tensor:
    """Sinusoidal embedding of (integer) residue indices / offsets (...,) -> (..., dim)."""
    k = torch.arange(dim // 2, device=indices.device)
    denom = max_len ** (2 * k[None] / dim)
    arg = indices[..., None] * math.pi / denom
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


def calc_distogram(pos: Tensor, min_bin: float, max_bin: float, num_bins: int) -> Tensor:
    """One-hot CA distogram (B, N, N, num_bins): bin k is ``lower_k < d < lower_{k+1}``.

    ``lower = linspace(min_bin, max_bin, num_bins)`` (float32, as official) and the last bin is
    open-ended (upper 1e8).  Distances are computed in ``pos.dtype``.  A distance of exactly 0
    (e.g. the zero self-conditioning input of the first pass) falls in no bin.
    """
    d = torch.linalg.norm(pos[:, :, None, :] - pos[:, None, :, :], dim=-1)[..., None]
    lower = torch.linspace(min_bin, max_bin, num_bins, device=pos.device)
    upper = torch.cat([lower[1:], torch.full((1,), 1e8, dtype=lower.dtype, device=lower.device)], dim=-1)
    return ((d > lower) * (d < upper)).to(pos.dtype)
