"""SO(3) Lie-group maths of the core: hat/vee, exp and log maps, rotation angle.

Conventions (shared with :mod:`superdiff_protein.frames.geometry`, which re-exports these):

* rotation vectors (axis * angle) live in the Lie algebra so(3) with the metric in which the
  geodesic ``exp(s v)`` has length ``s |v|`` (so the rotation angle equals ``|v|``);
* tangent vectors at ``R`` are expressed in the *body* frame: ``R exp(v)`` moves ``R`` along ``v``.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["hat", "vee", "so3_exp", "so3_log", "rotation_angle"]


def hat(v: Tensor) -> Tensor:
    """Skew-symmetric matrix ``[v]_x`` of ``v`` (..., 3) -> (..., 3, 3)."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack(
        [torch.stack([o, -z, y], -1), torch.stack([z, o, -x], -1), torch.stack([-y, x, o], -1)], -2
    )


def vee(m: Tensor) -> Tensor:
    """Inverse of :func:`hat` on the skew part of ``m`` (..., 3, 3) -> (..., 3)."""
    return 0.5 * torch.stack(
        [m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1
    )


def so3_exp(v: Tensor) -> Tensor:
    """Rodrigues' formula: rotation vector (..., 3) -> rotation matrix (..., 3, 3).

    Uses Taylor expansions near zero so that it is accurate and differentiable everywhere.
    """
    theta2 = (v * v).sum(-1, keepdim=True)[..., None]  # (...,1,1)
    small = theta2 < 1e-8 if v.dtype == torch.float64 else theta2 < 1e-4
    # sqrt only of safe values: a sqrt(0) in the unused where-branch would poison gradients with NaN
    safe_theta = torch.where(small, torch.ones_like(theta2), theta2).sqrt()
    a = torch.where(small, 1 - theta2 / 6 + theta2**2 / 120, torch.sin(safe_theta) / safe_theta)
    b = torch.where(
        small, 0.5 - theta2 / 24 + theta2**2 / 720, (1 - torch.cos(safe_theta)) / safe_theta**2
    )
    k = hat(v)
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def rotation_angle(r: Tensor) -> Tensor:
    """Rotation angle in [0, pi] of rotation matrices (..., 3, 3) -> (...)."""
    return so3_log(r).norm(dim=-1)


def so3_log(r: Tensor) -> Tensor:
    """Rotation matrix (..., 3, 3) -> rotation vector (..., 3) with angle in [0, pi].

    Robust near 0 (Taylor) and near pi (axis from the symmetric part), where the naive
    ``theta / (2 sin theta) * vee(R - R^T)`` formula loses all precision.
    """
    tr = r[..., 0, 0] + r[..., 1, 1] + r[..., 2, 2]
    cos = ((tr - 1) / 2).clamp(-1.0, 1.0)
    w = vee(r)  # = sin(theta) * axis
    sin = w.norm(dim=-1)
    theta = torch.atan2(sin, cos)
    eps = 1e-12 if r.dtype == torch.float64 else 1e-6
    # generic branch (theta not close to pi); theta / sin(theta) is smooth up to pi/2 and beyond
    safe_sin = torch.where(sin > eps, sin, torch.ones_like(sin))
    factor = torch.where(sin > eps, theta / safe_sin, 1 + theta**2 / 6)
    v_generic = factor[..., None] * w
    # near-pi branch: R + R^T = 2 cos I + 2 (1 - cos) n n^T
    s = 0.5 * (r + r.transpose(-1, -2))
    nnt = (s - cos[..., None, None] * torch.eye(3, dtype=r.dtype, device=r.device)) / (
        1 - cos
    ).clamp_min(eps)[..., None, None]
    diag = torch.diagonal(nnt, dim1=-2, dim2=-1).clamp_min(0)
    idx = diag.argmax(-1, keepdim=True)
    col = torch.gather(nnt, -1, idx[..., None, :].expand(*nnt.shape[:-1], 1)).squeeze(-1)
    n = col / col.norm(dim=-1, keepdim=True).clamp_min(eps)
    # fix the sign of the axis with the (small but informative) skew part
    sign = torch.where((n * w).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(r.dtype)
    v_pi = sign * n * theta[..., None]
    near_pi = (cos < -0.99)[..., None]
    return torch.where(near_pi, v_pi, v_generic)
