"""The refinement energy of a batch of chains (frames/refine.py), written so that each chain's value and gradient
are bitwise those it has alone.

Chains are padded to a common length P with a residue mask; the parameters of chain b are ``x[b]`` = (P, 6):
a rotation vector ``w`` and a translation ``dT`` per residue. Every tensor that carries a gradient has the shape
(b, P) (or (b, P-1) for links, (b, K) for atom pairs), one tensor per Cartesian component: 3x3 products and dot
products are written out as elementwise sums, sums over residues or pairs use :func:`~superdiff_protein.frames.
batch_lbfgs.rowsum` (index order, unchanged by padding), and nothing is broadcast, so no kernel (matmul, cdist, a
broadcast's reduction in the backward pass) ever blocks its work by the batch's shape. The clash terms use
per-chain pair lists (gather; the backward's scatter-add runs through each row in index order). Masked
entries are replaced before every square root, so padding gets exactly zero gradient and never a NaN.

The residue rotation is ``Q(w) R0`` with ``Q`` the rotation of the quaternion ``(1, w/2)`` (a Cayley map: a
rotation by ``|w|`` to first order, rational in ``w``: no sin/cos, whose vectorised and scalar kernels may
round differently).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .batch_lbfgs import rowsum
from .geometry import IDEAL_BACKBONE_LOCAL, backbone_atoms_from_frames

__all__ = ["ChainBatch", "batch_energy", "batch_frames", "batch_atoms"]

Vec = tuple[Tensor, Tensor, Tensor]
_O_DIST = 1.231                                            # C=O (Angstrom), as refine._with_planar_o


def _mv(M: list[list[Tensor]], u: Vec) -> Vec:
    return tuple(M[i][0] * u[0] + M[i][1] * u[1] + M[i][2] * u[2] for i in range(3))  # type: ignore[return-value]


def _sub(a: Vec, b: Vec) -> Vec:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])


def _add(a: Vec, b: Vec) -> Vec:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def _sq(a: Vec) -> Tensor:
    return a[0] * a[0] + a[1] * a[1] + a[2] * a[2]


def _norm(a: Vec, mask: Tensor) -> Tensor:
    """|a| where ``mask``, 1 elsewhere (so masked entries never meet sqrt(0) in the backward pass)."""
    return torch.sqrt(torch.where(mask, _sq(a), torch.ones_like(a[0])).clamp_min(1e-30))


def _cut(a: Vec, lo: int | None, hi: int | None) -> Vec:
    return (a[0][:, lo:hi], a[1][:, lo:hi], a[2][:, lo:hi])


def _quat(w: Vec) -> list[list[Tensor]]:
    """Rotation matrix (3x3 list of (b, P) tensors) of the quaternion (1, w/2), not normalised."""
    b, c, d = w[0] * 0.5, w[1] * 0.5, w[2] * 0.5
    bb, cc, dd = b * b, c * c, d * d
    s = 1.0 + bb + cc + dd
    bc, bd, cd = b * c, b * d, c * d
    return [[(1.0 + bb - cc - dd) / s, 2.0 * (bc - d) / s, 2.0 * (bd + c) / s],
            [2.0 * (bc + d) / s, (1.0 - bb + cc - dd) / s, 2.0 * (cd - b) / s],
            [2.0 * (bd - c) / s, 2.0 * (cd + b) / s, (1.0 - bb - cc + dd) / s]]


@dataclass
class ChainBatch:
    """The fixed data of a batch of chains, padded to P residues: ``R0`` (B, P, 3, 3) and ``T0`` (B, P, 3) start
    frames (padding: identity, far apart on a line), ``uN``, ``uC``, ``uO`` (B, P, 3) = ``R0`` times the local N, C
    and psi-placed O, ``mask`` (B, P) real residues, ``last`` (B, P) the last real residue, ``lengths``; the
    neighbour lists (renewed by the caller): CA pairs ``ci``, ``cj``, ``cm`` (B, Kc) of the clash term (residue
    indices), atom pairs ``pi``, ``pj``, ``pm`` (B, K) (flat atom indices 4 * residue + (N, CA, C, O)); the masks
    are False on padding."""

    R0: Tensor
    T0: Tensor
    uN: Tensor
    uC: Tensor
    uO: Tensor
    mask: Tensor
    last: Tensor
    lengths: list[int]
    ci: Tensor
    cj: Tensor
    cm: Tensor
    pi: Tensor
    pj: Tensor
    pm: Tensor

    @classmethod
    def build(cls, chains: list[tuple[Tensor, Tensor, Tensor | None]], min_sep: int) -> "ChainBatch":
        """From chains ``(R0 (L, 3, 3), T0 (L, 3), psi (L, 2) or None)`` in float64 (T0 centred)."""
        B, P = len(chains), max(c[1].shape[0] for c in chains)
        f64 = torch.float64
        R0 = torch.eye(3, dtype=f64).repeat(B, P, 1, 1)
        T0 = torch.zeros(B, P, 3, dtype=f64)
        T0[:, :, 0] = 1e4 + 10.0 * torch.arange(P, dtype=f64)
        oloc = torch.zeros(B, P, 3, dtype=f64)
        mask = torch.zeros(B, P, dtype=torch.bool)
        last = torch.zeros(B, P, dtype=torch.bool)
        lengths = []
        for b, (R, T, psi) in enumerate(chains):
            L = T.shape[0]
            R0[b, :L], T0[b, :L], mask[b, :L], last[b, L - 1] = R, T, True, True
            eye = torch.eye(3, dtype=f64).expand(L, 3, 3)
            oloc[b, :L] = backbone_atoms_from_frames(eye, torch.zeros(L, 3, dtype=f64), psi)[:, 3]
            lengths.append(L)
        Rl = [[R0[..., i, j] for j in range(3)] for i in range(3)]

        def rotated(loc) -> Tensor:
            return torch.stack(_mv(Rl, loc), -1)

        n, c = IDEAL_BACKBONE_LOCAL["N"], IDEAL_BACKBONE_LOCAL["C"]
        one, no = torch.ones(B, 1, dtype=torch.long), torch.zeros(B, 1, dtype=torch.bool)
        return cls(R0=R0, T0=T0, uN=rotated(n), uC=rotated(c),
                   uO=rotated((oloc[..., 0], oloc[..., 1], oloc[..., 2])), mask=mask, last=last, lengths=lengths,
                   ci=0 * one, cj=one, cm=no, pi=0 * one, pj=one, pm=no)

    def set_pairs(self, ca_pairs: list[tuple[Tensor, Tensor]], atom_pairs: list[tuple[Tensor, Tensor]]) -> None:
        """The CA and atom pair lists of all chains ((i, j) each), padded with the masked pair (0, 1)."""
        self.ci, self.cj, self.cm = _pad_pairs(ca_pairs)
        self.pi, self.pj, self.pm = _pad_pairs(atom_pairs)
        self._cache: tuple | None = None

    def rows(self, rows: Tensor) -> "ChainBatch":
        """The chains ``rows`` (LongTensor) as a batch of their own (same padding; cached until the lists change)."""
        key = tuple(rows.tolist())
        cache = getattr(self, "_cache", None)
        if cache is not None and cache[0] == key:
            return cache[1]
        sel = {k: getattr(self, k)[rows] for k in ("R0", "T0", "uN", "uC", "uO", "mask", "last", "ci", "cj", "cm",
                                                  "pi", "pj", "pm")}
        sub = replace(self, lengths=[self.lengths[r] for r in key], **sel)
        self._cache = (key, sub)
        return sub


def _pad_pairs(pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    K = max(1, max(len(i) for i, _ in pairs))
    B = len(pairs)
    pi, pj = torch.zeros(B, K, dtype=torch.long), torch.ones(B, K, dtype=torch.long)
    pm = torch.zeros(B, K, dtype=torch.bool)
    for b, (i, j) in enumerate(pairs):
        pi[b, :len(i)], pj[b, :len(j)], pm[b, :len(i)] = i, j, True
    return pi, pj, pm


def _split(v: Tensor) -> Vec:
    return (v[..., 0], v[..., 1], v[..., 2])


def _moved(x: Tensor, cb: ChainBatch) -> tuple[list[list[Tensor]], Vec]:
    X = x.reshape(x.shape[0], -1, 6)
    Q = _quat((X[..., 0], X[..., 1], X[..., 2]))
    T = _add(_split(cb.T0), (X[..., 3], X[..., 4], X[..., 5]))
    return Q, T


def batch_frames(x: Tensor, cb: ChainBatch) -> tuple[Tensor, Tensor]:
    """The frames ``Q(w) R0`` (B, P, 3, 3) and ``T0 + dT`` (B, P, 3) at parameters ``x`` (B, 6P)."""
    Q, T = _moved(x, cb)
    R0 = [[cb.R0[..., i, j] for j in range(3)] for i in range(3)]
    R = [[Q[i][0] * R0[0][k] + Q[i][1] * R0[1][k] + Q[i][2] * R0[2][k] for k in range(3)] for i in range(3)]
    return torch.stack([torch.stack(row, -1) for row in R], -2), torch.stack(T, -1)


def _atoms(x: Tensor, cb: ChainBatch) -> tuple[Vec, Vec, Vec, Vec]:
    Q, T = _moved(x, cb)
    return _add(_mv(Q, _split(cb.uN)), T), T, _add(_mv(Q, _split(cb.uC)), T), _add(_mv(Q, _split(cb.uO)), T)


def batch_atoms(x: Tensor, cb: ChainBatch) -> Tensor:
    """Backbone atoms N, CA, C, O (B, P, 4, 3) at ``x``, O placed from the chains' psi (as
    :func:`~superdiff_protein.frames.geometry.backbone_atoms_from_frames`)."""
    return torch.stack([torch.stack(a, -1) for a in _atoms(x, cb)], -2)


def batch_energy(x: Tensor, cb: ChainBatch, target: tuple[float, float, float, float], d0: float,
                 bb_d0: float) -> Tensor:
    """The refinement energy of every chain, (B,), at ``x`` (B, 6P): link distances against ``target`` (C-N,
    CA-N, C-CA, CA-CA), planarity, ``1/2 (bb_d0 - d)_+^2`` over the atom pair list (O of every residue but the
    last on the outer bisector of CA-C-N) and ``1/2 (d0 - d)_+^2`` over the CA pair list (frames/refine.py's module
    docstring)."""
    N, CA, C, Opsi = _atoms(x, cb)
    lm = cb.mask[:, 1:]                                   # links i -> i+1 inside the chain
    Ni, CAi, Ci = _cut(N, None, -1), _cut(CA, None, -1), _cut(C, None, -1)
    Nn, CAn = _cut(N, 1, None), _cut(CA, 1, None)
    e = None
    for (a, b), tgt in zip(((Ci, Nn), (CAi, Nn), (Ci, CAn), (CAi, CAn)), target):
        dev = _norm(_sub(a, b), lm) - tgt
        e = dev * dev if e is None else e + dev * dev
    u, v, w = _sub(Ci, CAi), _sub(Nn, Ci), _sub(CAn, Nn)
    vol = (u[1] * v[2] - u[2] * v[1]) * w[0] + (u[2] * v[0] - u[0] * v[2]) * w[1] + (u[0] * v[1] - u[1] * v[0]) * w[2]
    e = e + vol * vol
    e_link = rowsum(torch.where(lm, e, torch.zeros_like(e)))
    # planar O on the outer bisector of CA_i-C_i-N_i+1; the last residue keeps its psi-placed O
    u1, u2 = _sub(CAi, Ci), _sub(Nn, Ci)
    n1, n2 = _norm(u1, lm), _norm(u2, lm)
    bis = (u1[0] / n1 + u2[0] / n2, u1[1] / n1 + u2[1] / n2, u1[2] / n1 + u2[2] / n2)
    nb = _norm(bis, lm)
    Opl = tuple(Ci[k] - _O_DIST * bis[k] / nb for k in range(3))
    O = tuple(torch.where(cb.last, Opsi[k], torch.cat([Opl[k], Opsi[k][:, -1:]], 1)) for k in range(3))
    B = x.shape[0]
    flat = [torch.stack([N[k], CA[k], C[k], O[k]], 2).reshape(B, -1) for k in range(3)]
    diff = tuple(torch.gather(flat[k], 1, cb.pi) - torch.gather(flat[k], 1, cb.pj) for k in range(3))
    over = torch.where(cb.pm, torch.clamp(bb_d0 - _norm(diff, cb.pm), min=0.0), torch.zeros_like(diff[0]))
    e_atom = rowsum(over * over)
    cd = tuple(torch.gather(CA[k], 1, cb.ci) - torch.gather(CA[k], 1, cb.cj) for k in range(3))
    cover = torch.where(cb.cm, torch.clamp(d0 - _norm(cd, cb.cm), min=0.0), torch.zeros_like(cd[0]))
    return (e_link + 0.5 * e_atom) + 0.5 * rowsum(cover * cover)
