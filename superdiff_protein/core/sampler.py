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

The step can be called alone, like a diffusers ``scheduler.step()``::

    sampler = Sampler(space, models, rule, config)
    state = sampler.init_state(seeds, shapes)            # SamplerState at t = 1
    for _ in range(sampler.num_steps):
        out = sampler.step(state)                        # StepOutput: .state, .kappa, .dlogq (B, C, M)
        state = out.state

:func:`superpose` is that loop plus the traces and the NaN check. The quadratic forms of the score
Jacobian (Hutchinson, AND correction) live in :mod:`.jacobian`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from .counter_rng import counter_normal, seeds_tensor
from .fkc import UnsafeNoiseWarning, is_fkc
from .guidance import Guide, apply_guide
from .kappa import KappaRule
from .protocol import ModelOutput, check_compatible
from .jacobian import (bilinear_forms, eval_models, noise_cancelling_directions, oblique_and_corrections,
                       quadratic_forms)
from .smc import SMCConfig, SMCTracker, select_batch
from .spaces import ProductSpace, State
from .start_logq import model_start_logq as _model_start_logq
from .timegrid import step_sizes, time_grid

__all__ = [
    "SamplerConfig",
    "SampleResult",
    "SamplingError",
    "BiasedEstimatorWarning",
    "superpose",
    "Sampler",
    "SamplerState",
    "StepOutput",
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
    time_grid: str = "uniform"     # "uniform" | "quadratic" | "cosine" | "framediff" (see time_grid())
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
    # step noise and probes: "stream" = each sample's torch.Generator (a Python loop over samples per draw);
    # "counter" = a hash of (sample seed, step, stream, element) drawn for the whole batch at once, with no host
    # state (core/counter_rng.py; what a CUDA graph of the step needs). Both are batch-size independent; they
    # give different samples for the same seed. The prior draw always uses the generators.
    rng: str = "stream"
    # steps between checks for NaN/inf (each check syncs with the device); None: 1 on CPU, 16 on CUDA.
    # The error always names the first bad step.
    nan_check_every: int | None = None
    # capture the whole step (model calls included) as one CUDA graph and replay it (core/step_graph.py): needs
    # rng="counter" and a CUDA device; rules with weights, probes or Jacobian terms step eagerly (one warning)
    step_graph: bool = False

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
        if self.rng not in ("stream", "counter"):
            raise ValueError(f"rng must be 'stream' or 'counter', got {self.rng!r}")
        if self.init_logq not in ("prior", "model"):
            raise ValueError(f"init_logq must be 'prior' or 'model', got {self.init_logq!r}")
        if self.step_graph and self.rng != "counter":
            raise ValueError("step_graph needs rng='counter': the per-sample generator streams are drawn in a "
                             "Python loop that a CUDA graph cannot hold")

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
    # FKC rules (core/fkc.py) with SMC (core/smc.py): per sample the log-weight still carried at the end
    # (0 right after a resampling), its root ancestor (batch index at t = 1) and its group; per step
    # and group the ESS / K before resampling and whether the group resampled; per group log Z.
    log_weight: Tensor | None = None      # (B,)
    ancestor: Tensor | None = None        # (B,) long
    group: Tensor | None = None           # (B,) long
    ess_trace: Tensor | None = None       # (S, G)
    resampled: Tensor | None = None       # (S, G) bool
    log_z: Tensor | None = None           # (G,) estimate of log(Z_end / Z_start)

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


def _probe(x: Tensor, gens, kind: str, space_c) -> Tensor:
    z = space_c.randn_tangent(x, gens) if gens is not None else space_c.randn_tangent(x)
    if kind == "rademacher":
        z = torch.sign(z)
        z = torch.where(z == 0, torch.ones_like(z), z)
    return z



@dataclass
class SamplerState:
    """What the loop carries from one step to the next. Every tensor has the sample axis first, so a
    state can be sliced or re-indexed per sample (model states excepted: they are the models' own).

    ``generators`` are the per-sample random streams (prior draw, step noise, probes); :meth:`Sampler.step`
    advances them in place, so a state is used up by the step it is given to: :meth:`clone` it first to
    replay a step.
    """

    x: State                          # component -> (B, ...) the current point
    logq: Tensor                      # (B, C, M) tracked log-density of each model, per component
    model_states: list[Any]           # per model: init_state(), then the last ModelOutput.state
    generators: list[torch.Generator]  # one random stream per sample
    step: int = 0                     # index on the time grid of the next step (0 = at t = 1)
    # AND with init_logq="model": each sample's start gap log q_i - log q_1 (B, C, M), removed over the run
    and_gap0: Tensor | None = None
    outputs: list[ModelOutput] = field(default_factory=list)  # the last step's model outputs (extras)
    logw: Tensor | None = None        # (B,) FKC log-weights (None for rules without weights)
    keys: Tensor | None = None        # (B,) int64 per-sample seeds of rng="counter" (kept by a slot, like generators)

    def select(self, idx: Tensor) -> "SamplerState":
        """The state of particles ``idx`` (SMC resampling): positions, log-densities, log-weights and the
        models' carried state are re-indexed (every tensor in them whose first axis is the batch); each
        slot keeps its own random stream."""
        B = self.logq.shape[0]
        idx = idx.to(self.logq.device)
        states = [select_batch(st, idx, B) for st in self.model_states]
        outs = [select_batch(o, idx, B) for o in self.outputs]
        return SamplerState({k: v[idx] for k, v in self.x.items()}, self.logq[idx], states, self.generators,
                            self.step, None if self.and_gap0 is None else self.and_gap0[idx], outs,
                            None if self.logw is None else self.logw[idx], self.keys)

    def clone(self) -> "SamplerState":
        """An independent copy: tensors cloned, generators copied at their current position."""
        def gen_copy(g: torch.Generator) -> torch.Generator:
            c = torch.Generator(device=g.device)
            c.set_state(g.get_state())
            return c
        return SamplerState({k: v.clone() for k, v in self.x.items()}, self.logq.clone(), list(self.model_states),
                            [gen_copy(g) for g in self.generators], self.step,
                            None if self.and_gap0 is None else self.and_gap0.clone(), list(self.outputs),
                            None if self.logw is None else self.logw.clone(), self.keys)


@dataclass
class StepOutput:
    """One step's result: the new state, and the kappa and log-density increments of this step."""

    state: SamplerState
    kappa: Tensor      # (B, C, M) the weights of this step (equal over C for kappa_scope="joint")
    dlogq: Tensor      # (B, C, M) this step's tracked log-density increments A kappa + b
    dlogw: Tensor | None = None   # (B,) FKC rules: this step's log-weight increment (summed over components)


class Sampler:
    """The superposition sampler as a step: ``state = sampler.init_state(seeds, shapes)``, then
    ``out = sampler.step(state)`` once per step of the time grid (``out.state`` is the next state).
    :func:`superpose` is that loop plus the traces and the NaN check."""

    def __init__(self, space: ProductSpace, models: Sequence[Any], rule: KappaRule, config: SamplerConfig,
                 mask: Tensor | None = None, check_models: bool = True, warn_stacklevel: int = 2,
                 guide: Guide | None = None):
        config.validate()
        models = list(models)
        if not models:
            raise ValueError("superpose needs at least one model")
        if check_models:
            check_compatible(space.signature(), models)
        eta = config.eta
        if config.estimator == "ito" and abs(eta - 1.0) > 1e-12:
            warnings.warn(
                f"plain Itô density estimates are biased with sampling={config.sampling!r} and effective noise "
                f"scale {eta}: the Laplacian term (eta^2 - 1) g^2/2 Lap(log q) no longer cancels. Use "
                "estimator='hutchinson' for unbiased log-densities (docs/superposition.md).",
                BiasedEstimatorWarning, stacklevel=warn_stacklevel)
        self.space, self.models, self.rule, self.config = space, models, rule, config
        self.eta, self.cs = eta, config.score_coeff
        self.cancels_noise = bool(getattr(rule, "cancels_noise", False))
        self.use_lap = config.estimator == "hutchinson" and abs(eta - 1.0) > 1e-12
        self.and_corr = self.cancels_noise and config.and_correction and eta > 0 and len(models) > 1
        self.dtype, self.device = config.dtype, torch.device(config.device)
        self.mask = mask.to(device=self.device) if mask is not None else None
        self.comps = space.names
        self.ts = time_grid(config.num_steps, config.min_t, config.time_grid, self.dtype).to(self.device)
        self.dtaus = step_sizes(self.ts, config.time_grid)
        self.total = float(sum(self.dtaus)) if config.time_grid == "framediff" else float(self.ts[0] - self.ts[-1])
        # FKC rules (core/fkc.py): drift c g^2 sum b_i s_i with c = (1 + eta^2)/2, i.e. kappa = b c / c_s
        self.fkc = is_fkc(rule)
        if guide is not None and self.fkc:
            raise ValueError(f"a guide changes the drift that the {rule.name} rule's importance weights assume; "
                             "guidance works with the or, and, average and single rules (core/guidance.py)")
        self.guide = guide   # an extra drift (core/guidance.py); None: the superposition alone
        self.kappa_scale = (1.0 + eta * eta) / (2.0 * self.cs) if self.fkc else 1.0
        if self.fkc:
            probe = torch.zeros(1, len(models), dtype=torch.float64)
            rule.target_weights(probe)                # refuses a model count the rule cannot take
            self.b_total = float(rule.total(len(models)))
            if not self.b_total > 0:
                raise ValueError(f"the {rule.name} target needs sum of exponents B > 0, got {self.b_total}")

    @property
    def num_steps(self) -> int:
        return len(self.dtaus)

    def init_state(self, seeds: Sequence[int], shapes: Mapping[str, tuple[int, ...]],
                   x_init: State | None = None) -> SamplerState:
        """The state at t = 1: the prior draw (or ``x_init``) and the start values of the log-densities."""
        B, M, comps, mask = len(seeds), len(self.models), self.comps, self.mask
        gens = make_generators(seeds, self.device)
        x = x_init if x_init is not None else self.space.sample_prior(B, shapes, gens, mask, self.dtype, self.device)
        x = {k: v.to(device=self.device, dtype=self.dtype) for k, v in x.items()}
        if self.fkc and x_init is None:      # FKC: Gaussian priors of the product N(0, I/B); rotations stay Haar
            x = {k: v / math.sqrt(self.b_total) if self._gaussian(k) else v for k, v in x.items()}
        if self.config.init_logq == "model":      # each model's own log q_i at t = 1 (docs/superposition.md)
            logq = _model_start_logq(self.models, x, self.ts[0].expand(B), mask, comps)
        else:                                     # the shared prior value
            prior = self.space.prior_log_prob(x, mask)
            logq = torch.stack([prior[k] for k in comps], 1)[:, :, None].expand(B, len(comps), M).clone()
        # AND with model start values: remove each sample's start gap log q_i - log q_1 at a constant rate
        # (like the bias), so that the end gap is l_i - l_1 in absolute terms, not relative to the start
        gap0 = logq - logq[..., :1] if (self.config.init_logq == "model" and M > 1 and self.cancels_noise) else None
        states = [m.init_state(B, mask) for m in self.models]
        logw = self._start_log_weights(x, logq) if self.fkc else None
        keys = seeds_tensor(seeds, self.device) if self.config.rng == "counter" else None
        return SamplerState(x, logq, states, gens, 0, gap0, logw=logw, keys=keys)

    def _gaussian(self, k: str) -> bool:
        return bool(getattr(self.space.components[k], "gaussian_prior", False))

    def _start_log_weights(self, x: State, logq: Tensor) -> Tensor:
        """FKC start weights: 0 (the prior product approximates pi_1), or with ``init_logq="model"`` the exact
        ``log pi~_1(x) - log p_start(x)`` from the models' own t = 1 log-densities."""
        B = logq.shape[0]
        if self.config.init_logq != "model":
            return torch.zeros(B, dtype=self.dtype, device=self.device)
        lw = self.rule.target_log_density(logq.sum(1))
        prior = self.space.prior_log_prob({k: v * math.sqrt(self.b_total) if self._gaussian(k) else v
                                           for k, v in x.items()}, self.mask)
        for k in self.comps:
            lw = lw - prior[k]
            if self._gaussian(k):     # the density of x = z / sqrt(B): a Jacobian factor B^(d/2)
                lw = lw - 0.5 * self.space.components[k].dim(x[k], self.mask) * math.log(self.b_total)
        return lw

    def step(self, state: SamplerState, noise: Mapping[str, Tensor] | None = None,
             at: tuple[Tensor, Tensor] | None = None) -> StepOutput:
        """Step ``state.step`` of the grid, from ``t = ts[state.step]`` to ``ts[state.step + 1]``.

        ``noise`` (optional): this step's standard-normal tangent noise per component (before
        projection/masking), else drawn from ``state.generators``. Probes always come from the generators.
        ``at`` (optional): this step's ``(t, dtau)`` as 0-d device tensors, with ``state.step`` a 0-d device
        tensor too: the form a captured CUDA graph replays (core/step_graph.py); no host value is read.
        """
        i = state.step
        if at is None:
            if not 0 <= i < self.num_steps:
                raise IndexError(f"step {i} is outside the time grid of {self.num_steps} steps")
            t, dtau = self.ts[i], self.dtaus[i]
        else:
            t, dtau = at
        B = state.logq.shape[0]
        tb = t.expand(B)
        x, gens = state.x, state.generators
        noise = self._noise(x, gens, noise, state)
        probes = self._probes(x, gens, state) if self.use_lap else None
        outs, graphs, lap_q = eval_models(self.models, x, tb, self.mask, state.model_states, self.space,
                                          self.use_lap or self.and_corr, probes, keep_graphs=self.and_corr)
        A_c, b_c, fixed_c, D_c, g2_c, w_c, S_c = self._linear_model(x, tb, dtau, outs, graphs, lap_q, noise,
                                                                    len(probes) if probes else 0)
        del graphs
        if self.guide is not None:   # the guide sees a provisional kappa; its move then enters b before the rule
            fixed_c, b_c = apply_guide(self.guide, self.space, x, tb, dtau, self.cs, g2_c, S_c, D_c,
                                       self._kappa(state, A_c, b_c, dtau), fixed_c, b_c, self.mask)
        kappa = self._kappa(state, A_c, b_c, dtau)
        dlogw = None
        if self.fkc:      # weights from this step's Gram matrix and div f (before kappa's eta scaling)
            dlogw = sum(self.rule.log_weight_increment(w_c[k][0], w_c[k][1], g2_c[k], dtau, kappa[:, ci])
                        for ci, k in enumerate(self.comps))
            kappa = kappa * self.kappa_scale
        x_new, logq, dlogq = {}, state.logq.clone(), torch.empty_like(state.logq)
        for ci, k in enumerate(self.comps):
            kk, g2 = kappa[:, ci], g2_c[k]
            mix = (kk.reshape(kk.shape + (1,) * (D_c[k].dim() - 2)) * D_c[k]).sum(1)
            dx = self.cs * (g2 * dtau).reshape((B,) + (1,) * (mix.dim() - 1)) * mix + fixed_c[k]
            x_new[k] = self.space.components[k].step(x[k], dx)
            a_k = (A_c[k] @ kk[..., None]).squeeze(-1)
            logq[:, ci] = state.logq[:, ci] + a_k + b_c[k]
            dlogq[:, ci] = a_k + b_c[k]
        logw = None if state.logw is None else state.logw + dlogw
        new = SamplerState(x_new, logq, [o.state for o in outs], gens, i + 1, state.and_gap0, outs, logw, state.keys)
        return StepOutput(new, kappa, dlogq, dlogw)

    def _counter(self, x: State, state: SamplerState, stream: int) -> State:
        """Standard normal tangents per component from the counter streams (rng="counter")."""
        C = len(self.comps)
        return {k: counter_normal(state.keys, state.step, stream * C + ci,
                                  tuple(self.space.components[k].zeros_tangent(x[k]).shape[1:]), self.dtype)
                for ci, k in enumerate(self.comps)}

    def _noise(self, x: State, gens, injected, state: SamplerState) -> State:
        sp, mask = self.space.components, self.mask
        if injected is not None:
            return {k: sp[k].project(torch.as_tensor(injected[k]).to(device=self.device, dtype=self.dtype), mask)
                    for k in self.comps}
        if state.keys is not None:
            z = self._counter(x, state, 0)
            return {k: sp[k].project(z[k], mask) for k in self.comps}
        return {k: sp[k].randn_tangent(x[k], gens, mask) for k in self.comps}

    def _probes(self, x: State, gens, state: SamplerState) -> list[State]:
        sp, kind = self.space.components, self.config.probe
        if state.keys is not None:
            probes = []
            for j in range(self.config.num_probes):
                z = self._counter(x, state, 1 + j)
                if kind == "rademacher":
                    z = {k: torch.where(v >= 0, torch.ones_like(v), -torch.ones_like(v)) for k, v in z.items()}
                probes.append(z)
        else:
            probes = [{k: _probe(x[k], gens, kind, sp[k]) for k in self.comps} for _ in range(self.config.num_probes)]
        return [{k: sp[k].project(z[k], self.mask) for k in self.comps} for z in probes]

    def _linear_model(self, x: State, tb: Tensor, dtau: float, outs: list[ModelOutput], graphs, lap_q, noise: State,
                      n_probes: int):
        """This step's increments as ``dlogq = A kappa + b`` per component, the kappa-free part of the move
        (``fixed``: drift and noise), the drift scores D (B, M, ...) and g^2."""
        comps, mask, dtype, eta, M, B = self.comps, self.mask, self.dtype, self.eta, len(outs), tb.shape[0]
        A_c, b_c, fixed_c, S_c, D_c, g2_c, w_c = {}, {}, {}, {}, {}, {}, {}
        # S: scores of the tracked densities; D: drift scores (differ only for models with density_scores)
        split = any(o.density_scores is not None for o in outs)
        for k in comps:
            sp = self.space.components[k]
            S_c[k] = torch.stack([sp.project((o.scores if o.density_scores is None else o.density_scores)[k].to(dtype),
                                             mask) for o in outs], 1)  # (B, M, ...)
            D_c[k] = torch.stack([sp.project(o.scores[k].to(dtype), mask) for o in outs], 1) if split else S_c[k]
            g2_c[k] = sp.diffusion(tb) ** 2
        extra = {k: torch.zeros(B, M, dtype=dtype, device=self.device) for k in comps}
        if self.use_lap:     # (eta^2 - 1) g^2 / 2 * Hutchinson estimate of Lap(log q_i)
            for i in range(M):
                for k in comps:
                    extra[k][:, i] += 0.5 * (eta**2 - 1.0) * g2_c[k] * lap_q[i][k] / n_probes * dtau
        if self.and_corr and not split:    # noise cancelled by AND's kappa: -eta^2 / 2 * v^T H_i v per direction
            dirs = noise_cancelling_directions(S_c, {k: torch.sqrt(g2_c[k]) for k in comps}, self.space, mask,
                                               self.config.kappa_scope)
            for i in range(M):
                q = quadratic_forms(graphs[i], dirs, self.space, mask)
                for k in comps:
                    extra[k][:, i] -= 0.5 * eta**2 * q[k] * dtau
        elif self.and_corr:                # drift and density scores differ: oblique noise cancellation
            corr = oblique_and_corrections(S_c, D_c, {k: torch.sqrt(g2_c[k]) for k in comps}, graphs, self.space,
                                           mask, self.config.kappa_scope)
            for i in range(M):
                for k in comps:
                    extra[k][:, i] += 0.5 * eta**2 * corr[i][k] * dtau

        for k in comps:
            sp = self.space.components[k]
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
            A_c[k] = self.cs * (g2 * dtau)[:, None, None] * gram
            b_c[k], fixed_c[k] = b + extra[k], fixed
            if self.fkc:      # Gram matrix of the density scores and div f, for the FKC weights
                gs = gram if not split else torch.stack(
                    [torch.stack([sp.inner(s[:, i], s[:, j], mask) for j in range(M)], -1) for i in range(M)], -2)
                w_c[k] = (gs, divf)
        return A_c, b_c, fixed_c, D_c, g2_c, w_c, S_c

    def _kappa(self, state: SamplerState, A_c, b_c, dtau: float) -> Tensor:
        """(B, C, M) kappa from the rule, per sample (joint) or per sample and component."""
        comps, logq, B, M = self.comps, state.logq, state.logq.shape[0], len(self.models)
        frac = dtau / self.total if self.total > 0 else 0.0
        if state.and_gap0 is not None:     # the rule sees b + gap0 * frac (its solve targets dgap = (l - gap0) frac)
            b_rule = {k: b_c[k] + state.and_gap0[:, ci] * frac for ci, k in enumerate(comps)}
        else:
            b_rule = b_c
        if self.config.kappa_scope == "joint":
            kap = self.rule(logq.sum(1), sum(A_c.values()), sum(b_rule.values()), frac)
            return kap[:, None, :].expand(B, len(comps), M)
        return torch.stack([self.rule(logq[:, ci], A_c[k], b_rule[k], frac) for ci, k in enumerate(comps)], 1)


def _nonfinite(out: StepOutput) -> Tensor:
    """(B,) True where the step left a non-finite log-density, state or kappa."""
    bad = ~torch.isfinite(out.state.logq).flatten(1).all(1)
    for v in out.state.x.values():
        bad |= ~torch.isfinite(v).flatten(1).all(1)
    return bad | ~torch.isfinite(out.kappa).flatten(1).all(1)


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
    smc: SMCConfig | None = None,
    guide: Guide | None = None,
) -> SampleResult:
    """Sample ``len(seeds)`` states from the superposition of ``models`` under ``rule``.

    ``shapes`` gives each component's per-sample shape (e.g. ``{"rot": (N,), "trans": (N, 3)}``; SO(3)
    takes the residue count). ``mask`` (B, N) marks real residues in padded batches.
    ``callback(step, num_steps)`` is called after each step (progress bars).
    ``noise_fn(step, t, x)`` (optional) returns this step's standard-normal noise per component (the
    tangent noise ``z`` of ``dx = ... + eta g sqrt(dtau) z``, before projection/masking), or ``None`` to
    draw it from the per-sample streams; used to replay official trajectories with recorded noise.
    ``smc`` (FKC rules only): groups of particles, ESS-triggered resampling (core/smc.py); an FKC rule
    without it carries weights only.
    ``guide`` (optional): an extra drift (core/guidance.py); it changes the sampled distribution.
    """
    sampler = Sampler(space, models, rule, config, mask, check_models, warn_stacklevel=3, guide=guide)
    if smc is not None and not sampler.fkc:
        raise ValueError(f"smc resampling needs a rule with importance weights (product, anneal, geometric), "
                         f"not {rule.name!r}")
    tracker = SMCTracker(smc or SMCConfig(resample="none"), seeds, mask, sampler.num_steps, sampler.device) \
        if sampler.fkc else None
    if tracker is not None and tracker.K > 1 and tracker.config.resample != "none" and sampler.eta < 1.0:
        warnings.warn(f"FKC with resampling at effective noise scale {sampler.eta:g} < 1: the particles diffuse "
                      "less than the weights assume and resampling collapses them onto few ancestors (the "
                      "tempered-noise choice eta = 1/sqrt(beta) settles at a wrong variance for beta > 2); use "
                      "noise_scale=1 (docs/fkc.md)", UnsafeNoiseWarning, stacklevel=2)
    state = sampler.init_state(seeds, shapes, x_init)
    B, S = len(seeds), sampler.num_steps
    runner = sampler.step
    if config.step_graph:
        from .step_graph import StepGraph
        runner = StepGraph.for_run(sampler, tracker is not None or noise_fn is not None) or runner
    ts_host = sampler.ts.tolist()        # the time grid on the host once (no device sync per step)
    kappa_tr, logq_tr = [], [state.logq.clone()]
    traj = [{k: v.clone() for k, v in state.x.items()}] if save_trajectory else None
    first_bad = torch.full((B,), -1, dtype=torch.long, device=sampler.device)
    check_every = config.nan_check_every or (16 if sampler.device.type == "cuda" else 1)
    for step in range(S):
        noise = noise_fn(step, sampler.ts[step].expand(B), state.x) if noise_fn is not None else None
        out = runner(state, noise)
        state = out.state
        # record each sample's first bad step on the device; look at it (a host sync) only every
        # `check_every` steps so that kernel launches keep overlapping GPU work
        first_bad = torch.where((first_bad < 0) & _nonfinite(out), torch.full_like(first_bad, step), first_bad)
        if (step + 1) % check_every == 0 or step + 1 == S:
            if bool((first_bad >= 0).any()):
                fb = first_bad.tolist()
                s0 = min(v for v in fb if v >= 0)
                idx = [i for i, v in enumerate(fb) if v == s0]
                raise SamplingError(
                    f"non-finite values at step {s0 + 1}/{S} (t={float(sampler.ts[s0]):.4f}) for sample(s) "
                    f"{idx} (seeds {[int(seeds[i]) for i in idx]}); the batch was stopped")
        if tracker is not None:
            state = tracker.after_step(state, ts_host[step + 1], step)
        kappa_tr.append(out.kappa.clone())
        logq_tr.append(state.logq.clone())
        if traj is not None:
            traj.append({k: v.clone() for k, v in state.x.items()})
        if callback is not None:
            callback(step + 1, S)
    res = SampleResult(
        x=state.x, logq=state.logq, kappa_trace=torch.stack(kappa_tr), logq_trace=torch.stack(logq_tr),
        t=sampler.ts, components=sampler.comps, extras=[o.extras for o in state.outputs], trajectory=traj)
    if tracker is not None:
        res.log_weight, res.ancestor, res.group = state.logw, tracker.ancestors(), tracker.group_of()
        res.ess_trace, res.resampled = tracker.traces()
        res.log_z = tracker.final_log_z(state.logw)
    return res


# the Jacobian helpers under the names the tests import from this module
_eval_models, _quadratic_forms, _bilinear_forms = eval_models, quadratic_forms, bilinear_forms
_noise_cancelling_directions, _oblique_and_corrections = noise_cancelling_directions, oblique_and_corrections
