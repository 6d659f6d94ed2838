"""Forms of the score Jacobian the sampler needs, each from vector-Jacobian products.

The models are evaluated at ``x exp(u)`` with a zero tangent ``u`` that requires grad
(:func:`eval_models`), so ``J = d score / d u`` is the Jacobian of the score in the space's tangent
coordinates (on SO(3), body-frame; its trace is the Laplace-Beltrami operator of log q). From one VJP per
direction this module gives:

* :func:`quadratic_forms` ``sum_a v_a^T J v_a``: the Hutchinson estimate of ``Lap log q`` (probes ``v_a``)
  and the AND correction along the noise-cancelling directions (:func:`noise_cancelling_directions`);
* :func:`bilinear_forms` ``p_l^T J q_r`` and :func:`oblique_and_corrections`: the AND correction when the
  drift scores differ from the tracked density scores (classifier-free guidance, docs/images.md).

Each result is split by component (the component's share of the inner product), as the sampler's
per-component log-densities need. See docs/superposition.md, "The AND rule needs an Itô correction".
"""
from __future__ import annotations

import torch
from torch import Tensor

from .protocol import ModelOutput
from .spaces import ProductSpace, State

__all__ = ["eval_models", "quadratic_forms", "noise_cancelling_directions", "bilinear_forms",
           "oblique_and_corrections"]


def eval_models(models, x: State, t: Tensor, mask, states, space: ProductSpace, need_grad: bool,
                 probes: list[State] | None = None, keep_graphs: bool = False):
    """Evaluate all models. With ``need_grad`` the state is perturbed by a zero tangent ``u`` that
    requires grad, so quadratic forms of the score Jacobian can be taken (one VJP each).

    With ``probes`` the Hutchinson quadratic forms are taken right after each model's forward, so
    only one model's graph is alive at a time; graphs are returned only when ``keep_graphs``
    (needed by the AND correction, whose directions depend on every model's score).
    Returns ``(outputs, graphs or Nones, per-model probe quadratic forms or None)``.
    """
    outs, graphs, quads = [], [], []
    for i, m in enumerate(models):
        if not need_grad:
            with torch.no_grad():
                outs.append(m(x, t, mask, states[i]))
            graphs.append(None)
            continue
        with torch.enable_grad():
            u = {k: space.components[k].zeros_tangent(v).requires_grad_(True) for k, v in x.items()}
            xu = {k: space.components[k].step(x[k], u[k]) for k in x}
            out = m(xu, t, mask, states[i])
        # Jacobian terms (Laplacian, AND correction) are of the tracked log-density: the density scores
        graph = (u, out.density_scores if out.density_scores is not None else out.scores)
        if probes:
            quads.append(quadratic_forms(graph, probes, space, mask, retain=keep_graphs))
        graphs.append(graph if keep_graphs else None)
        dens = None if out.density_scores is None else {k: v.detach() for k, v in out.density_scores.items()}
        outs.append(ModelOutput({k: v.detach() for k, v in out.scores.items()}, out.state,
                                {k: v.detach() for k, v in out.extras.items()}, dens))
        del out, graph
    return outs, graphs, (quads if probes else None)


def quadratic_forms(graph, directions: list[State], space: ProductSpace, mask, retain: bool = True
                     ) -> dict[str, Tensor]:
    """sum_a v_a^T J v_a per sample, split by component (J = Jacobian of the score, i.e. the Hessian of
    log q in the space's tangent coordinates), from one vector-Jacobian product per direction."""
    u, scores = graph
    names = list(u)
    out = {k: torch.zeros(u[k].shape[0], dtype=u[k].dtype, device=u[k].device) for k in names}
    with torch.enable_grad():
        for a, v in enumerate(directions):
            proj = sum((space.components[k].project(scores[k], mask) * v[k]).flatten(1).sum() for k in names)
            keep = retain or a < len(directions) - 1
            grads = torch.autograd.grad(proj, [u[k] for k in names], retain_graph=keep, allow_unused=True)
            for k, gk in zip(names, grads):
                if gk is not None:
                    out[k] = out[k] + space.components[k].inner(gk, v[k], mask).detach()
    return out


def _diff_bases(S: dict[str, Tensor], g: dict[str, Tensor], space: ProductSpace, mask,
                scope: str) -> list[tuple[list[str], list[dict[str, Tensor]]]]:
    """Per kappa group (all components for ``joint``, each alone otherwise): an orthonormal basis e_a
    (per sample; Gram-Schmidt, degenerate directions set to zero) of span{w_i - w_1}, w_i = G s_i."""
    names = list(S)
    groups = [names] if scope == "joint" else [[k] for k in names]
    M = next(iter(S.values())).shape[1]
    out = []
    for grp in groups:
        basis: list[dict[str, Tensor]] = []
        for i in range(1, M):
            d = {k: (S[k][:, i] - S[k][:, 0]) * _bc(g[k], S[k][:, 0]) for k in grp}
            for e in basis:
                c = sum(space.components[k].inner(d[k], e[k], mask) for k in grp)
                d = {k: d[k] - _bc(c, d[k]) * e[k] for k in grp}
            nrm = torch.sqrt(sum(space.components[k].inner(d[k], d[k], mask) for k in grp))
            ok = nrm > 1e-12 * (1 + nrm.max())
            inv = torch.where(ok, 1.0 / torch.where(ok, nrm, torch.ones_like(nrm)), torch.zeros_like(nrm))
            basis.append({k: d[k] * _bc(inv, d[k]) for k in grp})
        out.append((grp, basis))
    return out


def _pad_directions(basis: list[dict[str, Tensor]], grp: list[str], g: dict[str, Tensor],
                    S: dict[str, Tensor]) -> list[State]:
    """G e_a on the group's components, zero on the others."""
    return [{k: (e[k] * _bc(g[k], e[k]) if k in grp else torch.zeros_like(S[k][:, 0])) for k in S} for e in basis]


def noise_cancelling_directions(S: dict[str, Tensor], g: dict[str, Tensor], space: ProductSpace, mask,
                                 scope: str) -> list[State]:
    """Directions v_a = G e_a, with e_a an orthonormal basis (per sample) of span{w_i - w_1}, w_i = G s_i.

    The AND rule solves for kappa with this step's noise, which cancels the noise along exactly this
    span; the Itô formula's second-order term then lacks  -eta^2/2 sum_a v_a^T H_i v_a  dtau.
    """
    dirs: list[State] = []
    for grp, basis in _diff_bases(S, g, space, mask, scope):
        dirs += _pad_directions(basis, grp, g, S)
    return dirs


def bilinear_forms(graph, lefts: list[State], rights: list[State], space: ProductSpace, mask
                    ) -> dict[str, Tensor]:
    """p_l^T J q_r per sample, (B, L, R) per component (the component's share of the inner product),
    from one vector-Jacobian product per left direction (J = Jacobian of the graph's score)."""
    u, scores = graph
    names = list(u)
    B = next(iter(u.values())).shape[0]
    ref = next(iter(u.values()))
    out = {k: torch.zeros(B, len(lefts), len(rights), dtype=ref.dtype, device=ref.device) for k in names}
    with torch.enable_grad():
        for a, p in enumerate(lefts):
            proj = sum((space.components[k].project(scores[k], mask) * p[k]).flatten(1).sum() for k in names)
            grads = torch.autograd.grad(proj, [u[k] for k in names], retain_graph=True, allow_unused=True)
            for k, gk in zip(names, grads):
                if gk is None:
                    continue
                gk = gk.detach()
                for r, q in enumerate(rights):
                    out[k][:, a, r] = space.components[k].inner(gk, q[k], mask)
    return out


def oblique_and_corrections(S: dict[str, Tensor], D: dict[str, Tensor], g: dict[str, Tensor], graphs,
                             space: ProductSpace, mask, scope: str) -> list[dict[str, Tensor]]:
    """The AND Itô correction when the drift scores D differ from the tracked density scores S
    (classifier-free guidance tracked with the unguided conditionals; docs/images.md).

    AND fixes <G(s_i - s_1), z_eff> (the density-score differences) by moving along G(d_j - d_1) (the
    drift-score differences), so the realised noise is  G P z  with the oblique projector
    P = I - E_v W E_u^T,  E_u / E_v orthonormal bases of span{G(s_i - s_1)} / span{G(d_j - d_1)},
    W = (E_u^T E_v)^+. The Itô second-order term of model i changes by
    eta^2/2 tr(G J_i G (P P^T - I)) dtau = eta^2/2 [-tr(E_u^T K E_v W) - tr(E_v^T K E_u W^T)
    + tr(E_v^T K E_v W W^T)] dtau,  K = G J_i G. With D = S, P is the orthogonal projector and this is
    :func:`noise_cancelling_directions`'s  -sum_a v_a^T J_i v_a. Returns, per model, the bracket per
    component (to be multiplied by eta^2/2 dtau). 2(M-1) vector-Jacobian products per model and group.
    """
    names = list(S)
    M = next(iter(S.values())).shape[1]
    B = next(iter(S.values())).shape[0]
    ref = next(iter(S.values()))
    corr = [{k: torch.zeros(B, dtype=ref.dtype, device=ref.device) for k in names} for _ in range(M)]
    for (grp, eu), (_, ev) in zip(_diff_bases(S, g, space, mask, scope), _diff_bases(D, g, space, mask, scope)):
        r = len(eu)
        if r == 0:
            continue
        C = torch.stack([torch.stack([sum(space.components[k].inner(eu[b][k], ev[a][k], mask) for k in grp)
                                      for a in range(r)], -1) for b in range(r)], -2)          # C[b, a] = <eu_b, ev_a>
        W = torch.linalg.pinv(C)                                                            # W[a, b]
        WWt = W @ W.transpose(-1, -2)
        dirs = _pad_directions(eu, grp, g, S) + _pad_directions(ev, grp, g, S)
        for i in range(M):
            bil = bilinear_forms(graphs[i], dirs, dirs, space, mask)
            for k in names:
                X, Xp, Y = bil[k][:, :r, r:], bil[k][:, r:, :r], bil[k][:, r:, r:]
                corr[i][k] = corr[i][k] - (X * W.transpose(-1, -2)).sum((-1, -2)) - (Xp * W).sum((-1, -2)) \
                    + (Y * WWt).sum((-1, -2))
    return corr


def _bc(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))
