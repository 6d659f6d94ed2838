"""Backbone refinement: rigid residues moved to ideal trans-peptide geometry and out of clashes.

The embedded models place each residue as a rigid frame, so N-CA-C inside a residue is always ideal; what they get
wrong is the link between residues. On the unguided defaults the median peptide C-N bond is 1.18 Angstrom (ideal
1.33) and 4-10 % of consecutive CA-CA distances fall outside 3.6-4.0 Angstrom (models/checkpoints/README.md).
:func:`refine_backbone` moves every residue rigidly (a rotation about its CA and a translation) to minimise

* the peptide term: for each link ``i -> i+1`` the four distances C_i-N_i+1, CA_i-N_i+1, C_i-CA_i+1 and
  CA_i-CA_i+1 against those of a planar trans peptide built on the residues' own ideal geometry
  (:func:`peptide_targets`). With the residues rigid, these four distances fix the whole peptide unit (bond
  lengths, both bond angles and omega = 180 degrees), leaving phi and psi free;
* planarity: the signed volume of CA_i->C_i, C_i->N_i+1, N_i+1->CA_i+1, squared (the distances alone barely
  sense omega near 180 degrees);
* the clash energy of :func:`~superdiff_protein.frames.clash.clash_energy`: CA pairs at ``|i - j| >= min_sep``
  pushed to at least ``d0`` apart; and backbone atoms (N, CA, C, O) of residues two or more apart pushed to at
  least ``bb_d0`` apart (both over neighbour lists with a margin, renewed every chunk of evaluations; the stopping
  check looks at every pair).

Minimised by L-BFGS in float64 (autograd through the frames). :func:`refine_backbones` refines many chains in one
vectorised L-BFGS (:mod:`~superdiff_protein.frames.batch_lbfgs`, energy in :mod:`~superdiff_protein.frames.
refine_energy`); each chain's result is bitwise the one it gets alone, and :func:`refine_backbone` is the batch of
one. Psi is then read from the moved atoms (N_i, CA_i, C_i, N_i+1), so the carbonyl O lies in the peptide plane, trans to the next N; the last residue keeps
the psi it was given. A refinement moves CAs by a few tenths of an Angstrom on typical samples (more where it has
to undo clashes), and this is reported with each call, not hidden.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .batch_lbfgs import minimize_rows
from .clash import far_pairs
from .geometry import IDEAL_BACKBONE_LOCAL, backbone_atoms_from_frames, dihedral_angle
from .refine_energy import ChainBatch, batch_atoms, batch_energy, batch_frames

__all__ = ["PEPTIDE_C_N", "PEPTIDE_CA_C_N_DEG", "PEPTIDE_C_N_CA_DEG", "PeptideTargets", "RefineResult",
           "peptide_targets", "refine_backbone", "refine_backbones"]

#: Engh & Huber (1991) peptide bond length (Angstrom) and the two bond angles at it (degrees).
PEPTIDE_C_N = 1.329
PEPTIDE_CA_C_N_DEG = 116.2
PEPTIDE_C_N_CA_DEG = 121.7


@dataclass(frozen=True)
class PeptideTargets:
    """Distances (Angstrom) across one planar trans peptide link ``i -> i+1``."""

    c_n: float
    ca_n: float
    c_ca: float
    ca_ca: float


def _rot2(v: tuple[float, float], deg: float) -> tuple[float, float]:
    a = math.radians(deg)
    return (v[0] * math.cos(a) - v[1] * math.sin(a), v[0] * math.sin(a) + v[1] * math.cos(a))


def peptide_targets() -> PeptideTargets:
    """The link distances of a planar trans peptide, built in 2D from :data:`PEPTIDE_C_N`, the two angles, and
    the CA-C and N-CA lengths of :data:`~superdiff_protein.frames.geometry.IDEAL_BACKBONE_LOCAL` (so the targets
    are reachable with the rigid residues the models produce). CA-CA comes out at 3.80 Angstrom."""
    ca_c = math.dist(IDEAL_BACKBONE_LOCAL["CA"], IDEAL_BACKBONE_LOCAL["C"])
    n_ca = math.dist(IDEAL_BACKBONE_LOCAL["N"], IDEAL_BACKBONE_LOCAL["CA"])
    ca = (-ca_c, 0.0)                                                   # C at the origin, CA_i on -x
    u = _rot2((-1.0, 0.0), -PEPTIDE_CA_C_N_DEG)                        # unit C -> N_i+1
    n = (PEPTIDE_C_N * u[0], PEPTIDE_C_N * u[1])
    back = (-u[0], -u[1])                                               # unit N_i+1 -> C
    cands = []
    for sign in (1.0, -1.0):
        w = _rot2(back, sign * PEPTIDE_C_N_CA_DEG)
        cands.append((n[0] + n_ca * w[0], n[1] + n_ca * w[1]))
    ca2 = max(cands, key=lambda p: math.dist(p, ca))                   # trans: CA_i+1 across the C-N bond from CA_i
    return PeptideTargets(c_n=PEPTIDE_C_N, ca_n=math.dist(ca, n), c_ca=math.dist((0.0, 0.0), ca2),
                          ca_ca=math.dist(ca, ca2))


@dataclass
class RefineResult:
    """A refined backbone: frames ``rot`` (N, 3, 3), ``trans`` (N, 3) Angstrom, ``psi`` (N, 2) as (sin, cos), with
    ``iters`` (L-BFGS function evaluations), ``peptide_max_dev`` (largest link-distance error, Angstrom),
    ``min_far_ca`` (closest CA pair at ``|i - j| >= min_sep``, Angstrom; inf if none), ``ca_rmsd`` (CA
    displacement, Angstrom, no superposition) and ``converged`` (every stopping criterion met). A chain whose
    segments pass through each other cannot be untangled by local moves; it ends unconverged, and says so."""

    rot: Tensor
    trans: Tensor
    psi: Tensor
    iters: int
    peptide_max_dev: float
    min_far_ca: float
    ca_rmsd: float
    converged: bool = True

    def summary(self) -> str:
        """One line for a PDB remark or a log: what the refinement did, and how far it is off if it stopped early."""
        head = f"refined: CA moved {self.ca_rmsd:.2f} A rms"
        if self.converged:
            return head + ", links ideal, no clashes"
        return (head + f", NOT converged in {self.iters} evaluations: largest link error {self.peptide_max_dev:.2f} A, "
                f"closest far CA pair {self.min_far_ca:.2f} A")


def _link_distances(atoms: Tensor) -> Tensor:
    """(N-1, 4) distances C_i-N_i+1, CA_i-N_i+1, C_i-CA_i+1, CA_i-CA_i+1 of backbone atoms (N, 4, 3)."""
    n, ca, c = atoms[:, 0], atoms[:, 1], atoms[:, 2]
    pairs = ((c[:-1], n[1:]), (ca[:-1], n[1:]), (c[:-1], ca[1:]), (ca[:-1], ca[1:]))
    return torch.stack([(a - b).norm(dim=-1) for a, b in pairs], -1)


def _omega_dev(atoms: Tensor) -> float:
    """Largest ``|omega - 180 deg|`` (radians) of a backbone (N, 4, 3)."""
    om = dihedral_angle(atoms[:-1, 1], atoms[:-1, 2], atoms[1:, 0], atoms[1:, 1])
    return float((math.pi - om.abs()).max())


def _min_far(ca: Tensor, min_sep: int) -> float:
    far = far_pairs(ca.shape[0], min_sep, ca.device)
    return float(torch.cdist(ca, ca)[far].min()) if bool(far.any()) else math.inf


def _with_planar_o(a: Tensor) -> Tensor:
    """Backbone atoms (N, 4, 3) with each O but the last put in its peptide plane: 1.231 Angstrom from C along
    the outer bisector of CA_i-C_i-N_i+1 (the optimiser's stand-in for the O placed from psi at the end)."""
    c = a[:-1, 2]
    u1 = a[:-1, 1] - c
    u2 = a[1:, 0] - c
    u = u1 / u1.norm(dim=-1, keepdim=True) + u2 / u2.norm(dim=-1, keepdim=True)
    o = c - 1.231 * u / u.norm(dim=-1, keepdim=True)
    return torch.cat([a[:, :3], torch.cat([o, a[-1:, 3]], 0)[:, None]], 1)


def _atom_pairs(a: Tensor, cutoff: float, sep: int = 2) -> tuple[Tensor, Tensor]:
    """Flat indices ``(i, j)`` (each pair once) of backbone atom pairs (atoms (N, 4, 3) flattened to (4N, 3)) of
    residues ``>= sep`` apart that are closer than ``cutoff``: the neighbour list of the atom clash term."""
    n = a.shape[0]
    flat = a.detach().reshape(-1, 3)
    res = torch.arange(n).repeat_interleave(4)
    near = (torch.cdist(flat, flat) < cutoff) & ((res[:, None] - res[None, :]) >= sep)
    i, j = near.nonzero(as_tuple=True)
    return i, j


def _ca_pairs(ca: Tensor, cutoff: float, min_sep: int) -> tuple[Tensor, Tensor]:
    """Residue indices ``(i, j)``, ``j - i >= min_sep``, of CA pairs closer than ``cutoff``: the neighbour list
    of the CA clash term."""
    near = (torch.cdist(ca, ca) < cutoff) & torch.triu(far_pairs(ca.shape[0], min_sep), 1)
    i, j = near.nonzero(as_tuple=True)
    return i, j


def _atom_overlap(a: Tensor, bb_d0: float, pairs: tuple[Tensor, Tensor]) -> Tensor:
    """``(bb_d0 - d)_+`` over the listed backbone atom pairs."""
    flat = a.reshape(-1, 3)
    i, j = pairs
    return torch.clamp(bb_d0 - (flat[i] - flat[j]).norm(dim=-1), min=0.0)


_CA_MARGIN = 3.0     # Angstrom beyond d0 (CA pairs) and bb_d0 (atom pairs) that the neighbour lists look
_ATOM_MARGIN = 2.0   # (renewed every chunk; the convergence check uses every pair)


@contextmanager
def _one_thread():
    """Tiny tensors: intra-op threads only add synchronisation (and on a loaded host, far more)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def refine_backbone(rot: Tensor, trans: Tensor, psi: Tensor | None = None, *, d0: float = 4.0, min_sep: int = 3,
                    bb_d0: float = 2.7, max_iters: int = 500, tol: float = 0.01, omega_tol_deg: float = 2.0,
                    chunk: int = 25) -> RefineResult:
    """Refine one chain's frames (module docstring). ``rot`` (N, 3, 3), ``trans`` (N, 3) in Angstrom, ``psi``
    (N, 2) or None (O placed at psi = pi for the last residue), on any device. Works in float64 on the CPU and
    returns float64 CPU tensors.
    Stops when every link distance is within ``tol`` Angstrom of its target, every omega within ``omega_tol_deg``
    of 180 degrees, no counted CA pair is closer than ``d0 - tol`` and no backbone atom pair of residues two or more
    apart closer than ``bb_d0 - tol`` (checked every ``chunk`` L-BFGS function evaluations), or after
    ``max_iters`` evaluations (then the result is the point reached, and its fields say how close it got).
    The same as :func:`refine_backbones` of this one chain, which gives it bitwise in any batch."""
    return refine_backbones([(rot, trans, psi)], d0=d0, min_sep=min_sep, bb_d0=bb_d0, max_iters=max_iters, tol=tol,
                            omega_tol_deg=omega_tol_deg, chunk=chunk)[0]


def refine_backbones(chains: Sequence[tuple[Tensor, Tensor, Tensor | None]], *, d0: float = 4.0, min_sep: int = 3,
                     bb_d0: float = 2.7, max_iters: int = 500, tol: float = 0.01, omega_tol_deg: float = 2.0,
                     chunk: int = 25) -> list[RefineResult]:
    """Refine several chains ``(rot, trans, psi)`` at once (as :func:`refine_backbone` each): one vectorised
    L-BFGS (:func:`~superdiff_protein.frames.batch_lbfgs.minimize_rows`) with per-chain history, line search,
    neighbour list and stop. Each chain's result is bitwise the one it gets alone, whatever the other chains
    (their number, lengths, contents or order): the energy (:mod:`~superdiff_protein.frames.refine_energy`) uses
    only elementwise arithmetic and per-chain sums in index order."""
    cpu = torch.device("cpu")                         # a few hundred atoms: CPU float64, whatever the model ran on
    prep = []
    for rot, trans, psi in chains:
        R0 = rot.detach().to(cpu, torch.float64)
        T = trans.detach().to(cpu, torch.float64)
        centre = T.mean(0)
        prep.append((R0, T - centre, None if psi is None else psi.detach().to(cpu, torch.float64), centre))
    tgt = peptide_targets()
    target = torch.tensor([tgt.c_n, tgt.ca_n, tgt.c_ca, tgt.ca_ca], dtype=torch.float64)
    work = [k for k, p in enumerate(prep) if p[1].shape[0] > 1]
    x = evals = None
    conv = torch.zeros(len(work), dtype=torch.bool)
    if work:
        cb = ChainBatch.build([prep[k][:3] for k in work], min_sep)
        empty = (torch.zeros(0, dtype=torch.long),) * 2
        ca_lists: list[tuple[Tensor, Tensor]] = [empty for _ in work]
        atom_lists: list[tuple[Tensor, Tensor]] = [empty for _ in work]

        def atoms(rows: list[int], xr: Tensor) -> list[Tensor]:
            a = batch_atoms(xr, cb.rows(torch.tensor(rows)))
            return [a[r, :cb.lengths[b]] for r, b in enumerate(rows)]

        def renew(rows: list[int], xr: Tensor) -> None:          # the neighbour lists, with a margin
            for b, a in zip(rows, atoms(rows, xr)):
                ca_lists[b] = _ca_pairs(a[:, 1], d0 + _CA_MARGIN, min_sep)
                atom_lists[b] = _atom_pairs(_with_planar_o(a), bb_d0 + _ATOM_MARGIN)
            cb.set_pairs(ca_lists, atom_lists)

        def check(rows: list[int], xr: Tensor) -> list[bool]:
            out = []
            for a in atoms(rows, xr):
                ao = _with_planar_o(a)
                full = _atom_pairs(ao, bb_d0)
                bb_over = float(_atom_overlap(ao, bb_d0, full).max()) if len(full[0]) else 0.0
                out.append(float((_link_distances(a) - target).abs().max()) <= tol
                           and _min_far(a[:, 1], min_sep) >= d0 - tol and bb_over <= tol
                           and _omega_dev(a) <= math.radians(omega_tol_deg))
            return out

        def fun(xr: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
            with torch.enable_grad():
                xr = xr.detach().requires_grad_(True)
                e = batch_energy(xr, cb.rows(rows), (tgt.c_n, tgt.ca_n, tgt.c_ca, tgt.ca_ca), d0, bb_d0)
                (g,) = torch.autograd.grad(e.sum(), xr)
            return e.detach(), g

        P = max(cb.lengths)
        with _one_thread():
            res = minimize_rows(fun, torch.zeros(len(work), 6 * P, dtype=torch.float64), max_evals=max_iters,
                                chunk=chunk, renew=renew, check=check)
        x, evals, conv = res.x, res.evals, res.converged
        Rb, Tb = batch_frames(x, cb)
    out: list[RefineResult] = []
    for k, (R0, T0, psi0, centre) in enumerate(prep):
        N = T0.shape[0]
        last = psi0[-1:] if psi0 is not None else torch.tensor([[0.0, -1.0]], dtype=torch.float64)
        if N <= 1:
            out.append(RefineResult(rot=R0, trans=T0 + centre, psi=last, iters=0, peptide_max_dev=0.0,
                                    min_far_ca=math.inf, ca_rmsd=0.0, converged=True))
            continue
        b = work.index(k)
        R, T = Rb[b, :N], Tb[b, :N]
        a = backbone_atoms_from_frames(R, T, psi0)
        ang = dihedral_angle(a[:-1, 0], a[:-1, 1], a[:-1, 2], a[1:, 0])
        new_psi = torch.cat([torch.stack([torch.sin(ang), torch.cos(ang)], -1), last], 0)
        out.append(RefineResult(rot=R, trans=T + centre, psi=new_psi, iters=int(evals[b]),
                                peptide_max_dev=float((_link_distances(a) - target).abs().max()),
                                min_far_ca=_min_far(T, min_sep), ca_rmsd=float((T - T0).pow(2).sum(-1).mean().sqrt()),
                                converged=bool(conv[b])))
    return out
