"""The sampler's step on its own (superdiff_protein.core.sampler.Sampler.step), on exact frame models.

* a step called alone, from a state rebuilt out of superpose()'s records, reproduces that step's record bit for bit
  (kappa, the next state, the next log-densities); its increments are the recorded differences;
* superpose() is the loop of steps: a hand-written loop of Sampler.step gives the same traces bit for bit;
* determinism: the same state (cloned, generators included) gives the same step twice; the clone leaves the
  original untouched;
* one step does not depend on the batch it runs in (each sample its own random stream and its own kappa).
"""
import pytest
import torch

from models.analytic import frame_mixture_model
from superdiff_protein.core.igso3 import sample_uniform_so3
from superdiff_protein.core.kappa import AndRule, OrRule
from superdiff_protein.core.sampler import (BiasedEstimatorWarning, Sampler, SamplerConfig, SamplerState, StepOutput,
                                            make_generators, superpose)
from tolerances import close, magnitude, rounding_tol

F64 = torch.float64
N = 5
SHAPES = {"rot": (N,), "trans": (N, 3)}
pytestmark = pytest.mark.filterwarnings("ignore::superdiff_protein.core.sampler.BiasedEstimatorWarning")


def _models(seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda name: frame_mixture_model(sample_uniform_so3((2, N), generator=g),
                                          torch.randn(2, N, 3, generator=g, dtype=F64), 0.05, name=name)
    return [mk("f1"), mk("f2")]


def _equal_state(a: SamplerState, b: SamplerState):
    assert a.step == b.step
    assert torch.equal(a.logq, b.logq)
    for k in a.x:
        assert torch.equal(a.x[k], b.x[k]), k


@pytest.mark.parametrize("scope", ["joint", "per_component"])
def test_step_alone_reproduces_the_loop_record(scope):
    """AND with its Itô correction (graphs, quadratic forms) at noise 0.5, recorded noise: each step, called on a
    fresh state built from superpose()'s trajectory and traces, gives that step's kappa, state and log-densities
    exactly, and increments equal to the recorded differences up to the rounding of one addition."""
    models, seeds, steps = _models(), [7, 8, 9], 6
    cfg = SamplerConfig(num_steps=steps, min_t=0.05, noise_scale=0.5, kappa_scope=scope, time_grid="quadratic")
    gen = torch.Generator().manual_seed(1)
    noise = [{k: torch.randn(len(seeds), N, 3, generator=gen, dtype=F64) for k in ("rot", "trans")}
             for _ in range(steps)]
    res = superpose(models[0].space, models, AndRule(), cfg, seeds, SHAPES, save_trajectory=True,
                    noise_fn=lambda s, t, x: noise[s])
    sampler = Sampler(models[0].space, models, AndRule(), cfg)
    assert sampler.num_steps == steps and torch.equal(sampler.ts, res.t)
    for s in range(steps):
        state = SamplerState(x={k: v.clone() for k, v in res.trajectory[s].items()}, logq=res.logq_trace[s].clone(),
                             model_states=[None, None], generators=make_generators(seeds), step=s)
        out = sampler.step(state, noise[s])
        assert isinstance(out, StepOutput) and out.kappa.shape == out.dlogq.shape == (len(seeds), 2, 2)
        assert torch.equal(out.kappa, res.kappa_trace[s])
        assert torch.equal(out.state.logq, res.logq_trace[s + 1])
        for k in ("rot", "trans"):
            assert torch.equal(out.state.x[k], res.trajectory[s + 1][k])
        assert out.state.step == s + 1
        rec = res.logq_trace[s + 1] - res.logq_trace[s]
        close(out.dlogq, rec, rounding_tol(F64, magnitude(res.logq_trace[s], res.logq_trace[s + 1]), 3),
              f"increments of step {s}")
    with pytest.raises(IndexError, match="outside the time grid"):
        sampler.step(out.state)


@pytest.mark.parametrize("rule, kw", [(OrRule(), dict(estimator="hutchinson", noise_scale=0.1, num_probes=2)),
                                      (AndRule(), dict(estimator="hutchinson", sampling="ode")),
                                      (AndRule(bias=[0.0, 1.0]), dict(init_logq="model", noise_scale=0.3,
                                                                       kappa_scope="per_component"))],
                         ids=["or_hutchinson", "and_ode", "and_model_start"])
def test_superpose_is_the_loop_of_steps_and_steps_are_deterministic(rule, kw):
    models, seeds = _models(1), [3, 1, 4]
    cfg = SamplerConfig(num_steps=8, min_t=0.05, **kw)
    ref = superpose(models[0].space, models, rule, cfg, seeds, SHAPES)
    sampler = Sampler(models[0].space, models, rule, cfg)
    state = sampler.init_state(seeds, SHAPES)
    assert torch.equal(state.logq, ref.logq_trace[0])
    for s in range(cfg.num_steps):
        if s == 4:                                   # replay this step from a clone, twice: the same bits
            snap = state.clone()
            a, b = sampler.step(snap.clone()), sampler.step(snap.clone())
            _equal_state(a.state, b.state)
            assert torch.equal(a.kappa, b.kappa) and torch.equal(a.dlogq, b.dlogq)
        out = sampler.step(state)
        if s == 4:                                   # the clones consumed their own random streams only
            _equal_state(out.state, a.state)
            assert torch.equal(out.kappa, a.kappa)
        assert torch.equal(out.kappa, ref.kappa_trace[s]) and torch.equal(out.state.logq, ref.logq_trace[s + 1])
        state = out.state
    for k in ("rot", "trans"):
        assert torch.equal(state.x[k], ref.x[k])


def _row(state: SamplerState, j: int) -> SamplerState:
    """Sample j of a state as a batch of one (exact models carry no model state)."""
    one = state.clone()
    return SamplerState({k: v[j:j + 1] for k, v in one.x.items()}, one.logq[j:j + 1], [None, None],
                        [one.generators[j]], one.step, None if one.and_gap0 is None else one.and_gap0[j:j + 1])


@pytest.mark.parametrize("scope", ["joint", "per_component"])
def test_one_step_is_batch_independent(scope):
    """Mid-run, one step (AND, Hutchinson probes, correction, noise 0.5) of a batch of 4 and of one of its samples
    alone agree to rounding: the same arithmetic per sample, only the batched kernels' blocking may differ."""
    models, seeds = _models(2), [10, 11, 12, 13]
    cfg = SamplerConfig(num_steps=10, min_t=0.05, noise_scale=0.5, estimator="hutchinson", kappa_scope=scope)
    sampler = Sampler(models[0].space, models, AndRule(), cfg)
    state = sampler.init_state(seeds, SHAPES)
    for _ in range(5):
        state = sampler.step(state).state
    for j in (0, 2):
        alone = sampler.step(_row(state, j))
        big = sampler.step(state.clone())
        # rounding of chains of ~3 N x 4 operations on operands of the values' size; cond 1e3: a generous allowance
        # for the AND solve (no closed form here). A sample leaking into another moves these values by O(1).
        scale = magnitude(big.state.logq, big.dlogq, floor=1.0)
        close(alone.dlogq[0], big.dlogq[j], rounding_tol(F64, scale, 3 * N * 4, cond=1e3), f"dlogq of sample {j}")
        close(alone.state.logq[0], big.state.logq[j], rounding_tol(F64, scale, 3 * N * 4, cond=1e3), "logq")
        close(alone.kappa[0], big.kappa[j], rounding_tol(F64, magnitude(big.kappa), 3 * N * 4, cond=1e3), "kappa")
        for k in ("rot", "trans"):
            close(alone.state.x[k][0], big.state.x[k][j], rounding_tol(F64, magnitude(big.state.x[k]), 3 * N * 4,
                                                                       cond=1e3), k)


def test_sampler_warns_at_its_caller():
    models = _models()
    with pytest.warns(BiasedEstimatorWarning) as rec:
        Sampler(models[0].space, models, OrRule(), SamplerConfig(num_steps=2, noise_scale=0.1))
    assert rec[0].filename == __file__
    with pytest.warns(BiasedEstimatorWarning) as rec:
        superpose(models[0].space, models, OrRule(), SamplerConfig(num_steps=2, noise_scale=0.1), [0], SHAPES)
    assert rec[0].filename == __file__
