"""The whole sampler step, model calls included, as one CUDA graph (``SamplerConfig(step_graph=True)``).

At batch 1 a step is a few hundred small kernels; launching them one by one from Python costs more than the
GPU work (issue 16: 5.6 s per backbone with only the networks graphed). :class:`StepGraph` captures one whole
:meth:`Sampler.step <superdiff_protein.core.sampler.Sampler.step>` and replays it for every later step:

* **Static state.** The step reads and writes one set of buffers: the position, the tracked log-densities,
  the models' carried tensors (self-conditioning) and a 0-d step counter on the device. The graph ends by
  copying the new state into them and advancing the counter, so a replay is the next step.
* **Per-step values from the device.** ``t`` and ``dtau`` are gathered from device copies of the grid at the
  counter, and the noise comes from the counter-based streams (``rng="counter"``), keyed by the same counter.
  So the captured step reads no host value, and a replay gives what the eager step would give.
* **Warm-up.** Steps before ``warmup`` (default 2) run eagerly: FrameDiff's extra self-conditioning pass and
  Proteus's template-free first call happen there, and a compiled network compiles its shape there. The next
  step runs the graph's body once eagerly on a side stream (CUDA's lazy initialisation), then the graph is
  captured and replayed from the step after.
* **What is not captured.** Rules with importance weights (resampling changes the batch), Hutchinson probes and
  the AND correction (autograd), injected noise: :meth:`StepGraph.for_run` says why with one warning and the
  run steps eagerly. A capture that fails also falls back to eager stepping, with one warning, from the state
  before the failed step.
* ``capture=False`` runs the same static-buffer step without a graph, by calling its body each step. That is
  how the CPU tests check the body against the eager loop.

Networks compiled with ``torch.compile`` (Inductor's default mode) can sit inside the graph: their kernels are
ordinary launches. Networks already graphed on their own (``reduce-overhead``) cannot.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import Tensor

__all__ = ["StepGraph", "StepGraphWarning", "clone_tree", "step_graph_unsupported"]


class StepGraphWarning(RuntimeWarning):
    """The step could not be captured as a CUDA graph; the run steps eagerly (same results, eager speed)."""


def step_graph_unsupported(sampler: Any, smc_or_noise: bool = False) -> str | None:
    """Why ``sampler``'s step cannot be captured, or None when it can (``rng="counter"`` is checked by
    ``SamplerConfig.validate``)."""
    if sampler.device.type != "cuda":
        return f"it needs a CUDA device, not {sampler.device.type}"
    if sampler.fkc or smc_or_noise:
        return "importance weights, resampling or injected noise change the batch between steps"
    if getattr(sampler, "guide", None) is not None:
        return "a guide is host code the graph does not hold"
    if sampler.use_lap or sampler.and_corr:
        return "Hutchinson probes and the AND correction take vector-Jacobian products (autograd)"
    return None


def _tensors(obj: Any) -> list[Tensor]:
    """The tensors of a model state (tensors, dataclasses, dicts, lists, tuples), in a fixed order."""
    if isinstance(obj, Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in _tensors(getattr(obj, f.name))]
    if isinstance(obj, dict):
        return [t for k in obj for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def clone_tree(obj: Any) -> Any:
    """``obj`` (tensors in dataclasses, dicts, lists, tuples) with every tensor cloned: the static buffers of the
    models' carried state here, the copies of CUDA-graph outputs in frames/compiling.py."""
    if isinstance(obj, Tensor):
        return obj.clone()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: clone_tree(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_tree(v) for v in obj)
    return obj


def _copy_into(dst: list[Tensor], src: list[Tensor]) -> None:
    if len(dst) != len(src) or any(d.shape != s.shape or d.dtype != s.dtype for d, s in zip(dst, src)):
        raise RuntimeError("a model's carried state changed its tensors between steps: "
                           f"{[tuple(d.shape) for d in dst]} -> {[tuple(s.shape) for s in src]}")
    for d, s in zip(dst, src):
        d.copy_(s)


class StepGraph:
    """Runs a :class:`~superdiff_protein.core.sampler.Sampler`'s steps, from ``warmup`` on as replays of one
    captured CUDA graph (module docstring). Called like ``sampler.step``: ``out = runner(state)``.

    Args:
        sampler: the sampler (its device, grid and models).
        warmup: steps run eagerly before the graph (at least 2: the models' first calls differ).
        capture: capture a CUDA graph (default: on CUDA); False calls the static-buffer body each step.
    """

    def __init__(self, sampler: Any, warmup: int = 2, capture: bool | None = None):
        self.sampler = sampler
        self.warmup = max(2, int(warmup))
        self.capture = sampler.device.type == "cuda" if capture is None else bool(capture)
        self.failed = False
        self.graph: Any = None
        self.static = None          # the SamplerState whose tensors the body reads and writes
        self.out = None             # the body's StepOutput (kappa, dlogq, model outputs: graph outputs)
        self.next_step = 0
        dev, dt = sampler.device, sampler.dtype
        self._ts = sampler.ts.to(device=dev, dtype=dt)
        self._dtaus = torch.tensor([float(d) for d in sampler.dtaus], dtype=dt, device=dev)

    @classmethod
    def for_run(cls, sampler: Any, smc_or_noise: bool = False, **kw: Any) -> "StepGraph | None":
        """A runner for ``superpose``, or None (after one :class:`StepGraphWarning`) when the step cannot be
        captured."""
        why = step_graph_unsupported(sampler, smc_or_noise)
        if why is not None:
            warnings.warn(f"step_graph: the step is not captured ({why}); stepping eagerly", StepGraphWarning,
                          stacklevel=3)
            return None
        return cls(sampler, **kw)

    # -- the captured body
    def _body(self):
        st = self.static
        idx = st.step.reshape(1)
        t = self._ts.index_select(0, idx).reshape(())
        dtau = self._dtaus.index_select(0, idx).reshape(())
        out = self.sampler.step(st, at=(t, dtau))
        for k, v in out.state.x.items():
            st.x[k].copy_(v)
        st.logq.copy_(out.state.logq)
        _copy_into(_tensors(st.model_states), _tensors(out.state.model_states))
        st.step.add_(1)
        return out

    # the states and outputs are the sampler's dataclasses, rebuilt with dataclasses.replace (no import of the
    # sampler module, which imports this one)
    def _result(self):
        st, out = self.static, self.out
        self.next_step += 1
        state = dataclasses.replace(st, step=self.next_step, outputs=out.state.outputs)
        return dataclasses.replace(out, state=state)

    def _start(self, state) -> None:
        step = torch.tensor(int(state.step), dtype=torch.int64, device=self.sampler.device)
        self.static = dataclasses.replace(state, x={k: v.clone() for k, v in state.x.items()},
                                          logq=state.logq.clone(), step=step, outputs=[], logw=None,
                                          model_states=[clone_tree(s) for s in state.model_states])

    def __call__(self, state, noise=None):
        if noise is not None:
            raise ValueError("step_graph: injected noise cannot be replayed by a captured step")
        i = int(state.step)
        if self.failed or i < self.warmup:
            return self.sampler.step(state)
        if self.static is None:                       # first body step: eager (on a side stream on CUDA)
            self._start(state)
            self.next_step = i
            try:
                self.out = self._warm()
            except Exception as e:  # noqa: BLE001 - fall back to the eager step from the same state
                return self._fallback(state, e)
            return self._result()
        if i != self.next_step:
            raise RuntimeError(f"step_graph: expected step {self.next_step}, got {i}")
        if not self.capture:
            self.out = self._body()
            return self._result()
        if self.graph is None:
            try:
                self._capture()
            except Exception as e:  # noqa: BLE001 - a capture runs nothing: the static buffers are this step's input
                st = self.static
                return self._fallback(dataclasses.replace(st, step=self.next_step, outputs=state.outputs), e)
        self.graph.replay()
        return self._result()

    def _warm(self):
        if not self.capture:
            return self._body()
        s = torch.cuda.Stream(self.sampler.device)
        s.wait_stream(torch.cuda.current_stream(self.sampler.device))
        with torch.cuda.stream(s):
            out = self._body()
        torch.cuda.current_stream(self.sampler.device).wait_stream(s)
        return out

    def _capture(self) -> None:
        torch.cuda.synchronize(self.sampler.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.out = self._body()
        self.graph = g

    def _fallback(self, state, err: BaseException):
        import traceback

        self.failed = True
        msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        tb = traceback.extract_tb(err.__traceback__)
        where = f" at {tb[-1].filename.rsplit('/', 2)[-1]}:{tb[-1].lineno} ({tb[-1].line})" if tb else ""
        warnings.warn(f"step_graph: capturing the step failed ({type(err).__name__}: {msg}{where}); stepping "
                      "eagerly from here (same results, eager speed)", StepGraphWarning, stacklevel=3)
        if torch.cuda.is_available() and self.sampler.device.type == "cuda":
            torch.cuda.synchronize(self.sampler.device)
        return self.sampler.step(state)
