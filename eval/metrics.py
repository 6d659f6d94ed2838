"""Per-structure metrics: optimal superposition (Kabsch) RMSD, TM-score (TM-align via tmtools),
secondary structure fractions (P-SEA via biotite) and geometry sanity checks.

All RMSD maths is in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .io import Backbone

#: Consecutive CA-CA distance window counted as ideal (trans peptide ~3.80 A).
CA_CA_WINDOW = (3.6, 4.0)
#: A consecutive CA-CA distance above this is a chain break.
CHAIN_BREAK = 4.2
#: CA-CA clash: two CAs at least ``CA_CLASH_SEP`` apart in sequence closer than this (A).
CA_CLASH_DIST = 3.0
CA_CLASH_SEP = 3
#: Peptide C(i)-N(i+1) bond window counted as ideal: Engh & Huber's 1.329 A +- 0.1 A (about 7 of their standard
#: deviations, 0.014 A): it flags broken links, not refinement-level strain.
C_N_WINDOW = (1.229, 1.429)
#: Backbone heavy-atom clash: N/CA/C/O atoms of residues >= ``BB_CLASH_SEP`` apart closer than this (A).
#: Chosen below the shortest N-H...O=C hydrogen-bond N-O distance (~2.6 A) so H-bonds never count.
BB_CLASH_DIST = 2.2
BB_CLASH_SEP = 2


def kabsch(mobile: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optimal proper rotation ``R`` and translation ``t`` with ``R @ mobile_i + t ~ target_i``
    (least squares, float64). Inputs are ``(N, 3)`` with corresponding rows."""
    p = np.asarray(mobile, dtype=np.float64)
    q = np.asarray(target, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"kabsch needs two (N, 3) arrays of equal shape, got {p.shape} and {q.shape}")
    pc, qc = p.mean(0), q.mean(0)
    h = (p - pc).T @ (q - qc)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    if d == 0:
        d = 1.0
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return r, qc - r @ pc


def superposed_rmsd(mobile: np.ndarray, target: np.ndarray) -> float:
    """RMSD after optimal rigid superposition of corresponding points (rows with NaN are ignored)."""
    p = np.asarray(mobile, dtype=np.float64)
    q = np.asarray(target, dtype=np.float64)
    ok = np.isfinite(p).all(-1) & np.isfinite(q).all(-1)
    p, q = p[ok], q[ok]
    if len(p) == 0:
        return float("nan")
    r, t = kabsch(p, q)
    diff = p @ r.T + t - q
    return float(np.sqrt((diff * diff).sum(-1).mean()))


@dataclass
class TMResult:
    tm_norm_1: float  # normalised by the length of the first structure
    tm_norm_2: float  # normalised by the length of the second structure
    rmsd: float  # RMSD over the aligned residues
    aligned_length: int


def _clean_seq(seq: str | None, n: int) -> str:
    if not seq or len(seq) != n:
        return "A" * n
    return "".join(c if c in "ACDEFGHIKLMNPQRSTVWY" else "A" for c in seq)


def tm_align(ca1: np.ndarray, ca2: np.ndarray, seq1: str | None = None, seq2: str | None = None) -> TMResult:
    """TM-align of two CA traces (tmtools). Rows with non-finite coordinates are removed first."""
    import tmtools

    a = np.asarray(ca1, dtype=np.float64)
    b = np.asarray(ca2, dtype=np.float64)
    ka, kb = np.isfinite(a).all(-1), np.isfinite(b).all(-1)
    if seq1 is not None and len(seq1) == len(a):
        seq1 = "".join(np.asarray(list(seq1))[ka])
    if seq2 is not None and len(seq2) == len(b):
        seq2 = "".join(np.asarray(list(seq2))[kb])
    a, b = np.ascontiguousarray(a[ka]), np.ascontiguousarray(b[kb])
    if len(a) < 3 or len(b) < 3:
        return TMResult(0.0, 0.0, float("nan"), 0)
    res = tmtools.tm_align(a, b, _clean_seq(seq1, len(a)), _clean_seq(seq2, len(b)))
    n_aligned = sum(1 for x, y in zip(res.seqxA, res.seqyA) if x != "-" and y != "-") if hasattr(res, "seqxA") else -1
    return TMResult(float(res.tm_norm_chain1), float(res.tm_norm_chain2), float(res.rmsd), int(n_aligned))


def tm_score(sample_ca: np.ndarray, other_ca: np.ndarray, sample_seq: str | None = None,
             other_seq: str | None = None) -> float:
    """TM-score of ``sample`` against ``other`` after TM-align, normalised by the SAMPLE's length."""
    return tm_align(sample_ca, other_ca, sample_seq, other_seq).tm_norm_1


def radius_of_gyration(ca: np.ndarray) -> float:
    """Radius of gyration of the CA atoms (A)."""
    x = np.asarray(ca, dtype=np.float64)
    x = x[np.isfinite(x).all(-1)]
    if len(x) == 0:
        return float("nan")
    return float(np.sqrt(((x - x.mean(0)) ** 2).sum(-1).mean()))


def secondary_structure(ca: np.ndarray, res_ids: np.ndarray | None = None) -> dict[str, float | str]:
    """Helix / strand / coil fractions from biotite's P-SEA annotation (CA only).

    Returns ``helix_frac``, ``strand_frac``, ``coil_frac`` (fractions of residues with an annotation) and
    ``sse`` (the per-residue string of ``a``/``b``/``c``)."""
    import biotite.structure as struc

    ca = np.asarray(ca, dtype=np.float64)
    ok = np.isfinite(ca).all(-1)
    n = int(ok.sum())
    if n == 0:
        return {"helix_frac": float("nan"), "strand_frac": float("nan"), "coil_frac": float("nan"), "sse": ""}
    arr = struc.AtomArray(n)
    arr.coord = ca[ok].astype(np.float32)
    arr.atom_name[:] = "CA"
    arr.element[:] = "C"
    arr.res_name[:] = "ALA"
    arr.chain_id[:] = "A"
    arr.res_id = (np.asarray(res_ids)[ok] if res_ids is not None else np.arange(1, len(ca) + 1)[ok]).astype(int)
    sse = np.asarray(struc.annotate_sse(arr))
    ann = sse[sse != ""]
    m = max(len(ann), 1)
    return {
        "helix_frac": float((ann == "a").sum() / m),
        "strand_frac": float((ann == "b").sum() / m),
        "coil_frac": float((ann == "c").sum() / m),
        "sse": "".join(s if s else "-" for s in sse),
    }


def ca_clash_pairs(ca: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CA clashes of one chain ``ca`` (L, 3), in chain order (NaN rows never clash): ``(i, j, distance)`` of
    every pair with ``j - i >= CA_CLASH_SEP`` closer than :data:`CA_CLASH_DIST`."""
    ca = np.asarray(ca, dtype=np.float64)
    i, j = np.triu_indices(len(ca), CA_CLASH_SEP)
    d = np.linalg.norm(ca[i] - ca[j], axis=-1)
    with np.errstate(invalid="ignore"):
        hit = d < CA_CLASH_DIST
    return i[hit], j[hit], d[hit]


def geometry_metrics(coords: np.ndarray) -> dict[str, float | int]:
    """Geometry sanity of a backbone ``(L, 4, 3)`` (N, CA, C, O; NaN allowed) or CA trace ``(L, 3)``.

    * ``ca_ca_mean``, ``ca_ca_std``, ``ca_ca_max``: consecutive CA-CA distances (A);
    * ``ca_ca_valid_frac``: fraction of consecutive CA-CA distances within :data:`CA_CA_WINDOW`;
    * ``n_chain_breaks``: consecutive CA-CA distances above :data:`CHAIN_BREAK`;
    * ``c_n_mean``, ``c_n_valid_frac``: peptide C(i)-N(i+1) bond lengths (A) and the fraction within
      :data:`C_N_WINDOW` (NaN when the backbone has only CA atoms);
    * ``n_ca_clashes``: CA pairs with ``|i-j| >= CA_CLASH_SEP`` closer than :data:`CA_CLASH_DIST`;
    * ``n_bb_clashes``: backbone heavy-atom pairs of residues with ``|i-j| >= BB_CLASH_SEP`` closer than
      :data:`BB_CLASH_DIST` (NaN when the backbone has only CA atoms);
    * ``radius_of_gyration``: CA radius of gyration (A).
    """
    x = np.asarray(coords, dtype=np.float64)
    if x.ndim == 2:
        full = np.full((x.shape[0], 4, 3), np.nan)
        full[:, 1] = x
        x = full
    L = x.shape[0]
    ca = x[:, 1]
    out: dict[str, float | int] = {}
    if L >= 2:
        d = np.linalg.norm(ca[1:] - ca[:-1], axis=-1)
        d = d[np.isfinite(d)]
    else:
        d = np.zeros(0)
    if len(d):
        out.update(ca_ca_mean=float(d.mean()), ca_ca_std=float(d.std()), ca_ca_max=float(d.max()),
                   ca_ca_valid_frac=float(((d >= CA_CA_WINDOW[0]) & (d <= CA_CA_WINDOW[1])).mean()),
                   n_chain_breaks=int((d > CHAIN_BREAK).sum()))
    else:
        out.update(ca_ca_mean=float("nan"), ca_ca_std=float("nan"), ca_ca_max=float("nan"),
                   ca_ca_valid_frac=float("nan"), n_chain_breaks=0)
    cn = np.linalg.norm(x[:-1, 2] - x[1:, 0], axis=-1) if L >= 2 else np.zeros(0)
    cn = cn[np.isfinite(cn)]
    out.update(c_n_mean=float(cn.mean()) if len(cn) else float("nan"),
               c_n_valid_frac=float(((cn >= C_N_WINDOW[0]) & (cn <= C_N_WINDOW[1])).mean()) if len(cn)
               else float("nan"))
    idx = np.arange(L)
    out["n_ca_clashes"] = len(ca_clash_pairs(ca)[0])
    if np.isfinite(x).all() and L > 0:
        flat = x.reshape(-1, 3)
        res = np.repeat(idx, 4)
        dd = np.linalg.norm(flat[:, None] - flat[None, :], axis=-1)
        rsep = np.abs(res[:, None] - res[None, :])
        out["n_bb_clashes"] = int(np.triu((dd < BB_CLASH_DIST) & (rsep >= BB_CLASH_SEP)).sum())
    else:
        out["n_bb_clashes"] = float("nan")
    out["radius_of_gyration"] = radius_of_gyration(ca)
    return out


def structure_metrics(bb: Backbone) -> dict:
    """All single-structure metrics of a backbone (geometry + secondary structure)."""
    out: dict = {"length": bb.length, "full_backbone": bb.has_full_backbone}
    out.update(geometry_metrics(bb.coords))
    out.update(secondary_structure(bb.ca, bb.res_ids))
    return out
