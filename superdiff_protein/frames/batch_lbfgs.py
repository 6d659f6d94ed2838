"""L-BFGS over independent rows at once: one function evaluation per round for every row still running.

Each row of ``x`` (B, D) is its own problem (rows padded with zeros to a common D; a padded coordinate must get
zero gradient, it then never moves). :func:`minimize_rows` keeps per-row state only: its own history (two-loop
recursion with per-row dot products), its own line search and step size, its own chunk counter and its own stop.
A row's path depends on nothing but its own values, and with the arithmetic used here (elementwise operations,
and :func:`rowsum`, a sum in index order) it is bitwise the path it takes alone, whatever the other rows are.

The line search is a bracketing search for the weak Wolfe conditions (Armijo ``c1`` and curvature ``c2``):
extrapolate by 4x while the slope is still steep, otherwise shrink the bracket by safeguarded quadratic
interpolation. The curvature condition keeps ``s.y > 0``, so every accepted step can update the history.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["RowsResult", "minimize_rows", "rowdot", "rowsum"]

_NEED, _LS, _DONE = 0, 1, 2          # row phases: evaluate at x (start or after a chunk end), line search, done


def rowsum(x: Tensor) -> Tensor:
    """Sum over the last dimension, (..., n) -> (...), in index order: a row's sum is bitwise unchanged by
    trailing zeros and by the other rows (``cumsum`` runs one sequential loop per row; ``torch.sum``'s
    vectorised blocking depends on n)."""
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[:-1])
    return x.cumsum(-1)[..., -1]


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-row dot product of (B, D) tensors, (B,), by :func:`rowsum`."""
    return rowsum(a * b)


@dataclass
class RowsResult:
    """The point reached by each row, its value, its number of function evaluations and whether the last
    ``check`` said it converged (False if never checked)."""

    x: Tensor
    f: Tensor
    evals: Tensor
    converged: Tensor


def _two_loop(g: Tensor, S: Tensor, Y: Tensor, rho: Tensor, hlen: Tensor, gamma: Tensor) -> Tensor:
    """The L-BFGS direction ``-H g`` per row. History slots (B, m, D), newest last; a row uses its last
    ``hlen`` slots. Unused slots are zero, so visiting them leaves ``q`` and ``r`` exactly as they are: skipping
    the slots no row uses changes nothing."""
    m = S.shape[1]
    first = m - int(hlen.max()) if len(hlen) else m
    q = -g
    alpha = {}
    for j in range(m - 1, first - 1, -1):
        a = torch.where(j >= m - hlen, rho[:, j] * rowdot(S[:, j], q), torch.zeros_like(gamma))
        q = q - a[:, None] * Y[:, j]
        alpha[j] = a
    r = q * gamma[:, None]
    for j in range(first, m):
        b = torch.where(j >= m - hlen, rho[:, j] * rowdot(Y[:, j], r), torch.zeros_like(gamma))
        r = r + S[:, j] * (alpha[j] - b)[:, None]
    return r


def minimize_rows(fun: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], x0: Tensor, *, max_evals: int,
                  chunk: int, renew: Callable[[list[int], Tensor], None] | None = None,
                  check: Callable[[list[int], Tensor], list[bool]] | None = None, history: int = 20,
                  c1: float = 1e-4, c2: float = 0.9, max_ls: int = 25, tol_grad: float = 1e-9,
                  tol_change: float = 1e-14) -> RowsResult:
    """Minimise every row of ``x0`` (B, D) on its own (module docstring).

    ``fun(x, rows)`` returns ``(f, g)``, (b,) and (b, D), of the rows ``rows`` (LongTensor (b,)) at ``x`` (b, D).
    Every ``chunk`` evaluations of a row (at an accepted point), and when its L-BFGS stalls (gradient below
    ``tol_grad``, step or decrease below ``tol_change``, no step found), ``check(rows, x)`` says which rows have
    converged; the others get ``renew(rows, x)`` (e.g. a new neighbour list: ``fun`` may change for those rows)
    and one evaluation at their current point, keeping their history. ``renew`` is also called before the first
    evaluation. A row stops when it converged, after ``max_evals`` evaluations (a line search is cut there: its
    last Armijo point is kept), or when a chunk that stalled lowered its value by no more than ``tol_change``.
    The first step of a row (and the first after its history was dropped because a line search failed) starts
    at ``min(1, 1/|g|_1)``, later ones at 1."""
    B, D = x0.shape
    dt = x0.dtype
    x = x0.detach().clone()
    f = x.new_zeros(B)
    g = torch.zeros_like(x)
    S, Y = x.new_zeros(B, history, D), x.new_zeros(B, history, D)
    rho, gamma = x.new_zeros(B, history), x.new_ones(B)
    hlen = torch.zeros(B, dtype=torch.long)
    d = torch.zeros_like(x)
    gd, t, lo, f_lo, dphi_lo, f_hi, f_chunk = (x.new_zeros(B) for _ in range(7))
    hi = x.new_full((B,), float("inf"))
    g_lo = torch.zeros_like(x)
    n_ls, evals, chunk_evals = (torch.zeros(B, dtype=torch.long) for _ in range(3))
    fresh = torch.ones(B, dtype=torch.bool)
    converged = torch.zeros(B, dtype=torch.bool)
    phase = torch.full((B,), _NEED if max_evals > 0 else _DONE, dtype=torch.long)
    if renew is not None and max_evals > 0 and B:
        renew(list(range(B)), x.clone())

    def new_direction(r: Tensor) -> tuple[Tensor, Tensor]:
        """Start a line search on rows ``r``; returns the rows that cannot (chunk end, stalled) instead."""
        small = g[r].abs().amax(1) <= tol_grad
        go = r[~small]
        if len(go):
            dir_ = _two_loop(g[go], S[go], Y[go], rho[go], hlen[go], gamma[go])
            gdv = rowdot(g[go], dir_)
            ascent = gdv > -tol_change
            ok, gdv, dir_ = go[~ascent], gdv[~ascent], dir_[~ascent]
            small = torch.cat([r[small], go[ascent]])
            if len(ok):
                t1 = torch.minimum(x.new_ones(len(ok)), 1.0 / rowsum(g[ok].abs()))
                d[ok], gd[ok] = dir_, gdv
                t[ok] = torch.where(fresh[ok], t1, x.new_ones(len(ok)))
                lo[ok], hi[ok], n_ls[ok] = 0.0, float("inf"), 0
                f_lo[ok], dphi_lo[ok] = f[ok], gdv
                phase[ok] = _LS
        else:
            small = r
        return small

    while True:
        rows = (phase != _DONE).nonzero().squeeze(1)
        if not len(rows):
            break
        ls = phase[rows] == _LS
        xt = torch.where(ls[:, None], x[rows] + t[rows, None] * d[rows], x[rows])
        fe, ge = fun(xt, rows)
        fe, ge = fe.detach().to(dt), ge.detach().to(dt)
        evals[rows] += 1
        chunk_evals[rows] += 1
        ends: list[Tensor] = []                      # rows at a chunk end
        stalls: list[Tensor] = []                    # ... of which these stalled
        want_dir: list[Tensor] = []

        # rows evaluated at their current point: start (or restart after a chunk end) an iteration
        r = rows[~ls]
        if len(r):
            f[r], g[r], f_chunk[r] = fe[~ls], ge[~ls], fe[~ls]
            cap = evals[r] >= max_evals
            ends.append(r[cap])
            want_dir.append(r[~cap])

        # rows in a line search
        r = rows[ls]
        if len(r):
            phi, gphi, xls = fe[ls], ge[ls], xt[ls]
            dphi = rowdot(gphi, d[r])
            f0, gd0, tt = f[r], gd[r], t[r]
            armijo = torch.isfinite(phi) & torch.isfinite(dphi) & (phi <= f0 + c1 * tt * gd0)
            curv = dphi >= c2 * gd0
            accept = armijo & curv
            up_lo, up_hi = armijo & ~curv, ~armijo
            lo[r] = torch.where(up_lo, tt, lo[r])
            f_lo[r] = torch.where(up_lo, phi, f_lo[r])
            dphi_lo[r] = torch.where(up_lo, dphi, dphi_lo[r])
            g_lo[r] = torch.where(up_lo[:, None], gphi, g_lo[r])
            hi[r] = torch.where(up_hi, tt, hi[r])
            f_hi[r] = torch.where(up_hi, phi, f_hi[r])
            n_ls[r] += 1
            out = (n_ls[r] >= max_ls) | (evals[r] >= max_evals)
            give_up = ~accept & out
            use_lo = give_up & (lo[r] > 0)
            moved = accept | use_lo

            # accepted steps (or the last Armijo point of a search cut short)
            if bool(moved.any()):
                rm, acc = r[moved], accept[moved]
                step = torch.where(acc, tt[moved], lo[rm])
                x_new = torch.where(acc[:, None], xls[moved], x[rm] + lo[rm, None] * d[rm])
                f_new = torch.where(acc, phi[moved], f_lo[rm])
                g_new = torch.where(acc[:, None], gphi[moved], g_lo[rm])
                s = step[:, None] * d[rm]
                y = g_new - g[rm]
                sy = rowdot(s, y)
                push = sy > 1e-10
                if bool(push.any()):
                    rp = rm[push]
                    S[rp] = torch.cat([S[rp, 1:], s[push, None]], 1)
                    Y[rp] = torch.cat([Y[rp, 1:], y[push, None]], 1)
                    rho[rp] = torch.cat([rho[rp, 1:], (1.0 / sy[push])[:, None]], 1)
                    gamma[rp] = sy[push] / rowdot(y[push], y[push])
                    hlen[rp] = torch.clamp(hlen[rp] + 1, max=history)
                f_old = f[rm]
                x[rm], f[rm], g[rm] = x_new, f_new, g_new
                fresh[rm] = False
                stall = ((g_new.abs().amax(1) <= tol_grad) | (s.abs().amax(1) <= tol_change)
                         | ((f_new - f_old).abs() < tol_change))
                full = (chunk_evals[rm] >= chunk) | (evals[rm] >= max_evals)
                ends.append(rm[stall | full])
                stalls.append(rm[stall])
                want_dir.append(rm[~stall & ~full])

            # no Armijo point at all: drop the history and retry downhill, or stall if there was none
            failed = give_up & ~use_lo
            if bool(failed.any()):
                rf = r[failed]
                retry = (hlen[rf] > 0) & (evals[rf] < max_evals)
                rr = rf[retry]
                if len(rr):
                    S[rr], Y[rr], rho[rr], gamma[rr], hlen[rr] = 0.0, 0.0, 0.0, 1.0, 0
                    fresh[rr] = True
                    want_dir.append(rr)
                ends.append(rf[~retry])
                stalls.append(rf[~retry])

            # the search goes on: extrapolate, or interpolate inside the bracket
            cont = ~accept & ~out
            if bool(cont.any()):
                rc = r[cont]
                a, b = lo[rc], hi[rc]
                w = b - a
                den = 2.0 * (f_hi[rc] - f_lo[rc] - dphi_lo[rc] * w)
                tq = a - dphi_lo[rc] * w * w / den
                tq = torch.where(torch.isfinite(tq) & (den > 0), tq, a + 0.5 * w)
                tq = torch.minimum(torch.maximum(tq, a + 0.1 * w), b - 0.1 * w)
                t[rc] = torch.where(torch.isfinite(b), tq, 4.0 * a)

        if want_dir:
            wd = torch.cat(want_dir)
            if len(wd):
                stuck = new_direction(wd)
                ends.append(stuck)
                stalls.append(stuck)

        # chunk ends: converged? otherwise renew and re-evaluate (or stop: budget spent, or stalled for good)
        end = torch.cat(ends) if ends else rows[:0]
        if len(end):
            end = end.unique()
            stalled = torch.zeros(B, dtype=torch.bool)
            if stalls:
                stalled[torch.cat(stalls)] = True
            ok = check(end.tolist(), x[end].clone()) if check is not None else [False] * len(end)
            ok = torch.tensor(ok, dtype=torch.bool)
            converged[end] = ok
            stuck = stalled[end] & ((f_chunk[end] - f[end]) <= tol_change)
            stop = ok | (evals[end] >= max_evals) | stuck
            phase[end[stop]] = _DONE
            go = end[~stop]
            if len(go):
                if renew is not None:
                    renew(go.tolist(), x[go].clone())
                phase[go], chunk_evals[go] = _NEED, 0
    return RowsResult(x=x, f=f, evals=evals, converged=converged)
