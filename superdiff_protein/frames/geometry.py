"""Protein geometry: SO(3) Lie-group maths, quaternions and rigid frames.

This is the single geometry module of the package. Conventions:

* rotation matrices act on column vectors, ``x_global = R @ x_local + t``;
* rotation vectors (axis * angle) live in the Lie algebra so(3) with the metric in which the
  geodesic ``exp(s v)`` has length ``s |v|`` (so the rotation angle equals ``|v|``);
* tangent vectors at ``R`` are expressed in the *body* frame: ``R exp(v)`` moves ``R`` along ``v``;
* quaternions are w-first ``(w, x, y, z)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..core.so3 import hat, rotation_angle, so3_exp, so3_log, vee  # the Lie-group maps live in the core

__all__ = [
    "hat",
    "vee",
    "so3_exp",
    "so3_log",
    "rotation_angle",
]


# ---------------------------------------------------------------------------------------------
# Quaternions, rigid frames, backbone atoms and torsions (appended for the FrameDiff/Proteus
# models).  Rigid transforms are plain tensors ``(R, t)`` with ``R`` (..., 3, 3) and ``t``
# (..., 3), acting as ``x_global = R @ x_local + t``.  Quaternions are w-first ``(w, x, y, z)``
# and follow the Hamilton convention used by openfold / FrameDiff / Proteus, so that
# ``quat_to_rotmat(quat_multiply(q1, q2)) == quat_to_rotmat(q1) @ quat_to_rotmat(q2)``.
# ---------------------------------------------------------------------------------------------

__all__ += [
    "quat_to_rotmat",
    "rotmat_to_quat",
    "quat_multiply",
    "quat_multiply_by_vec",
    "quat_normalize",
    "quat_to_rotvec",
    "rot_vec_mul",
    "rigid_compose",
    "rigid_invert",
    "rigid_apply",
    "rigid_invert_apply",
    "rigid_from_tensor_7",
    "rigid_to_tensor_7",
    "frames_from_3_points",
    "quat_update_compose",
    "torsion_rotmat_x",
    "dihedral_angle",
    "IDEAL_BACKBONE_LOCAL",
    "backbone_atoms_from_frames",
    "psi_from_backbone",
]


def quat_to_rotmat(q: Tensor) -> Tensor:
    """Quaternion(s) (..., 4), w-first, to rotation matrices (..., 3, 3).

    The quaternion is *not* renormalised (as openfold's ``quat_to_rot``): a non-unit ``q``
    gives ``|q|^2`` times a rotation.  Normalise first with :func:`quat_normalize` if needed.
    """
    w, x, y, z = q.unbind(-1)
    ww, xx, yy, zz = w * w, x * x, y * y, z * z
    wx, wy, wz = w * x, w * y, w * z
    xy, xz, yz = x * y, x * z, y * z
    rows = [
        torch.stack([ww + xx - yy - zz, 2 * (xy - wz), 2 * (xz + wy)], -1),
        torch.stack([2 * (xy + wz), ww - xx + yy - zz, 2 * (yz - wx)], -1),
        torch.stack([2 * (xz - wy), 2 * (yz + wx), ww - xx - yy + zz], -1),
    ]
    return torch.stack(rows, -2)


def rotmat_to_quat(r: Tensor) -> Tensor:
    """Rotation matrices (..., 3, 3) to unit quaternions (..., 4), w-first, with ``w >= 0``.

    Shepperd's method (branch on the largest of ``w, x, y, z``): accurate for every rotation,
    including angles near pi, and free of eigen-solvers (openfold uses ``eigh``; both give the
    same rotation, quaternion signs are arbitrary and canonicalised here to ``w >= 0``).
    """
    m00, m11, m22 = r[..., 0, 0], r[..., 1, 1], r[..., 2, 2]
    tr = m00 + m11 + m22
    # 4 candidate solutions; each is accurate when its leading component is the largest.
    c_w = torch.stack([1 + tr, r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], -1)
    c_x = torch.stack([r[..., 2, 1] - r[..., 1, 2], 1 + m00 - m11 - m22, r[..., 0, 1] + r[..., 1, 0], r[..., 0, 2] + r[..., 2, 0]], -1)
    c_y = torch.stack([r[..., 0, 2] - r[..., 2, 0], r[..., 0, 1] + r[..., 1, 0], 1 - m00 + m11 - m22, r[..., 1, 2] + r[..., 2, 1]], -1)
    c_z = torch.stack([r[..., 1, 0] - r[..., 0, 1], r[..., 0, 2] + r[..., 2, 0], r[..., 1, 2] + r[..., 2, 1], 1 - m00 - m11 + m22], -1)
    cands = torch.stack([c_w, c_x, c_y, c_z], -2)  # (..., 4, 4)
    lead = torch.stack([1 + tr, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    idx = lead.argmax(-1)
    q = torch.gather(cands, -2, idx[..., None, None].expand(*idx.shape, 1, 4)).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def quat_multiply(q1: Tensor, q2: Tensor) -> Tensor:
    """Hamilton product ``q1 * q2`` of w-first quaternions (..., 4)."""
    w1, x1, y1, z1 = q1.unbind(-1)
    w2, x2, y2, z2 = q2.unbind(-1)
    return torch.stack(
        [
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
        ],
        -1,
    )


def quat_multiply_by_vec(q: Tensor, v: Tensor) -> Tensor:
    """Hamilton product ``q * (0, v)`` of a quaternion (..., 4) and a pure quaternion (..., 3)."""
    return quat_multiply(q, torch.cat([torch.zeros_like(v[..., :1]), v], -1))


def quat_normalize(q: Tensor) -> Tensor:
    """Normalise quaternions (..., 4) to unit length."""
    return q / torch.linalg.norm(q, dim=-1, keepdim=True)


def quat_to_rotvec(q: Tensor, eps: float = 1e-6) -> Tensor:
    """Unit quaternions (..., 4) to rotation vectors (..., 3), angle in [0, pi].

    Same formula as FrameDiff's ``data.utils.quat_to_rotvec`` (scipy-style): the sign is flipped
    to ``w >= 0``, the angle is ``2 atan2(|xyz|, w)`` and ``angle / sin(angle/2 + eps)`` scales the
    vector part (a Taylor series below 1e-3 rad).  The ``eps`` inside the sine is official
    behaviour and biases the result by ~``eps`` relative; keep it for bit-compatibility.
    """
    q = torch.where(q[..., :1] < 0, -q, q)
    angle = 2 * torch.atan2(torch.linalg.norm(q[..., 1:], dim=-1), q[..., 0])
    a2 = angle * angle
    small_scale = 2 + a2 / 12 + 7 * a2 * a2 / 2880
    large_scale = angle / torch.sin(angle / 2 + eps)
    scale = torch.where(angle <= 1e-3, small_scale, large_scale)
    return scale[..., None] * q[..., 1:]


def rot_vec_mul(r: Tensor, v: Tensor) -> Tensor:
    """Apply rotation matrices (..., 3, 3) to vectors (..., 3) (broadcasting)."""
    return (r * v[..., None, :]).sum(-1)


def rigid_compose(r1: Tensor, t1: Tensor, r2: Tensor, t2: Tensor) -> tuple[Tensor, Tensor]:
    """Composition ``T1 o T2`` (apply T2 first): ``(R1 R2, R1 t2 + t1)``."""
    return r1 @ r2, rot_vec_mul(r1, t2) + t1


def rigid_invert(r: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse transform ``(R^T, -R^T t)``."""
    rt = r.transpose(-1, -2)
    return rt, -rot_vec_mul(rt, t)


def rigid_apply(r: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """Map local points ``x`` (..., 3) to global: ``R x + t`` (frames broadcast against x)."""
    return rot_vec_mul(r, x) + t


def rigid_invert_apply(r: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """Map global points ``x`` (..., 3) to local: ``R^T (x - t)``."""
    return rot_vec_mul(r.transpose(-1, -2), x - t)


def rigid_from_tensor_7(x: Tensor, normalize: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Split openfold ``tensor_7`` frames (..., 7) = (quat w-first, trans) into ``(quat, R, t)``.

    ``normalize=False`` (the openfold/FrameDiff default) uses the quaternion as stored.
    """
    q, t = x[..., :4], x[..., 4:]
    if normalize:
        q = quat_normalize(q)
    return q, quat_to_rotmat(q), t


def rigid_to_tensor_7(q: Tensor, t: Tensor) -> Tensor:
    """Pack quaternions (..., 4) and translations (..., 3) into ``tensor_7`` (..., 7)."""
    return torch.cat([q, t], -1)


def frames_from_3_points(
    p_neg_x: Tensor, origin: Tensor, p_xy: Tensor, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """Backbone frames by Gram-Schmidt, as openfold ``Rigid.from_3_points`` (AF2 Alg. 21).

    With ``(N, CA, C)`` as ``(p_neg_x, origin, p_xy)`` the x axis points from N to CA, C lies in
    the xy plane with positive y, and the origin is CA.  Returns ``(R, t)`` (columns of ``R`` are
    the frame axes expressed in global coordinates).
    """
    e0 = origin - p_neg_x
    e1 = p_xy - origin
    e0 = e0 / torch.sqrt((e0 * e0).sum(-1, keepdim=True) + eps)
    e1 = e1 - e0 * (e0 * e1).sum(-1, keepdim=True)
    e1 = e1 / torch.sqrt((e1 * e1).sum(-1, keepdim=True) + eps)
    e2 = torch.linalg.cross(e0, e1, dim=-1)
    return torch.stack([e0, e1, e2], -1), origin


def quat_update_compose(
    q: Tensor, t: Tensor, update: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Compose a frame ``(q, t)`` with an AF2 backbone update vector (..., 6) (Alg. 23).

    ``update = (b, c, d, tx, ty, tz)`` means the (non-unit) quaternion ``(1, b, c, d)`` applied on
    the right and a translation ``(tx, ty, tz)`` in the local frame; as in openfold's
    ``Rigid.compose_q_update_vec``: ``q' = normalize(q + mask * q*(0,b,c,d))`` and
    ``t' = t + mask * R(q) t_vec``.  ``mask`` (..., 1) freezes residues (0) when given.
    """
    q_vec, t_vec = update[..., :3], update[..., 3:]
    dq = quat_multiply_by_vec(q, q_vec)
    dt = rot_vec_mul(quat_to_rotmat(q), t_vec)
    if mask is not None:
        dq = dq * mask
        dt = dt * mask
    return quat_normalize(q + dq), t + dt


def torsion_rotmat_x(sin_cos: Tensor) -> Tensor:
    """Rotation about the local x axis from ``(sin, cos)`` pairs (..., 2) -> (..., 3, 3).

    ``[[1, 0, 0], [0, cos, -sin], [0, sin, cos]]`` (AF2 / openfold torsion convention).
    """
    s, c = sin_cos[..., 0], sin_cos[..., 1]
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    return torch.stack(
        [
            torch.stack([one, zero, zero], -1),
            torch.stack([zero, c, -s], -1),
            torch.stack([zero, s, c], -1),
        ],
        -2,
    )


def dihedral_angle(p0: Tensor, p1: Tensor, p2: Tensor, p3: Tensor) -> Tensor:
    """Signed dihedral angle (radians, (-pi, pi]) of four points (..., 3) (IUPAC convention)."""
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1n = b1 / b1.norm(dim=-1, keepdim=True)
    v = b0 - (b0 * b1n).sum(-1, keepdim=True) * b1n
    w = b2 - (b2 * b1n).sum(-1, keepdim=True) * b1n
    x = (v * w).sum(-1)
    y = (torch.linalg.cross(b1n, v, dim=-1) * w).sum(-1)
    return torch.atan2(y, x)


# Idealised backbone of alanine (AF2 residue constants, Angstrom), local backbone frame:
# rows N, CA, C, CB.  O lives in the psi frame (see backbone_atoms_from_frames).
IDEAL_BACKBONE_LOCAL = {
    "N": (-0.525, 1.363, 0.000),
    "CA": (0.000, 0.000, 0.000),
    "C": (1.526, -0.000, -0.000),
    "CB": (-0.529, -0.774, -1.205),
    "O_in_psi_frame": (0.627, 1.062, 0.000),
}
# psi frame -> backbone frame: axes ex = C - CA, ey ~ CA - N (Gram-Schmidt), origin at C.
_PSI_FRAME_R = ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, -1.0))
_PSI_FRAME_T = (1.526, 0.0, 0.0)


def backbone_atoms_from_frames(
    r: Tensor, t: Tensor, psi_sin_cos: Tensor | None = None, with_cb: bool = False
) -> Tensor:
    """Idealised backbone atoms from residue frames, as FrameDiff's ``all_atom.compute_backbone``.

    Args:
        r, t: frames (..., 3, 3), (..., 3) in Angstrom (CA at ``t``).
        psi_sin_cos: (..., 2) psi torsion as ``(sin, cos)`` (need not be unit: it is used as
            given, like the official code, which feeds a normalised prediction).  ``None`` places
            O with psi = pi (``(0, -1)``), i.e. a planar trans arrangement.
        with_cb: also return the idealised alanine CB.

    Returns:
        (..., 4, 3) atoms N, CA, C, O (or (..., 5, 3) N, CA, C, O, CB with ``with_cb``).
    """
    dt = r.dtype if r.dtype.is_floating_point else torch.float32
    dev = r.device
    loc = torch.tensor(
        [IDEAL_BACKBONE_LOCAL[k] for k in ("N", "CA", "C", "CB")], dtype=dt, device=dev
    )
    if psi_sin_cos is None:
        psi_sin_cos = torch.tensor([0.0, -1.0], dtype=dt, device=dev).expand(*t.shape[:-1], 2)
    psi_sin_cos = psi_sin_cos.to(dt)
    r_psi = torch.tensor(_PSI_FRAME_R, dtype=dt, device=dev) @ torsion_rotmat_x(psi_sin_cos)
    o_bb = rot_vec_mul(r_psi, torch.tensor(IDEAL_BACKBONE_LOCAL["O_in_psi_frame"], dtype=dt, device=dev))
    o_bb = o_bb + torch.tensor(_PSI_FRAME_T, dtype=dt, device=dev)
    local = torch.cat([loc[:3].expand(*t.shape[:-1], 3, 3), o_bb[..., None, :]], -2)
    if with_cb:
        local = torch.cat([local, loc[3].expand(*t.shape[:-1], 1, 3)], -2)
    return rigid_apply(r[..., None, :, :], t[..., None, :], local)


def psi_from_backbone(n: Tensor, ca: Tensor, c: Tensor, o: Tensor) -> Tensor:
    """Psi as ``(sin, cos)`` (..., 2) in the convention of :func:`backbone_atoms_from_frames`.

    Inverse of the O placement: the torsion is the dihedral N-CA-C-O shifted by pi (AF2 defines
    psi with the next residue's N, which is anti to O), so that
    ``backbone_atoms_from_frames(*frames_from_backbone(N, CA, C), psi)`` reproduces O.
    """
    ang = dihedral_angle(n, ca, c, o) + torch.pi
    return torch.stack([torch.sin(ang), torch.cos(ang)], -1)


# ---------------------------------------------------------------------------------------------
# Backbone frames in the FrameDiff / AF2 backbone-group convention (appended for data.py).
# ---------------------------------------------------------------------------------------------

__all__ += ["frames_from_backbone"]


def frames_from_backbone(n: Tensor, ca: Tensor, c: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Residue frames ``(R, t)`` from backbone atoms N, CA, C (each (..., 3)), FrameDiff convention.

    Gram-Schmidt with origin CA, x axis along ``C - CA``, and N in the xy plane with positive y;
    ``z = x cross y``.  This is the frame of openfold's ``atom37_to_frames`` backbone group (which
    FrameDiff trains on), so ``IDEAL_BACKBONE_LOCAL`` (C at +x, N at (-0.525, 1.363, 0)) maps to
    the atoms and ``backbone_atoms_from_frames(frames_from_backbone(N, CA, C), psi)`` rebuilds the
    backbone.  Note: it is NOT ``frames_from_3_points(N, CA, C)`` (that frame has x along CA - N);
    it equals ``frames_from_3_points(2 CA - C, CA, N)``.  Returns ``R`` (..., 3, 3) whose columns
    are the frame axes in global coordinates, and ``t = CA``.
    """
    e0 = c - ca
    e0 = e0 / torch.sqrt((e0 * e0).sum(-1, keepdim=True) + eps)
    e1 = n - ca
    e1 = e1 - e0 * (e0 * e1).sum(-1, keepdim=True)
    e1 = e1 / torch.sqrt((e1 * e1).sum(-1, keepdim=True) + eps)
    e2 = torch.linalg.cross(e0, e1, dim=-1)
    return torch.stack([e0, e1, e2], -1), ca
