"""Geometry module: quaternions, rigid frames, backbone atoms, torsions (float64 references)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation as ScipyRotation

from superdiff_protein.frames import geometry as G

DT = torch.float64


def _rand_quats(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 4, generator=g, dtype=DT)
    return q / q.norm(dim=-1, keepdim=True)


def test_quat_to_rotmat_matches_scipy():
    q = _rand_quats(200)
    r = G.quat_to_rotmat(q)
    ref = ScipyRotation.from_quat(q[:, [1, 2, 3, 0]].numpy()).as_matrix()  # scipy is scalar-last
    np.testing.assert_allclose(r.numpy(), ref, atol=1e-12)


def test_rotmat_to_quat_roundtrip_including_near_pi():
    q = _rand_quats(500, seed=1)
    # add rotations with angle ~pi and ~0 (hard cases)
    axes = torch.nn.functional.normalize(torch.randn(20, 3, dtype=DT), dim=-1)
    extra = torch.cat([G.so3_exp(axes * (math.pi - 1e-9)), G.so3_exp(axes * 1e-9), G.so3_exp(axes * math.pi)])
    r = torch.cat([G.quat_to_rotmat(q), extra])
    q2 = G.rotmat_to_quat(r)
    assert (q2[:, 0] >= 0).all()
    torch.testing.assert_close(q2.norm(dim=-1), torch.ones(len(r), dtype=DT))
    torch.testing.assert_close(G.quat_to_rotmat(q2), r, atol=1e-12, rtol=0)
    # sign-canonical agreement with the input quaternions
    qc = torch.where(q[:, :1] < 0, -q, q)
    torch.testing.assert_close(q2[: len(q)], qc, atol=1e-12, rtol=0)


def test_quat_multiply_is_rotation_composition():
    q1, q2 = _rand_quats(50, 2), _rand_quats(50, 3)
    torch.testing.assert_close(
        G.quat_to_rotmat(G.quat_multiply(q1, q2)), G.quat_to_rotmat(q1) @ G.quat_to_rotmat(q2), atol=1e-12, rtol=0
    )
    v = torch.randn(50, 3, dtype=DT)
    torch.testing.assert_close(G.quat_multiply_by_vec(q1, v), G.quat_multiply(q1, torch.cat([torch.zeros(50, 1, dtype=DT), v], -1)))


def test_quat_to_rotvec_matches_so3_log_up_to_official_eps():
    q = _rand_quats(300, seed=4)
    v = G.quat_to_rotvec(q)
    ref = G.so3_log(G.quat_to_rotmat(q))
    # the official formula divides by sin(angle/2 + 1e-6): relative bias ~1e-6 * cot(angle/2)
    ang = ref.norm(dim=-1)
    ok = ang < 3.0
    torch.testing.assert_close(v[ok], ref[ok], atol=2e-5, rtol=0)
    torch.testing.assert_close(G.quat_to_rotvec(q, eps=0.0)[ok], ref[ok], atol=1e-10, rtol=0)
    small = G.quat_to_rotvec(torch.tensor([[1.0, 1e-5, 0, 0]], dtype=DT))
    torch.testing.assert_close(small, torch.tensor([[2e-5, 0, 0]], dtype=DT), atol=1e-12, rtol=0)


def test_rigid_compose_invert_apply():
    g = torch.Generator().manual_seed(5)
    r1, r2 = G.so3_exp(torch.randn(10, 3, generator=g, dtype=DT)), G.so3_exp(torch.randn(10, 3, generator=g, dtype=DT))
    t1, t2 = torch.randn(10, 3, generator=g, dtype=DT), torch.randn(10, 3, generator=g, dtype=DT)
    x = torch.randn(10, 3, generator=g, dtype=DT)
    r12, t12 = G.rigid_compose(r1, t1, r2, t2)
    torch.testing.assert_close(G.rigid_apply(r12, t12, x), G.rigid_apply(r1, t1, G.rigid_apply(r2, t2, x)))
    ri, ti = G.rigid_invert(r1, t1)
    torch.testing.assert_close(G.rigid_apply(ri, ti, G.rigid_apply(r1, t1, x)), x)
    torch.testing.assert_close(G.rigid_invert_apply(r1, t1, G.rigid_apply(r1, t1, x)), x)
    q, r, t = G.rigid_from_tensor_7(torch.cat([G.rotmat_to_quat(r1), t1], -1))
    torch.testing.assert_close(r, r1)
    torch.testing.assert_close(G.rigid_to_tensor_7(q, t)[..., 4:], t1)


def test_frames_from_3_points_openfold_convention():
    g = torch.Generator().manual_seed(6)
    p = torch.randn(3, 7, 3, generator=g, dtype=DT)
    r, t = G.frames_from_3_points(p[0], p[1], p[2], eps=0.0)
    torch.testing.assert_close(r.transpose(-1, -2) @ r, torch.eye(3, dtype=DT).expand(7, 3, 3))
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(7, dtype=DT))
    loc = G.rigid_invert_apply(r, t, p[0])  # p_neg_x on the negative x axis
    assert (loc[:, 0] < 0).all()
    torch.testing.assert_close(loc[:, 1:], torch.zeros(7, 2, dtype=DT), atol=1e-12, rtol=0)
    loc2 = G.rigid_invert_apply(r, t, p[2])  # p_xy in the xy plane, y > 0
    assert (loc2[:, 1] > 0).all()
    torch.testing.assert_close(loc2[:, 2], torch.zeros(7, dtype=DT), atol=1e-12, rtol=0)


def test_quat_update_compose():
    q = _rand_quats(6, 7)
    t = torch.randn(6, 3, dtype=DT)
    upd = torch.randn(6, 6, dtype=DT) * 0.3
    q2, t2 = G.quat_update_compose(q, t, upd)
    dq = torch.cat([torch.ones(6, 1, dtype=DT), upd[:, :3]], -1)
    dq = dq / dq.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(G.quat_to_rotmat(q2), G.quat_to_rotmat(q) @ G.quat_to_rotmat(dq))
    torch.testing.assert_close(t2, t + G.rot_vec_mul(G.quat_to_rotmat(q), upd[:, 3:]))
    mask = torch.zeros(6, 1, dtype=DT)
    q3, t3 = G.quat_update_compose(q, t, upd, mask)
    torch.testing.assert_close(q3, q)
    torch.testing.assert_close(t3, t)


def test_backbone_atoms_geometry_and_psi_roundtrip():
    g = torch.Generator().manual_seed(8)
    r = G.so3_exp(torch.randn(20, 3, generator=g, dtype=DT))
    t = torch.randn(20, 3, generator=g, dtype=DT) * 10
    psi = torch.rand(20, generator=g, dtype=DT) * 2 * math.pi - math.pi
    sc = torch.stack([torch.sin(psi), torch.cos(psi)], -1)
    atoms = G.backbone_atoms_from_frames(r, t, sc, with_cb=True)
    n, ca, c, o, cb = atoms.unbind(-2)
    torch.testing.assert_close(ca, t)
    d = lambda a, b: (a - b).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(d(n, ca), torch.full((20,), math.hypot(0.525, 1.363), dtype=DT))
    torch.testing.assert_close(d(c, ca), torch.full((20,), 1.526, dtype=DT))
    torch.testing.assert_close(d(c, o), torch.full((20,), math.hypot(0.627, 1.062), dtype=DT))
    # frames rebuilt from the atoms (FrameDiff convention) are the input frames
    r2, t2 = G.frames_from_backbone(n, ca, c, eps=0.0)
    torch.testing.assert_close(r2, r, atol=1e-12, rtol=0)
    # psi recovered from the O position
    sc2 = G.psi_from_backbone(n, ca, c, o)
    torch.testing.assert_close(sc2, sc, atol=1e-12, rtol=0)
    # O depends on psi only through the rotation about the C-CA axis: distance O-CA fixed
    assert torch.allclose(d(o, ca), d(o, ca)[0].expand(20))
    assert G.backbone_atoms_from_frames(r, t).shape == (20, 4, 3)


def test_dihedral_angle_known_values():
    p0 = torch.tensor([1.0, 0, 0], dtype=DT)
    p1 = torch.tensor([0.0, 0, 0], dtype=DT)
    p2 = torch.tensor([0.0, 1, 0], dtype=DT)
    for ang in (0.3, -1.2, 2.9):
        p3 = torch.tensor([math.cos(ang), 1.0, math.sin(ang)], dtype=DT)
        # with this construction the IUPAC dihedral is -ang (right-handed about p1->p2 = +y)
        val = G.dihedral_angle(p0, p1, p2, p3).item()
        assert abs(abs(val) - abs(ang)) < 1e-12
    tors = G.torsion_rotmat_x(torch.tensor([math.sin(0.4), math.cos(0.4)], dtype=DT))
    torch.testing.assert_close(tors, G.so3_exp(torch.tensor([0.4, 0, 0], dtype=DT)))
