"""The whole sampler step as a CUDA graph (core/step_graph.py, ``SamplerConfig(step_graph=True)``).

On the CPU the static-buffer body (``capture=False``) must reproduce the eager loop bit for bit: same
position, log-densities and kappa at every step, with the models' carried self-conditioning tensors
copied between steps. On CUDA (``gpu``) the captured graph must reproduce the eager CUDA run.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from models.analytic import frame_mixture_model
from superdiff_protein.core.igso3 import sample_uniform_so3
from superdiff_protein.core.kappa import AndRule, OrRule
from superdiff_protein.core.sampler import Sampler, SamplerConfig, superpose
from superdiff_protein.core.step_graph import StepGraph, StepGraphWarning, step_graph_unsupported
from superdiff_protein.frames.registry import load_model


def _exact(device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [frame_mixture_model(sample_uniform_so3((2, 5), generator=g),
                                torch.randn(2, 5, 3, generator=g, dtype=torch.float64), 0.05, name=f"f{i}")
            for i in range(2)]


def _loop(sampler, state, steps, runner):
    xs, ks, ls = [], [], []
    for _ in range(steps):
        out = runner(state)
        state = out.state
        xs.append({k: v.clone() for k, v in state.x.items()})
        ks.append(out.kappa.clone())
        ls.append(state.logq.clone())
    return xs, ks, ls, state


def _assert_same(a, b):
    for (xa, ka, la), (xb, kb, lb) in zip(zip(*a[:3]), zip(*b[:3])):
        for k in xa:
            assert torch.equal(xa[k], xb[k]), k
        assert torch.equal(ka, kb) and torch.equal(la, lb)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_static_body_matches_the_eager_loop_on_exact_models(dtype):
    models = _exact()
    cfg = SamplerConfig(num_steps=9, min_t=0.01, rng="counter", dtype=dtype)
    sampler = Sampler(models[0].space, models, OrRule(bias=[0.5, 0.0]), cfg)
    shapes = {"rot": (5,), "trans": (5, 3)}
    eager = _loop(sampler, sampler.init_state([3, 4, 5], shapes), 9, sampler.step)
    graph = StepGraph(sampler, capture=False)
    body = _loop(sampler, sampler.init_state([3, 4, 5], shapes), 9, graph)
    _assert_same(eager, body)
    assert graph.static is not None and int(graph.static.step) == 9      # the body ran steps 2..8


def test_static_body_carries_self_conditioning_of_a_real_model():
    """default-helix (FrameDiff network, self-conditioned): the carried CA positions are copied between steps."""
    models = [load_model("default-helix"), load_model("default-strand")]
    cfg = SamplerConfig(num_steps=6, min_t=0.01, rng="counter", dtype=torch.float64)
    space = models[0].diffuser.space
    sampler = Sampler(space, models, OrRule(), cfg)
    shapes = {"rot": (10,), "trans": (10, 3)}
    eager = _loop(sampler, sampler.init_state([7, 8], shapes), 6, sampler.step)
    graph = StepGraph(sampler, capture=False)
    body = _loop(sampler, sampler.init_state([7, 8], shapes), 6, graph)
    _assert_same(eager, body)
    for a, b in zip(eager[3].outputs, body[3].outputs):        # the last model outputs (extras) too
        assert torch.equal(a.extras["self_cond"], b.extras["self_cond"])
        assert torch.equal(a.extras["pred_trans"], b.extras["pred_trans"])


def test_config_and_eligibility():
    with pytest.raises(ValueError, match="rng='counter'"):
        SamplerConfig(step_graph=True).validate()
    models = _exact()
    cpu = Sampler(models[0].space, models, OrRule(), SamplerConfig(num_steps=3, rng="counter"))
    assert "CUDA" in step_graph_unsupported(cpu)
    # on a CPU the option warns once and steps eagerly: the same samples as without it
    cfg = SamplerConfig(num_steps=5, rng="counter", step_graph=True)
    with pytest.warns(StepGraphWarning, match="CUDA"):
        a = superpose(models[0].space, models, OrRule(), cfg, [1, 2], {"rot": (5,), "trans": (5, 3)})
    b = superpose(models[0].space, models, OrRule(), SamplerConfig(num_steps=5, rng="counter"), [1, 2],
                  {"rot": (5,), "trans": (5, 3)})
    assert torch.equal(a.x["trans"], b.x["trans"]) and torch.equal(a.kappa_trace, b.kappa_trace)


def test_capture_failure_falls_back_to_the_eager_step(monkeypatch):
    """A body that fails (as a capture can) leaves the run on eager steps from the same state."""
    models = _exact()
    cfg = SamplerConfig(num_steps=6, min_t=0.01, rng="counter")
    sampler = Sampler(models[0].space, models, OrRule(), cfg)
    shapes = {"rot": (5,), "trans": (5, 3)}
    eager = _loop(sampler, sampler.init_state([1], shapes), 6, sampler.step)
    graph = StepGraph(sampler, capture=False)
    monkeypatch.setattr(graph, "_body", lambda: (_ for _ in ()).throw(RuntimeError("operation not permitted")))
    with pytest.warns(StepGraphWarning, match="operation not permitted"):
        body = _loop(sampler, sampler.init_state([1], shapes), 6, graph)
    _assert_same(eager, body)
    assert graph.failed


def test_failed_capture_continues_from_the_static_state(monkeypatch):
    """A capture records and runs nothing, so after it fails the static buffers are still the step's input:
    the eager steps from there give the eager loop's samples (the CUDA calls are stubbed on the CPU)."""
    models = _exact()
    sampler = Sampler(models[0].space, models, OrRule(), SamplerConfig(num_steps=7, min_t=0.01, rng="counter"))
    shapes = {"rot": (5,), "trans": (5, 3)}
    eager = _loop(sampler, sampler.init_state([4, 9], shapes), 7, sampler.step)
    graph = StepGraph(sampler, capture=True)
    monkeypatch.setattr(graph, "_warm", graph._body)
    monkeypatch.setattr(graph, "_capture", lambda: (_ for _ in ()).throw(RuntimeError("capture refused")))
    with pytest.warns(StepGraphWarning, match="capture refused"):
        body = _loop(sampler, sampler.init_state([4, 9], shapes), 7, graph)
    _assert_same(eager, body)
    assert graph.failed and graph.graph is None


def _cuda_run(step_graph: bool, rule, compile_nets: bool = False, **cfg_kw):
    from superdiff_protein.frames.compiling import CompileFallbackWarning, compile_models

    dev = torch.device("cuda")
    models = [load_model("default-helix", device=dev), load_model("default-strand", device=dev)]
    if compile_nets:
        compile_models(models, "true", dev, "step-graph", ["h", "s"])
    cfg = SamplerConfig(num_steps=12, min_t=0.01, rng="counter", device=dev, dtype=torch.float64,
                        step_graph=step_graph, **cfg_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StepGraphWarning)
        warnings.simplefilter("error", CompileFallbackWarning)     # a silent eager fallback would prove nothing
        return superpose(models[0].diffuser.space, models, rule, cfg, [11, 12, 13],
                         {"rot": (40,), "trans": (40, 3)})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rule", ["or", "and_plain"])
def test_captured_step_reproduces_the_eager_cuda_run(rule):
    """The replayed graph launches the eager step's kernels on the same inputs: the same numbers."""
    # AND without its correction (no autograd): a batched linear solve inside the graph
    r, kw = (OrRule(), {}) if rule == "or" else (AndRule(), {"and_correction": False})
    eager = _cuda_run(False, r, **kw)
    graphed = _cuda_run(True, r, **kw)
    for k in eager.x:
        assert torch.equal(eager.x[k], graphed.x[k]), k
    assert torch.equal(eager.kappa_trace, graphed.kappa_trace)
    assert torch.equal(eager.logq, graphed.logq)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_step_with_compiled_networks_on_cuda(tmp_path, monkeypatch):
    """Inductor's kernels inside the captured step: the same numbers as the same compiled networks stepped
    eagerly (both runs use the same compiled code)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    eager = _cuda_run(False, OrRule(), compile_nets=True)
    graphed = _cuda_run(True, OrRule(), compile_nets=True)
    for k in eager.x:
        assert torch.equal(eager.x[k], graphed.x[k]), k


def test_generate_options_for_the_step_graph():
    """compile_mode=step-graph: refused without rng=counter (exit-2 error naming the fix), with or without
    compiling (compile=false graphs the step around eager networks); on a CPU the sampler steps eagerly."""
    from superdiff_protein.frames.generate_config import GenerateError, load_config, sampler_config, validate

    with pytest.raises(GenerateError, match="rng=counter"):
        validate(load_config({"compile_mode": "step-graph", "compile": "true"}))
    opts = validate(load_config({"compile_mode": "step-graph", "compile": "true", "rng": "counter"}))
    assert sampler_config(opts).step_graph is False                     # CPU: no CUDA graph
    with pytest.raises(GenerateError, match="rng=counter"):
        validate(load_config({"compile_mode": "step-graph", "compile": "false"}))
    assert validate(load_config({"compile_mode": "step-graph", "compile": "false", "rng": "counter"})).rng == "counter"
