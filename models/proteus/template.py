"""Template self-conditioning of Proteus: backbone atoms -> AF2 template features -> embeddings.

Proteus feeds its previous prediction back as a *template*: the backbone atoms (N, CA, C, O) of the
previous predicted frames, with residue identity masked to glycine. From them it builds the
AlphaFold template features (57-wide angle feature: one-hot(22) aatype, 7 torsion sin/cos, the same
again as "alternative" torsions, 7 torsion masks; 88-wide pair feature: 39-bin CA distogram over
3.25..50.75 A, pseudo-beta mask, aatype one-hots of both residues, unit vector in the local frame,
backbone mask), embeds them and mixes them into the single/pair representation with attention.
Everything is computed exactly like the official code (including its float32 operation order,
which matters for the degenerate first-residue torsions, see docs/proteus.md).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from . import _rigid
from .layers import Attention, PairTransition, TriangleMultiplication

GLY = 7  # restype index in 'ARNDCQEGHILKMFPSTWYV'
UNK = 20

# Literature positions of the ALA backbone atoms (openfold residue_constants; group 0 = backbone frame,
# O lives in the psi frame, group 3).
_ALA_N = (-0.525, 1.363, 0.000)
_ALA_C = (1.526, -0.000, -0.000)
_ALA_O = (0.627, 1.062, 0.000)


def _psi_default_frame() -> tuple[np.ndarray, np.ndarray]:
    """psi-frame -> backbone-frame transform of ALA, built like openfold (float64, then float32)."""
    n, ca, c = np.array(_ALA_N), np.zeros(3), np.array(_ALA_C)
    ex = c - ca
    ey = ca - n
    ex = ex / np.linalg.norm(ex)
    ey = ey - np.dot(ey, ex) * ex
    ey = ey / np.linalg.norm(ey)
    ez = np.cross(ex, ey)
    return np.stack([ex, ey, ez], axis=1).astype(np.float32), c.astype(np.float32)


_PSI_ROT, _PSI_TRANS = _psi_default_frame()


_CONSTANTS: dict = {}
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)   # torch < 2.3: absent


def _const(name: str, value, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A constant tensor, copied to ``device`` once (each fresh copy from the host is a device sync on a GPU).
    Read-only. Under torch.compile the cached device copy is used too: a constant built inside the compiled
    graph is copied from the host at every call, which a CUDA graph capture refuses (core/step_graph.py). The
    eager first call of a run (no template yet) fills the cache before anything compiles."""
    key = (name, dtype, str(device))
    out = _CONSTANTS.get(key)
    if out is not None:
        return out
    if _is_compiling():
        return torch.as_tensor(value, dtype=dtype, device=device)
    out = _CONSTANTS[key] = torch.as_tensor(value, dtype=dtype).to(device)
    return out


def backbone_atoms(rot: Tensor, trans: Tensor, psi_sin_cos: Tensor | None = None) -> Tensor:
    """Backbone atoms (..., 4, 3) = N, CA, C, O of frames (rot (..., 3, 3), trans (..., 3), Angstrom).

    Ideal ALA geometry. O is placed in the psi frame rotated by ``psi_sin_cos`` (..., 2) = (sin, cos)
    exactly like openfold's ``torsion_angles_to_frames`` (the rotation matrix is built from the raw,
    unnormalised pair). The official Proteus sampler passes all-zero torsions, which collapses O
    onto the C=O axis at 2.153 A from CA along x; that is the default here (``None`` -> zeros).
    """
    dt, dev = trans.dtype, trans.device
    lit_n = _const("ala_n", _ALA_N, dt, dev)
    lit_c = _const("ala_c", _ALA_C, dt, dev)
    lit_o = _const("ala_o", _ALA_O, dt, dev)
    if psi_sin_cos is None:
        psi_sin_cos = trans.new_zeros(trans.shape[:-1] + (2,))
    s, c = psi_sin_cos[..., 0], psi_sin_cos[..., 1]
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    r_alpha = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, c, -s], -1),
                           torch.stack([zero, s, c], -1)], -2)
    psi_rot = _const("psi_rot", _PSI_ROT, dt, dev)
    psi_t = _const("psi_trans", _PSI_TRANS, dt, dev)
    # psi frame to global: r_bb o (default o r_alpha)
    r_psi_bb = psi_rot @ r_alpha
    r_glob = rot @ r_psi_bb
    t_glob = _rigid.rot_vec_mul(rot, psi_t.expand_as(trans)) + trans
    o = _rigid.rot_vec_mul(r_glob, lit_o.expand_as(trans)) + t_glob
    n = _rigid.rot_vec_mul(rot, lit_n.expand_as(trans)) + trans
    cc = _rigid.rot_vec_mul(rot, lit_c.expand_as(trans)) + trans
    return torch.stack([n, trans, cc, o], dim=-2)


def _from_3_points(p_neg_x: Tensor, origin: Tensor, p_xy: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Gram-Schmidt frames, component-wise exactly as openfold ``Rigid.from_3_points``."""
    p_neg_x, origin, p_xy = p_neg_x.unbind(-1), origin.unbind(-1), p_xy.unbind(-1)
    e0 = [c1 - c2 for c1, c2 in zip(origin, p_neg_x)]
    e1 = [c1 - c2 for c1, c2 in zip(p_xy, origin)]
    denom = torch.sqrt(sum(c * c for c in e0) + eps)
    e0 = [c / denom for c in e0]
    dot = sum(c1 * c2 for c1, c2 in zip(e0, e1))
    e1 = [c2 - c1 * dot for c1, c2 in zip(e0, e1)]
    denom = torch.sqrt(sum(c * c for c in e1) + eps)
    e1 = [c / denom for c in e1]
    e2 = [e0[1] * e1[2] - e0[2] * e1[1], e0[2] * e1[0] - e0[0] * e1[2], e0[0] * e1[1] - e0[1] * e1[0]]
    rot = torch.stack([c for tup in zip(e0, e1, e2) for c in tup], dim=-1).unflatten(-1, (3, 3))
    return rot, torch.stack(origin, dim=-1)


def backbone_torsions(atoms: Tensor, atom_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Glycine torsion features from backbone atoms (B, N, 4, 3) [N, CA, C, O] and mask (B, N, 4).

    Returns sin/cos (B, N, 7, 2) and mask (B, N, 7) like openfold ``atom37_to_torsion_angles`` for
    GLY: pre-omega, phi (from the previous residue; zero-padded before the first) and psi (sign
    flipped), chi1-4 degenerate (exactly 0). sin/cos are NOT masked (official behaviour).
    """
    pad = atoms.new_zeros(atoms.shape[:-3] + (1, 4, 3))
    prev = torch.cat([pad, atoms[..., :-1, :, :]], dim=-3)
    mpad = atom_mask.new_zeros(atom_mask.shape[:-2] + (1, 4))
    prev_m = torch.cat([mpad, atom_mask[..., :-1, :]], dim=-2)
    n, ca, c, o = atoms.unbind(-2)
    pn, pca, pc, _ = prev.unbind(-2)
    pre_omega = torch.stack([pca, pc, n, ca], -2)
    phi = torch.stack([pc, n, ca, c], -2)
    psi = torch.stack([n, ca, c, o], -2)
    chi = n[..., None, None, :].expand(*n.shape[:-1], 4, 4, 3)  # GLY: atom index 0 repeated
    pos = torch.cat([pre_omega[..., None, :, :], phi[..., None, :, :], psi[..., None, :, :], chi], dim=-3)
    pre_omega_m = prev_m[..., 1] * prev_m[..., 2] * atom_mask[..., 0] * atom_mask[..., 1]
    phi_m = prev_m[..., 2] * (atom_mask[..., 0] * atom_mask[..., 1] * atom_mask[..., 2])
    psi_m = (atom_mask[..., 0] * atom_mask[..., 1] * atom_mask[..., 2]) * atom_mask[..., 3]
    mask = torch.cat([pre_omega_m[..., None], phi_m[..., None], psi_m[..., None],
                      atom_mask.new_zeros(atom_mask.shape[:-1] + (4,))], dim=-1)
    rot, origin = _from_3_points(pos[..., 1, :], pos[..., 2, :], pos[..., 0, :], eps=1e-8)
    # openfold: frames.invert().apply(p) = R^T p + (-(R^T t))
    rt = rot.transpose(-1, -2)
    rel = _rigid.rot_vec_mul(rt, pos[..., 3, :]) + (-1 * _rigid.rot_vec_mul(rt, origin))
    sc = torch.stack([rel[..., 2], rel[..., 1]], dim=-1)
    sc = sc / torch.sqrt(torch.sum(torch.square(sc), dim=-1, keepdim=True) + 1e-8)
    # psi (torsion 2) flips sign, as openfold's [1, 1, -1, 1, 1, 1, 1] factor; a negation, exact, and no constant
    # tensor (one built inside a compiled graph put a guard on the constant cache, and a recompile behind it)
    return torch.cat([sc[..., :2, :], -sc[..., 2:3, :], sc[..., 3:, :]], dim=-2), mask


def _frames_from_reference(n: Tensor, ca: Tensor, c: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """openfold ``Rigid.make_transform_from_reference`` as shipped with Proteus.

    NOTE: that version writes the lower row of the second rotation into the *first* matrix
    (``c1_rots[..., 2, 0] = -sin_c2; c1_rots[..., 2, 2] = cos_c2``), so the result is in general
    not a rotation. Reproduced on purpose: the template unit-vector feature depends on it.
    """
    translation = -1 * ca
    n = n + translation
    c = c + translation
    cx, cy, cz = c.unbind(-1)
    norm = torch.sqrt(eps + cx**2 + cy**2)
    sin_c1, cos_c1 = -cy / norm, cx / norm
    c1 = sin_c1.new_zeros(sin_c1.shape + (3, 3))
    c1[..., 0, 0] = cos_c1
    c1[..., 0, 1] = -1 * sin_c1
    c1[..., 1, 0] = sin_c1
    c1[..., 1, 1] = cos_c1
    c1[..., 2, 2] = 1
    norm = torch.sqrt(eps + cx**2 + cy**2 + cz**2)
    sin_c2 = cz / norm
    cos_c2 = torch.sqrt(cx**2 + cy**2) / norm
    c2 = sin_c2.new_zeros(sin_c2.shape + (3, 3))
    c2[..., 0, 0] = cos_c2
    c2[..., 0, 2] = sin_c2
    c2[..., 1, 1] = 1
    c1[..., 2, 0] = -1 * sin_c2  # (sic)
    c1[..., 2, 2] = cos_c2  # (sic)
    c_rots = _rot_matmul(c2, c1)
    n = _rigid.rot_vec_mul(c_rots, n)
    _, ny, nz = n.unbind(-1)
    norm = torch.sqrt(eps + ny**2 + nz**2)
    sin_n, cos_n = -nz / norm, ny / norm
    nr = sin_c2.new_zeros(sin_c2.shape + (3, 3))
    nr[..., 0, 0] = 1
    nr[..., 1, 1] = cos_n
    nr[..., 1, 2] = -1 * sin_n
    nr[..., 2, 1] = sin_n
    nr[..., 2, 2] = cos_n
    rots = _rot_matmul(nr, c_rots).transpose(-1, -2)
    return rots, -1 * translation


def _rot_matmul(a: Tensor, b: Tensor) -> Tensor:
    """3x3 matrix product as explicit sums (openfold ``rot_matmul`` order)."""
    rows = []
    for i in range(3):
        rows.append(torch.stack([a[..., i, 0] * b[..., 0, j] + a[..., i, 1] * b[..., 1, j] + a[..., i, 2] * b[..., 2, j]
                                 for j in range(3)], -1))
    return torch.stack(rows, -2)


def template_features(atoms: Tensor, atom_mask: Tensor, min_bin: float, max_bin: float, no_bins: int,
                      eps: float, inf: float) -> tuple[Tensor, Tensor]:
    """Angle (B, N, 57) and pair (B, N, N, 88) template features of glycine backbones.

    atoms (B, N, 4, 3) Angstrom [N, CA, C, O]; atom_mask (B, N, 4) float (0 for padded residues).
    """
    B, N = atoms.shape[:2]
    tors, tors_mask = backbone_torsions(atoms, atom_mask)
    aat = torch.nn.functional.one_hot(torch.full((B, N), GLY, device=atoms.device), 22).to(atoms.dtype)
    fdt = torch.promote_types(atoms.dtype, torch.float32)  # float32 as official (float64: the tests' reference)
    angle = torch.cat([aat, tors.reshape(B, N, 14), tors.reshape(B, N, 14), tors_mask], dim=-1).to(fdt)
    # pair features; pseudo beta of glycine = CA
    pb = atoms[..., 1, :]
    pb_mask = atom_mask[..., 1]
    pb_mask_2d = pb_mask[..., None] * pb_mask[..., None, :]
    dgram = torch.sum((pb[..., None, :] - pb[..., None, :, :]) ** 2, dim=-1, keepdim=True)
    lower = torch.linspace(min_bin, max_bin, no_bins, device=atoms.device) ** 2
    upper = torch.cat([lower[:-1], torch.full((1,), inf, dtype=lower.dtype, device=lower.device)], dim=-1)
    dgram = ((dgram > lower) * (dgram < upper)).to(dgram.dtype)
    rot, tr = _frames_from_reference(atoms[..., 0, :], atoms[..., 1, :], atoms[..., 2, :], eps=eps)
    vec = _rigid.rot_vec_mul(rot[..., :, None, :, :].transpose(-1, -2), tr[..., None, :, :] - tr[..., :, None, :])
    inv_d = torch.rsqrt(eps + torch.sum(vec**2, dim=-1))
    bb = atom_mask[..., 0] * atom_mask[..., 1] * atom_mask[..., 2]
    bb2 = bb[..., None] * bb[..., None, :]
    unit = vec * (inv_d * bb2)[..., None]
    pair = torch.cat([dgram, pb_mask_2d[..., None], aat[:, None, :, :].expand(B, N, N, 22),
                      aat[:, :, None, :].expand(B, N, N, 22), unit, bb2[..., None]], dim=-1)
    return angle, (pair * bb2[..., None]).to(fdt)


class TemplateAngleEmbedder(nn.Module):
    def __init__(self, c_in: int, c_out: int, **_):
        super().__init__()
        self.linear_1 = nn.Linear(c_in, c_out)
        self.linear_2 = nn.Linear(c_out, c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(torch.relu(self.linear_1(x)))


class TemplatePairEmbedder(nn.Module):
    def __init__(self, c_in: int, c_out: int, **_):
        super().__init__()
        self.linear = nn.Linear(c_in, c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


class TemplatePairStack(nn.Module):
    """openfold ``LightTemplatePairStackBlock``: tri-mul out/in, pair transition, final LayerNorm."""

    def __init__(self, c_t: int, c_hidden_tri_mul: int, pair_transition_n: int, **_):
        super().__init__()
        self.tri_mul_out = TriangleMultiplication(c_t, c_hidden_tri_mul, outgoing=True)
        self.tri_mul_in = TriangleMultiplication(c_t, c_hidden_tri_mul, outgoing=False)
        self.pair_transition = PairTransition(c_t, pair_transition_n)
        self.layer_norm = nn.LayerNorm(c_t)

    def forward(self, t: Tensor, pair_mask: Tensor) -> Tensor:
        """t (B, T, N, N, C), pair_mask (B, N, N)."""
        m = pair_mask[:, None]
        t = t + self.tri_mul_out(t, m)
        t = t + self.tri_mul_in(t, m)
        t = t + self.pair_transition(t, m)
        return self.layer_norm(t)


class TemplatePointwiseAttention(nn.Module):
    def __init__(self, c_t: int, c_z: int, c_hidden: int, no_heads: int, inf: float, **_):
        super().__init__()
        self.inf = inf
        self.mha = Attention(c_z, c_t, c_t, c_hidden, no_heads, gating=False)

    def forward(self, t: Tensor, z: Tensor, template_mask: Tensor) -> Tensor:
        """t (B, T, N, N, C_t), z (B, N, N, C_z), template_mask (B, T) -> (B, N, N, C_z)."""
        bias = self.inf * (template_mask[..., None, None, None, None, :] - 1)
        out = self.mha(z.unsqueeze(-2), t.permute(0, 2, 3, 1, 4), [bias])
        return out.squeeze(-2)


class TemplateColumnWiseAttention(nn.Module):
    def __init__(self, c_in: int, c_hidden: int, no_heads: int, inf: float = 1e9, **_):
        super().__init__()
        self.inf = inf
        self.mha = Attention(c_in, c_in, c_in, c_hidden, no_heads, gating=True)

    def forward(self, t: Tensor, s: Tensor, template_mask: Tensor) -> Tensor:
        """t (B, T, N, C_s), s (B, N, C_s), template_mask (B, T) -> (B, N, C_s)."""
        bias = self.inf * (template_mask[..., None, None, None, :] - 1)
        return self.mha(s.unsqueeze(-2), t.permute(0, 2, 1, 3), [bias]).squeeze(-2)


class TemplateCrossEmbedder(nn.Module):
    def __init__(self, conf: dict):
        super().__init__()
        self.template_pointwise_att = TemplatePointwiseAttention(**conf["template_pointwise_attention"])
        self.template_columnwise_attention = TemplateColumnWiseAttention(**conf["template_column_wise_attention"])

    def forward(self, t_s: Tensor, t_z: Tensor, s: Tensor, z: Tensor, template_mask: Tensor) -> tuple[Tensor, Tensor]:
        return (self.template_columnwise_attention(t_s, s, template_mask),
                self.template_pointwise_att(t_z, z, template_mask))


class TemplateEmbedder(nn.Module):
    """Embeds the self-conditioning template (previous prediction's backbone atoms)."""

    def __init__(self, conf: dict):
        super().__init__()
        self.conf = conf
        c_s, c_z, c_t = conf["c_s"], conf["c_z"], conf["c_t"]
        # self_condition_s/_z would mix in the previous latent embeddings; the official sampler never
        # provides them, so they are unused (kept for checkpoint compatibility).
        self.self_condition_s = nn.Linear(c_s, c_s)
        self.self_condition_z = nn.Linear(c_z, c_t)
        self.template_angle_embedder = TemplateAngleEmbedder(**conf["template_angle_embedder"])
        self.template_pair_embedder = TemplatePairEmbedder(**conf["template_pair_embedder"])
        self.template_pair_stack = TemplatePairStack(**conf["template_pair_stack"])
        self.template_cross_embedder = TemplateCrossEmbedder(conf["template_cross_embedder"])

    def forward(self, node_embed: Tensor, edge_embed: Tensor, res_mask: Tensor,
                template_atoms: Tensor | None, template_atom_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Returns the (single, pair) updates; zeros when there is no template."""
        if template_atoms is None:
            return torch.zeros_like(node_embed), torch.zeros_like(edge_embed)
        m = res_mask.to(node_embed.dtype)
        pair_mask = m[:, :, None] * m[:, None, :]
        d = self.conf["distogram"]
        angle, pair = template_features(template_atoms, template_atom_mask, d["min_bin"], d["max_bin"],
                                        d["no_bins"], eps=self.conf["eps"], inf=self.conf["inf"])
        t_s = self.template_angle_embedder(angle[:, None])
        t_z = self.template_pair_embedder(pair[:, None])
        t_z = self.template_pair_stack(t_z, pair_mask)
        tmask = node_embed.new_ones(node_embed.shape[0], 1)
        return self.template_cross_embedder(t_s, t_z, node_embed, edge_embed, tmask)
