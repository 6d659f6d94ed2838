"""Batched refinement (frames/refine.py ``refine_backbones``, frames/batch_lbfgs.py): every chain's result is
bitwise independent of the batch it is refined in (its companions' number, lengths, contents and order), padding
contributes nothing, each chain stops on the same criteria as alone, and ``generate_backbones refine=true`` writes
the same PDBs whatever its ``batch_size``.

Exact equality is asserted on purpose: the refinement is path-sensitive (a 1e-12 A difference in the input can end
0.06 A apart, docs/superposition.md), so a batched run that only agreed to rounding would write different PDBs
depending on the batch. The implementation uses only elementwise arithmetic (+ - * / sqrt, correctly rounded in
both the vectorised and the scalar loops of the CPU kernels) and per-row sums in index order (``rowsum``), so
equality is exact, not a tolerance."""
from __future__ import annotations

import math

import pytest
import torch

from superdiff_protein.core.so3 import so3_exp
from superdiff_protein.frames.batch_lbfgs import minimize_rows, rowsum
from superdiff_protein.frames.geometry import frames_from_backbone, psi_from_backbone
from superdiff_protein.frames.guidance import ClashGuide
from superdiff_protein.frames.refine import refine_backbone, refine_backbones
from superdiff_protein.frames.se3 import SE3Diffuser
from test_eval_common import pdownb_chains
from test_refine import _check_refined

F64 = torch.float64


def _frames(bb):
    a = torch.tensor(bb.atoms, dtype=F64)
    R, T = frames_from_backbone(a[:, 0], a[:, 1], a[:, 2])
    return R, T, psi_from_backbone(a[:, 0], a[:, 1], a[:, 2], a[:, 3])


def _broken(R, T, seed, rot=0.17, shift=0.4, clash=True):
    """A real chain with every residue knocked by ~``rot`` rad and ~``shift`` A, and (``clash``) its closest
    far-apart residue pair pushed nearly on top of each other (as test_refine's broken chains)."""
    g = torch.Generator().manual_seed(seed)
    n = T.shape[0]
    Rn = so3_exp(rot * torch.randn(n, 3, generator=g, dtype=F64)) @ R
    Tn = T + shift * torch.randn(n, 3, generator=g, dtype=F64)
    if clash:
        far = torch.cdist(T, T) + 1e3 * ((torch.arange(n)[:, None] - torch.arange(n)[None]).abs() < 8)
        i, j = divmod(int(far.argmin()), n)
        Tn[j] += 0.8 * (T[i] - T[j])
    return Rn, Tn


def _synthetic(n, seed, psi=False):
    """A random-walk chain with random residue orientations (CA steps of ~3.5 A): broken links everywhere and,
    for longer chains, clashes."""
    g = torch.Generator().manual_seed(seed)
    R = so3_exp(2.0 * torch.randn(n, 3, generator=g, dtype=F64))
    step = torch.randn(n, 3, generator=g, dtype=F64)
    T = torch.cumsum(3.5 * step / step.norm(dim=-1, keepdim=True), 0)
    if not psi:
        return R, T, None
    a = torch.rand(n, generator=g, dtype=F64) * 2 * math.pi
    return R, T, torch.stack([torch.sin(a), torch.cos(a)], -1)


@pytest.fixture(scope="module")
def inputs():
    """Chains of different lengths that need real work: real chains broken and clashing, a real chain only
    rebuilt from its frames, synthetic random walks (with and without psi), and a single residue."""
    chains = pdownb_chains(8)
    got = []
    for k, bb in enumerate(chains[:3]):
        R, T, psi = _frames(bb)
        Rn, Tn = _broken(R, T, seed=k)
        got.append((Rn, Tn, psi))
    R, T, psi = _frames(chains[3])
    got.append((R, T, psi))
    got.append(_synthetic(17, seed=5, psi=True))
    got.append(_synthetic(9, seed=6))
    got.append((torch.eye(3, dtype=F64)[None], torch.tensor([[1.0, 2.0, 3.0]], dtype=F64), None))
    assert len({c[1].shape[0] for c in got}) >= 5
    return got


@pytest.fixture(scope="module")
def alone(inputs):
    return [refine_backbone(*c) for c in inputs]


def _same(a, b):
    """Bitwise equality of two RefineResults (every field)."""
    assert torch.equal(a.rot, b.rot) and torch.equal(a.trans, b.trans) and torch.equal(a.psi, b.psi)
    assert (a.iters, a.converged) == (b.iters, b.converged)
    assert (a.peptide_max_dev, a.min_far_ca, a.ca_rmsd) == (b.peptide_max_dev, b.min_far_ca, b.ca_rmsd)


# ------------------------------------------------------------------------------------------------ row sums
def test_rowsum_is_unchanged_by_trailing_zeros():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 257, generator=g, dtype=F64)
    for extra in (1, 5, 63, 300):
        padded = torch.cat([x, torch.zeros(3, extra, dtype=F64)], 1)
        assert torch.equal(rowsum(padded), rowsum(x))
    big = torch.cat([torch.randn(7, 257, generator=g, dtype=F64), torch.zeros(7, 40, dtype=F64)], 1)
    big[4, :257] = x[1]
    assert torch.equal(rowsum(big)[4], rowsum(x)[1])


# ------------------------------------------------------------------------------------------------ the optimiser
def _rosenbrock(scale):
    """Rows of different sizes (zero padded) of a scaled Rosenbrock function; padding gets zero gradient."""
    def fun(x, rows):
        x = x.detach().requires_grad_(True)
        s = scale[rows]
        m = torch.zeros_like(x)
        for r, k in enumerate(rows.tolist()):
            m[r, :sizes[k]] = 1.0
        a, b = x[:, :-1], x[:, 1:]
        term = s[:, None] * (b - a * a) ** 2 + (1 - a) ** 2
        e = rowsum(torch.where((m[:, 1:] > 0), term, torch.zeros_like(term)))
        (gr,) = torch.autograd.grad(e.sum(), x)
        return e.detach(), gr
    sizes = [4, 10, 7]
    return fun, sizes


def test_minimize_rows_converges_each_row_alone_and_in_a_batch():
    scale = torch.tensor([1.0, 100.0, 10.0], dtype=F64)
    fun, sizes = _rosenbrock(scale)
    D = max(sizes)
    x0 = torch.zeros(3, D, dtype=F64)
    for k, n in enumerate(sizes):
        x0[k, :n] = -1.0
    batch = minimize_rows(fun, x0, max_evals=2000, chunk=50)
    for k, n in enumerate(sizes):
        assert float((batch.x[k, :n] - 1).abs().max()) < 1e-6, (k, batch.x[k])
        assert torch.all(batch.x[k, n:] == 0)                       # padding never moves
        one = minimize_rows(lambda x, rows: fun(x, rows + k), x0[k:k + 1, :n], max_evals=2000, chunk=50)
        assert torch.equal(one.x[0], batch.x[k, :n]) and int(one.evals[0]) == int(batch.evals[k])
    assert len(set(batch.evals.tolist())) > 1                      # rows stop on their own


def test_minimize_rows_stops_at_the_evaluation_budget():
    scale = torch.tensor([1.0, 100.0, 10.0], dtype=F64)
    fun, sizes = _rosenbrock(scale)
    x0 = -torch.ones(3, max(sizes), dtype=F64)
    res = minimize_rows(fun, x0, max_evals=7, chunk=3)
    assert res.evals.tolist() == [7, 7, 7]


# ------------------------------------------------------------------------------------------------ the refinement
def test_each_chain_alone_meets_the_guarantees(inputs, alone):
    for (R, T, psi), r in zip(inputs, alone):
        if T.shape[0] >= 17:
            _check_refined(r)
        assert r.converged and r.iters <= 500
    assert alone[-1].iters == 0 and torch.equal(alone[-1].trans, inputs[-1][1])


def test_a_chain_is_bitwise_independent_of_its_batch(inputs, alone):
    n = len(inputs)
    orders = [list(range(n)), list(range(n))[::-1], [3, 0, 5, 1, 6, 2, 4], [4, 5], [0, 2], [6, 1, 3]]
    for order in orders:
        got = refine_backbones([inputs[k] for k in order])
        for k, r in zip(order, got):
            _same(r, alone[k])


def test_a_short_chain_padded_to_a_long_one_is_the_chain_alone(inputs, alone):
    short, long_ = inputs[5], inputs[0]                             # 9 and ~40-90 residues
    assert short[1].shape[0] < long_[1].shape[0] // 4
    for batch in ([short, long_], [long_, short, long_]):
        got = refine_backbones(batch)
        _same(got[next(k for k, c in enumerate(batch) if c is short)], alone[5])


def test_the_same_chain_twice_gives_the_same_result_twice(inputs, alone):
    got = refine_backbones([inputs[1], inputs[1], inputs[4]])
    _same(got[0], alone[1])
    _same(got[1], alone[1])


def test_an_unfinished_chain_in_a_batch_says_so_and_stops_at_the_budget(inputs):
    got = refine_backbones(inputs[:3] + [inputs[4]], max_iters=3, chunk=3)
    for r in got:
        assert not r.converged and r.iters == 3
        assert "NOT converged in 3 evaluations" in r.summary()
    again = refine_backbones([inputs[2]], max_iters=3, chunk=3)[0]
    _same(again, got[2])


def test_chains_stop_on_their_own(inputs, alone):
    """An easy chain (a real one, already near ideal) stops long before the hard ones in the same batch."""
    easy, hard = alone[3], alone[0]
    assert easy.iters < hard.iters
    got = refine_backbones([inputs[0], inputs[3]])
    assert got[1].iters == easy.iters and got[0].iters == hard.iters


def test_guide_finalize_many_uses_its_distance_and_matches_finalize(inputs):
    guide = ClashGuide(SE3Diffuser().space, 10.0, weight=0.5, d0=4.5)
    many = guide.finalize_many([inputs[0], inputs[4]])
    for c, r in zip([inputs[0], inputs[4]], many):
        _same(r, guide.finalize(*c))
    _check_refined(many[0], d0=4.5)


def test_refine_backbones_of_nothing():
    assert refine_backbones([]) == []


# ------------------------------------------------------------------------------------------------ generate_backbones
def test_generate_refined_pdbs_do_not_depend_on_the_batch_size(tmp_path):
    """Samples of two lengths (so the batch pads), refined in one call per batch: the same PDBs at batch size 1
    and 3."""
    from superdiff_protein.frames.generation import generate

    opts = dict(models=["exact-helix", "exact-strand"], lengths=[12, 20], samples_per_length=2, num_steps=6,
                plots=False, progress=False, refine=True)
    generate(out_dir=str(tmp_path / "b1"), batch_size=1, **opts)
    generate(out_dir=str(tmp_path / "b3"), batch_size=3, **opts)
    pdbs = sorted((tmp_path / "b1").glob("length_*/sample_*.pdb"))
    assert len(pdbs) == 4
    for p in pdbs:
        text = p.read_text()
        assert "refined: CA moved" in text
        assert text == (tmp_path / "b3" / p.relative_to(tmp_path / "b1")).read_text(), p.name
