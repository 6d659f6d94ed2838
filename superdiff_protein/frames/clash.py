"""The CA clash energy shared by the clash guide (guidance.py) and the refinement (refine.py).

``E = 1/2 sum_{i<j, j-i>=min_sep} (d0 - |X_i - X_j|)_+^2`` per sample: CA pairs far apart in sequence closer
than ``d0`` Angstrom.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["clash_energy", "clash_energy_grad", "far_pairs"]


def far_pairs(n: int, min_sep: int, device: torch.device | None = None) -> Tensor:
    """(n, n) bool: residue pairs at least ``min_sep`` apart in sequence (the pairs a clash counts)."""
    idx = torch.arange(n, device=device)
    return (idx[:, None] - idx[None, :]).abs() >= min_sep


def _overlap(X: Tensor, mask: Tensor | None, d0: float, min_sep: int) -> tuple[Tensor, Tensor]:
    """``(d0 - d_ij)_+`` on the counted pairs (0 elsewhere) and the distances ``d``, both (B, N, N)."""
    B, N, _ = X.shape
    d = torch.cdist(X, X)                                                   # (B, N, N)
    pair = far_pairs(N, min_sep, X.device)[None].expand(B, N, N)
    if mask is not None:
        m = mask.to(torch.bool)
        pair = pair & m[:, :, None] & m[:, None, :]
    return torch.where(pair, torch.clamp(d0 - d, min=0.0), torch.zeros_like(d)), d


def clash_energy(X: Tensor, mask: Tensor | None, d0: float, min_sep: int) -> Tensor:
    """The energy alone, (B,), differentiable by autograd (``X`` (B, N, 3) Angstrom, ``mask`` (B, N) or None)."""
    over, _ = _overlap(X, mask, d0, min_sep)
    return 0.25 * (over * over).sum((1, 2))                                 # each pair is counted twice


def clash_energy_grad(X: Tensor, mask: Tensor | None, d0: float, min_sep: int) -> tuple[Tensor, Tensor]:
    """``(E, dE/dX)`` of ``E = 1/2 sum_{i<j, j-i>=min_sep} (d0 - |X_i - X_j|)_+^2`` per sample.

    ``X`` (B, N, 3) in Angstrom, ``mask`` (B, N) real residues or None. The gradient is (B, N, 3); its sum over
    residues is zero (pair forces), so the centre of mass does not move. Cost O(B N^2), no (B, N, N, 3) tensor.
    """
    over, d = _overlap(X, mask, d0, min_sep)
    energy = 0.25 * (over * over).sum((1, 2))                               # each pair is counted twice
    w = over / d.clamp_min(1e-6)                                           # (B, N, N), symmetric
    # dE/dX_i = -sum_j w_ij (X_i - X_j)
    grad = -(w.sum(2, keepdim=True) * X - w @ X)
    return energy, grad
