"""PRIVATE quaternion / rigid helpers that mirror the official (openfold) float32 operation order.

These exist because Proteus's trunk works on *quaternions* (w-first) and its numerics depend on
the exact formulas openfold uses (``quat_to_rot`` from products of components, ``rot_vec_mul`` as
explicit sums).  Generic geometry lives in :mod:`superdiff_protein.frames.geometry`; the functions here
are kept private to the Proteus package on purpose (they reproduce the official rounding).
"""
from __future__ import annotations

import torch
from torch import Tensor

from superdiff_protein.frames.geometry import quat_to_rotmat  # same formula/order as openfold quat_to_rot

__all__ = ["quat_to_rotmat", "quat_mul_vec", "rot_vec_mul", "apply", "invert_apply", "compose_q_update"]


def quat_mul_vec(q: Tensor, v: Tensor) -> Tensor:
    """Hamilton product ``q * (0, v)`` for quaternions (..., 4) and vectors (..., 3)."""
    w, x, y, z = q.unbind(-1)
    a, b, c = v.unbind(-1)
    return torch.stack(
        [-x * a - y * b - z * c, w * a + y * c - z * b, w * b - x * c + z * a, w * c + x * b - y * a], -1
    )


def rot_vec_mul(r: Tensor, p: Tensor) -> Tensor:
    """``r @ p`` for (..., 3, 3) and (..., 3) written as explicit sums (openfold order)."""
    x, y, z = p.unbind(-1)
    return torch.stack(
        [
            r[..., 0, 0] * x + r[..., 0, 1] * y + r[..., 0, 2] * z,
            r[..., 1, 0] * x + r[..., 1, 1] * y + r[..., 1, 2] * z,
            r[..., 2, 0] * x + r[..., 2, 1] * y + r[..., 2, 2] * z,
        ],
        -1,
    )


def apply(rot: Tensor, trans: Tensor, p: Tensor) -> Tensor:
    """Apply frames ``x -> R x + t`` (rot (..., 3, 3), trans (..., 3), p (..., 3))."""
    return rot_vec_mul(rot, p) + trans


def invert_apply(rot: Tensor, trans: Tensor, p: Tensor) -> Tensor:
    """Apply inverse frames ``x -> R^T (x - t)``."""
    return rot_vec_mul(rot.transpose(-1, -2), p - trans)


def compose_q_update(
    quats: Tensor, trans: Tensor, update: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """openfold ``Rigid.compose_q_update_vec``: update (..., 6) = (quaternion b, c, d, translation).

    ``q_new = normalize(q + mask * q (0, b, c, d))``; ``t_new = t + mask * R(q) t_update``.
    """
    q_vec, t_vec = update[..., :3], update[..., 3:]
    new_q = quats + quat_mul_vec(quats, q_vec) * mask
    new_q = new_q / torch.linalg.norm(new_q, dim=-1, keepdim=True)
    new_t = trans + rot_vec_mul(quat_to_rotmat(quats), t_vec) * mask
    return new_q, new_t
