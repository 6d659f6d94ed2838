"""The batched superposition sampler with per-model density tracking.

For M models with scores ``s_i`` on a :class:`~superdiff_protein.core.spaces.ProductSpace`, each step of
reverse time ``tau`` (``t = 1 - tau`` runs from 1 to ``min_t``) does, per component c:

    dx_c = [-f_c + c_s g_c^2 sum_j kappa_j s_j^c] dtau + eta g_c sqrt(dtau) z_c      (z_c ~ N(0, I))

with ``c_s = 1, eta = noise_scale`` for ``sampling="sde"`` (FrameDiff's sampler; the reverse SDE at
noise_scale 1) and ``c_s = 1/2, eta = 0`` for ``sampling="ode"`` (probability-flow ODE). The
log-density of every model along the path is tracked by the Itô formula (``docs/superposition.md``):

    d log q_i = <s_i, dx> + [div f + <f - g^2/2 s_i, s_i>] dtau + (eta^2 - 1) g^2/2 Lap(log q_i) dtau

``estimator="ito"`` drops the last term (Thm. 1 of the paper: exact for eta = 1, no divergence, no
extra network call); ``estimator="hutchinson"`` keeps it with a Hutchinson trace estimate (unbiased
for every eta; at eta = 0 this is the usual ODE divergence estimator). Both are linear in kappa,
``dlogq = A kappa + b``, which is what the AND rule solves.

The formula holds along ANY path ``dx``, so the drift and the tracked densities may use different
scores: a model whose :class:`~superdiff_protein.core.protocol.ModelOutput` carries ``density_scores``
(a classifier-free-guided prompt: drift ``s_u + w (s_c - s_u)``, density score ``s_c``) drives the
sampler with ``scores`` while ``s_i`` above (and in ``A``, ``b``, the Laplacian and the AND
correction) is its density score; then ``A_ij = c_s g^2 dtau <s_i, d_j>`` with ``d_j`` the drift scores.

The tracked log-densities start at t = 1 from the space's prior log-density, shared by all models
(``init_logq="prior"``), or from each model's own ``log_density`` at t = 1 (``init_logq="model"``,
exact models only; AND then also removes the start gap). On SO(3) the two differ: the t = 1 marginal
is IGSO(3)(1.5)-blurred data, not Haar (docs/superposition.md, "Start values on SO(3)").

Each sample owns a random stream (``torch.Generator`` seeded from its own seed) from which its prior
draw, step noise and probes come, so a sample's trajectory does not depend on the batch it ran in.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from .kappa import KappaRule
from .protocol import ModelOutput, check_compatible
from .spaces import ProductSpace, State

__all__ = [
    "SamplerConfig",
    "SampleResult",
    "SamplingError",
    "BiasedEstimatorWarning",
    "superpose",
    "make_generators",
    "time_grid",
    "step_sizes",
]


class SamplingError(RuntimeError):
    """Raised when NaN/inf appears during sampling (names the samples and the step)."""


class BiasedEstimatorWarning(UserWarning):
    """The plain Itô estimator is biased when the sampler's noise is not the reverse SDE's."""


@dataclass
class SamplerConfig:
    """Options of :func:`superpose` (see module docstring)."""

    num_steps: int = 500
    min_t: float = 0.01
    noise_scale: float = 1.0
    sampling: str = "sde"          # "sde" | "ode"
    estimator: str = "ito"         # "ito" | "hutchinson"
    kappa_scope: str = "joint"     # "joint" | "per_component"
    num_probes: int = 1
    probe: str = "rademacher"      # "rademacher" | "gaussian"
    dtype: torch.dtype = torch.float64
    device: str | torch.device = "cpu"
    time_grid: str = "uniform"     # "uniform" | "quadratic" | "framediff" (see time_grid())
    # AND solves kappa with this step's noise, cancelling noise along span{s_i - s_1}; the exact Itô
    # correction for that costs one VJP per model and cancelled direction (docs/superposition.md).
    # False reproduces the paper's (biased) AND.
    and_correction: bool = True
    # Start value of the tracked log-densities (docs/superposition.md, "Start value"):
    # "prior": the space's prior log-density, shared by all models (exact on R^d only up to
    #   alpha_bar(1); on SO(3) the t = 1 marginal is not Haar). "model": each model's own log q_i at
    #   t = 1, from its ``log_density(x, t, mask)`` (exact models); AND then targets the absolute gap
    #   log q_i - log q_1 = l_i - l_1 at the end instead of only equalising increments.
    init_logq: str = "prior"
    # steps between checks for NaN/inf (each check syncs with the device); None: 1 on CPU, 16 on CUDA.
    # The error always names the first bad step.
    nan_check_every: int | None = None

    def validate(self) -> None:
        if int(self.num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not (0.0 <= self.min_t < 1.0):
            raise ValueError(f"min_t must lie in [0, 1), got {self.min_t}")
        if not (self.noise_scale >= 0 and math.isfinite(self.noise_scale)):
            raise ValueError(f"noise_scale must be finite and >= 0, got {self.noise_scale}")
        if self.sampling not in ("sde", "ode"):
            raise ValueError(f"sampling must be 'sde' or 'ode', got {self.sampling!r}")
        if self.estimator not in ("ito", "hutchinson"):
            raise ValueError(f"estimator must be 'ito' or 'hutchinson', got {self.estimator!r}")
        if self.kappa_scope not in ("joint", "per_component"):
            raise ValueError(f"kappa_scope must be 'joint' or 'per_component', got {self.kappa_scope!r}")
        if self.probe not in ("rademacher", "gaussian"):
            raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {self.probe!r}")
        if int(self.num_probes) < 1:
            raise ValueError("num_probes must be >= 1")
        if self.init_logq not in ("prior", "model"):
            raise ValueError(f"init_logq must be 'prior' or 'model', got {self.init_logq!r}")

    @property
    def eta(self) -> float:
        return 0.0 if self.sampling == "ode" else float(self.noise_scale)

    @property
    def score_coeff(self) -> float:
        return 0.5 if self.sampling == "ode" else 1.0


@dataclass
class SampleResult:
    """Samples and traces. Component axis C follows ``components``; model axis M follows the models."""

    x: State
    logq: Tensor                 # (B, C, M) final log-density estimates per component
    kappa_trace: Tensor          # (S, B, C, M) kappa used at each step
    logq_trace: Tensor           # (S + 1, B, C, M)
    t: Tensor                    # (S + 1,) time grid
    components: list[str]
    extras: list[dict[str, Tensor]] = field(default_factory=list)  # last model extras, per model
    trajectory: list[State] | None = None

    @property
    def logq_total(self) -> Tensor:
        """(B, M) joint log-density estimates (sum over components)."""
        return self.logq.sum(1)


def make_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One independent generator per sample."""
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        gens.append(g)
    return gens


def time_grid(num_steps: int, min_t: float, kind: str = "uniform", dtype=torch.float64) -> Tensor:
    """Descending times from 1 to ``min_t``.

    ``uniform``: equal steps (FrameDiff, the paper). ``quadratic``: ``t = min_t + (1 - min_t) u^2`` for
    ``u`` uniform -- steps shrink towards ``min_t`` where the marginals are sharpest, which cuts the
    discretisation error of both the sampler and the density estimates (docs/superposition.md).
    ``framediff``: the official FrameDiff/Proteus grid ``numpy.linspace(min_t, 1, num_t)[::-1]`` with
    ``num_t = num_steps + 1`` (bit for bit); the official step size is the constant ``1 / num_t``
    (not the grid spacing), see :func:`step_sizes`.
    """
    if kind == "framediff":
        n = num_steps + 1
        step = (1.0 - min_t) / (n - 1)
        y = torch.arange(n, dtype=torch.float64) * step + min_t
        y[-1] = 1.0
        return y.flip(0).to(dtype)
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=dtype)
    if kind == "uniform":
        return min_t + (1.0 - min_t) * u
    if kind == "quadratic":
        return min_t + (1.0 - min_t) * u * u
    raise ValueError(f"unknown time grid {kind!r}; choose 'uniform', 'quadratic' or 'framediff'")


def step_sizes(ts: Tensor, kind: str = "uniform") -> list[float]:
    """Reverse-time step sizes ``dtau`` for a grid from :func:`time_grid`: the grid differences, except
    for ``framediff`` where every step is ``1 / num_t = 1 / len(ts)`` as in the official samplers."""
    n = ts.numel() - 1
    if kind == "framediff":
        return [1.0 / (n + 1)] * n
    return [float(ts[i] - ts[i + 1]) for i in range(n)]


def _probe(x: Tensor, gens, kind: str, space_c) -> Tensor:
    z = space_c.randn_tangent(x, gens) if gens is not None else space_c.randn_tangent(x)
    if kind == "rademacher":
        z = torch.sign(z)
        z = torch.where(z == 0, torch.ones_like(z), z)
    return z


def _eval_models(models, x: State, t: Tensor, mask, states, space: ProductSpace, need_grad: bool,
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
            quads.append(_quadratic_forms(graph, probes, space, mask, retain=keep_graphs))
        graphs.append(graph if keep_graphs else None)
        dens = None if out.density_scores is None else {k: v.detach() for k, v in out.density_scores.items()}
        outs.append(ModelOutput({k: v.detach() for k, v in out.scores.items()}, out.state,
                                {k: v.detach() for k, v in out.extras.items()}, dens))
        del out, graph
    return outs, graphs, (quads if probes else None)


def _quadratic_forms(graph, directions: list[State], space: ProductSpace, mask, retain: bool = True
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


def _noise_cancelling_directions(S: dict[str, Tensor], g: dict[str, Tensor], space: ProductSpace, mask,
                                 scope: str) -> list[State]:
    """Directions v_a = G e_a, with e_a an orthonormal basis (per sample) of span{w_i - w_1}, w_i = G s_i.

    The AND rule solves for kappa with this step's noise, which cancels the noise along exactly this
    span; the Itô formula's second-order term then lacks  -eta^2/2 sum_a v_a^T H_i v_a  dtau.
    """
    dirs: list[State] = []
    for grp, basis in _diff_bases(S, g, space, mask, scope):
        dirs += _pad_directions(basis, grp, g, S)
    return dirs


def _bilinear_forms(graph, lefts: list[State], rights: list[State], space: ProductSpace, mask
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


def _oblique_and_corrections(S: dict[str, Tensor], D: dict[str, Tensor], g: dict[str, Tensor], graphs,
                             space: ProductSpace, mask, scope: str) -> list[dict[str, Tensor]]:
    """The AND Itô correction when the drift scores D differ from the tracked density scores S
    (classifier-free guidance tracked with the unguided conditionals; docs/images.md).

    AND fixes <G(s_i - s_1), z_eff> (the density-score differences) by moving along G(d_j - d_1) (the
    drift-score differences), so the realised noise is  G P z  with the oblique projector
    P = I - E_v W E_u^T,  E_u / E_v orthonormal bases of span{G(s_i - s_1)} / span{G(d_j - d_1)},
    W = (E_u^T E_v)^+. The Itô second-order term of model i changes by
    eta^2/2 tr(G J_i G (P P^T - I)) dtau = eta^2/2 [-tr(E_u^T K E_v W) - tr(E_v^T K E_u W^T)
    + tr(E_v^T K E_v W W^T)] dtau,  K = G J_i G. With D = S, P is the orthogonal projector and this is
    :func:`_noise_cancelling_directions`'s  -sum_a v_a^T J_i v_a. Returns, per model, the bracket per
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
            bil = _bilinear_forms(graphs[i], dirs, dirs, space, mask)
            for k in names:
                X, Xp, Y = bil[k][:, :r, r:], bil[k][:, r:, :r], bil[k][:, r:, r:]
                corr[i][k] = corr[i][k] - (X * W.transpose(-1, -2)).sum((-1, -2)) - (Xp * W).sum((-1, -2)) \
                    + (Y * WWt).sum((-1, -2))
    return corr


def _model_start_logq(models, x: State, t: Tensor, mask, comps: list[str]) -> Tensor:
    """(B, C, M) start values log q_i(x, t = 1) per component from each model's ``log_density``
    (``SamplerConfig(init_logq="model")``); a model without it is refused with one clear line."""
    B = t.shape[0]
    cols = []
    for m in models:
        name = getattr(m, "name", type(m).__name__)
        fn = getattr(m, "log_density", None)
        if not callable(fn):
            raise ValueError(
                f"init_logq='model' needs each model's log-density at t = 1, but model {name!r} has no "
                "log_density(x, t, mask) method (only exact models provide it); use init_logq='prior'")
        with torch.no_grad():
            lq = fn(x, t, mask)
        if not isinstance(lq, Mapping) or set(lq) != set(comps):
            raise ValueError(f"model {name!r}: log_density must return one (B,) tensor per component "
                             f"{comps}, got {sorted(lq) if isinstance(lq, Mapping) else type(lq).__name__}")
        col = torch.stack([torch.as_tensor(lq[k]).to(device=t.device, dtype=t.dtype).reshape(B) for k in comps], 1)
        if not bool(torch.isfinite(col).all()):
            raise ValueError(f"model {name!r}: log_density at t = 1 is not finite for some samples")
        cols.append(col)
    return torch.stack(cols, -1).clone()


def _bc(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))


def superpose(
    space: ProductSpace,
    models: Sequence[Any],
    rule: KappaRule,
    config: SamplerConfig,
    seeds: Sequence[int],
    shapes: Mapping[str, tuple[int, ...]],
    mask: Tensor | None = None,
    x_init: State | None = None,
    save_trajectory: bool = False,
    callback: Callable[[int, int], None] | None = None,
    check_models: bool = True,
    noise_fn: Callable[[int, Tensor, State], Mapping[str, Tensor] | None] | None = None,
) -> SampleResult:
    """Sample ``len(seeds)`` states from the superposition of ``models`` under ``rule``.

    ``shapes`` gives each component's per-sample shape (e.g. ``{"rot": (N,), "trans": (N, 3)}``; SO(3)
    takes the residue count). ``mask`` (B, N) marks real residues in padded batches.
    ``callback(step, num_steps)`` is called after each step (progress bars).
    ``noise_fn(step, t, x)`` (optional) returns this step's standard-normal noise per component (the
    tangent noise ``z`` of ``dx = ... + eta g sqrt(dtau) z``, before projection/masking), or ``None`` to
    draw it from the per-sample streams; used to replay official trajectories with recorded noise.
    """
    config.validate()
    models = list(models)
    if not models:
        raise ValueError("superpose needs at least one model")
    if check_models:
        check_compatible(space.signature(), models)
    eta, cs = config.eta, config.score_coeff
    if config.estimator == "ito" and abs(eta - 1.0) > 1e-12:
        warnings.warn(
            f"plain Itô density estimates are biased with sampling={config.sampling!r} and effective noise "
            f"scale {eta}: the Laplacian term (eta^2 - 1) g^2/2 Lap(log q) no longer cancels. Use "
            "estimator='hutchinson' for unbiased log-densities (docs/superposition.md).",
            BiasedEstimatorWarning, stacklevel=2)
    use_lap = config.estimator == "hutchinson" and abs(eta - 1.0) > 1e-12
    and_corr = bool(getattr(rule, "cancels_noise", False)) and config.and_correction and eta > 0 and len(models) > 1

    dtype, device = config.dtype, torch.device(config.device)
    B, M = len(seeds), len(models)
    comps = space.names
    gens = make_generators(seeds, device)
    if mask is not None:
        mask = mask.to(device=device)
    x = x_init if x_init is not None else space.sample_prior(B, shapes, gens, mask, dtype, device)
    x = {k: v.to(device=device, dtype=dtype) for k, v in x.items()}

    ts = time_grid(config.num_steps, config.min_t, config.time_grid, dtype).to(device)
    if config.init_logq == "model":      # each model's own log q_i at t = 1 (docs/superposition.md)
        logq = _model_start_logq(models, x, ts[0].expand(B), mask, comps)
    else:                                # the shared prior value
        prior = space.prior_log_prob(x, mask)
        logq = torch.stack([prior[k] for k in comps], 1)[:, :, None].expand(B, len(comps), M).clone()
    # AND with model start values: remove each sample's start gap log q_i - log q_1 at a constant rate
    # (like the bias), so that the end gap is l_i - l_1 in absolute terms, not relative to the start
    and_gap0 = logq - logq[..., :1] if (config.init_logq == "model" and M > 1
                                        and bool(getattr(rule, "cancels_noise", False))) else None
    dtaus = step_sizes(ts, config.time_grid)
    total = float(sum(dtaus)) if config.time_grid == "framediff" else float(ts[0] - ts[-1])
    states = [m.init_state(B, mask) for m in models]
    kappa_tr, logq_tr = [], [logq.clone()]
    traj = [{k: v.clone() for k, v in x.items()}] if save_trajectory else None
    outs: list[ModelOutput] = []
    first_bad = torch.full((B,), -1, dtype=torch.long, device=device)
    check_every = config.nan_check_every or (16 if device.type == "cuda" else 1)

    for step in range(config.num_steps):
        t_now, dtau = ts[step], dtaus[step]
        tb = t_now.expand(B)
        injected = noise_fn(step, tb, x) if noise_fn is not None else None
        if injected is not None:
            noise = {k: space.components[k].project(torch.as_tensor(injected[k]).to(device=device, dtype=dtype), mask)
                     for k in comps}
        else:
            noise = {k: space.components[k].randn_tangent(x[k], gens, mask) for k in comps}
        probes = None
        if use_lap:
            probes = [{k: _probe(x[k], gens, config.probe, space.components[k]) for k in comps}
                      for _ in range(config.num_probes)]
            probes = [{k: space.components[k].project(z[k], mask) for k in comps} for z in probes]
        outs, graphs, lap_q = _eval_models(models, x, tb, mask, states, space, use_lap or and_corr,
                                           probes if use_lap else None, keep_graphs=and_corr)
        states = [o.state for o in outs]

        A_c, b_c, fixed_c, S_c, D_c, g2_c = {}, {}, {}, {}, {}, {}
        # S: scores of the tracked densities; D: drift scores (differ only for models with density_scores)
        split = any(o.density_scores is not None for o in outs)
        for k in comps:
            sp = space.components[k]
            S_c[k] = torch.stack([sp.project((o.scores if o.density_scores is None else o.density_scores)[k].to(dtype),
                                             mask) for o in outs], 1)  # (B, M, ...)
            D_c[k] = torch.stack([sp.project(o.scores[k].to(dtype), mask) for o in outs], 1) if split else S_c[k]
            g2_c[k] = sp.diffusion(tb) ** 2
        extra = {k: torch.zeros(B, M, dtype=dtype, device=device) for k in comps}
        if use_lap:     # (eta^2 - 1) g^2 / 2 * Hutchinson estimate of Lap(log q_i)
            for i in range(M):
                for k in comps:
                    extra[k][:, i] += 0.5 * (eta**2 - 1.0) * g2_c[k] * lap_q[i][k] / len(probes) * dtau
        if and_corr and not split:    # noise cancelled by AND's kappa: -eta^2 / 2 * v^T H_i v per cancelled direction
            dirs = _noise_cancelling_directions(S_c, {k: torch.sqrt(g2_c[k]) for k in comps}, space, mask,
                                                config.kappa_scope)
            for i in range(M):
                q = _quadratic_forms(graphs[i], dirs, space, mask)
                for k in comps:
                    extra[k][:, i] -= 0.5 * eta**2 * q[k] * dtau
        elif and_corr:                # drift and density scores differ: oblique noise cancellation
            corr = _oblique_and_corrections(S_c, D_c, {k: torch.sqrt(g2_c[k]) for k in comps}, graphs, space, mask,
                                            config.kappa_scope)
            for i in range(M):
                for k in comps:
                    extra[k][:, i] += 0.5 * eta**2 * corr[i][k] * dtau
        del graphs

        for k in comps:
            sp = space.components[k]
            s, d, g2 = S_c[k], D_c[k], g2_c[k]
            f = sp.drift(x[k], tb, mask)
            fixed = -f * dtau + eta * (torch.sqrt(g2 * dtau)).reshape((B,) + (1,) * (f.dim() - 1)) * noise[k]
            gram = torch.stack([torch.stack([sp.inner(s[:, i], d[:, j], mask) for j in range(M)], -1)
                                for i in range(M)], -2)                                     # (B, M, M): <s_i, d_j>
            sq = torch.diagonal(gram, dim1=-2, dim2=-1) if not split else \
                torch.stack([sp.inner(s[:, i], s[:, i], mask) for i in range(M)], -1)       # |s_i|^2
            s_fixed = torch.stack([sp.inner(s[:, i], fixed, mask) for i in range(M)], -1)  # (B, M)
            s_f = torch.stack([sp.inner(s[:, i], f, mask) for i in range(M)], -1)
            divf = sp.div_drift(x[k], tb, mask)
            b = s_fixed + (divf[:, None] + s_f - 0.5 * g2[:, None] * sq) * dtau
            A_c[k] = cs * (g2 * dtau)[:, None, None] * gram
            b_c[k], fixed_c[k] = b + extra[k], fixed

        frac = dtau / total if total > 0 else 0.0
        if and_gap0 is not None:     # the rule sees b + gap0 * frac (its solve targets dgap = (l - gap0) frac)
            b_rule = {k: b_c[k] + and_gap0[:, ci] * frac for ci, k in enumerate(comps)}
        else:
            b_rule = b_c
        if config.kappa_scope == "joint":
            kap = rule(logq.sum(1), sum(A_c.values()), sum(b_rule.values()), frac)
            kappa = kap[:, None, :].expand(B, len(comps), M)
        else:
            kappa = torch.stack([rule(logq[:, ci], A_c[k], b_rule[k], frac) for ci, k in enumerate(comps)], 1)

        for ci, k in enumerate(comps):
            sp = space.components[k]
            kk = kappa[:, ci]
            g2 = g2_c[k]
            mix = (kk.reshape(kk.shape + (1,) * (D_c[k].dim() - 2)) * D_c[k]).sum(1)
            dx = cs * (g2 * dtau).reshape((B,) + (1,) * (mix.dim() - 1)) * mix + fixed_c[k]
            x[k] = sp.step(x[k], dx)
            logq[:, ci] = logq[:, ci] + (A_c[k] @ kk[..., None]).squeeze(-1) + b_c[k]

        bad = ~torch.isfinite(logq).flatten(1).all(1)
        for k in comps:
            bad |= ~torch.isfinite(x[k]).flatten(1).all(1)
        bad |= ~torch.isfinite(kappa).flatten(1).all(1)
        # record each sample's first bad step on the device; look at it (a host sync) only every
        # `check_every` steps so that kernel launches keep overlapping GPU work
        first_bad = torch.where((first_bad < 0) & bad, torch.full_like(first_bad, step), first_bad)
        if (step + 1) % check_every == 0 or step + 1 == config.num_steps:
            if bool((first_bad >= 0).any()):
                fb = first_bad.tolist()
                s0 = min(v for v in fb if v >= 0)
                idx = [i for i, v in enumerate(fb) if v == s0]
                raise SamplingError(
                    f"non-finite values at step {s0 + 1}/{config.num_steps} (t={float(ts[s0]):.4f}) for sample(s) "
                    f"{idx} (seeds {[int(seeds[i]) for i in idx]}); the batch was stopped")
        kappa_tr.append(kappa.clone())
        logq_tr.append(logq.clone())
        if traj is not None:
            traj.append({k: v.clone() for k, v in x.items()})
        if callback is not None:
            callback(step + 1, config.num_steps)

    return SampleResult(
        x=x, logq=logq, kappa_trace=torch.stack(kappa_tr), logq_trace=torch.stack(logq_tr), t=ts,
        components=comps, extras=[o.extras for o in outs], trajectory=traj)
