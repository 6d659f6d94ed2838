"""``torch.compile`` for frame predictors: the ``compile`` and ``compile_mode`` options of a generation run.

:func:`compile_models` replaces the ``predictor`` of every loaded frame model (a
:class:`~models.frame_models.FrameScoreModel`, or any model whose ``predictor`` is a ``torch.nn.Module``) by a
:class:`CompiledPredictor`. It names no concrete model: whatever network the predictor holds is compiled as it is.

* **Static shapes.** Each (batch, length, dtype) shape is compiled once (``dynamic=False``): a length bucket of a
  run is one shape, the last, smaller batch of a length another. Each new shape pays the compile time again
  (46-68 s per network on an H200, about a minute on a CPU); it is logged once per shape and network.
* **Self-conditioning.** The calls without a self-conditioning input (FrameDiff's extra first pass, Proteus's
  first call without a template: one call per model and batch) run eagerly. Only the steady-state call, the
  one that runs at every step, is compiled, which halves the compile time.
* **Gradients.** Calls with autograd on (the Hutchinson estimator, the AND correction: vector-Jacobian products
  through the network) run eagerly: only the no-grad inference graph is compiled.
* **Cache.** Inductor's FX graph cache is on and lives in ``TORCHINDUCTOR_CACHE_DIR``; when that is unset it is
  set to ``$XDG_CACHE_HOME/superdiff_protein/inductor/<cpu capability>`` (default ``~/.cache/...``), so a second
  run with the same shapes loads the compiled kernels instead of compiling them again (one folder per CPU
  capability: :func:`compile_cache_dir` says why).
* **Fallback.** When compiling fails, the predictor runs eagerly from then on and the run emits exactly one
  :class:`CompileFallbackWarning` (for all its models together).
* ``mode="reduce-overhead"`` adds CUDA graphs (one graph replay per forward instead of hundreds of kernel
  launches). CUDA-graph outputs live in memory that the next replay overwrites, so the outputs are cloned.
* ``mode="step-graph"`` compiles the networks as ``default`` does; the generation run then also sets
  ``SamplerConfig(step_graph=True)``, which captures the whole sampler step, these networks, the scores and the
  sampler's own arithmetic, as one CUDA graph (core/step_graph.py; needs ``rng=counter``).

Compiled and eager forwards differ by float32 rounding only (another fusion and summation order):
``tests/test_compile.py`` bounds that with the rounding rule of docs/testing.md.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..core.step_graph import clone_tree
from ..runs.compile_cache import compile_cache_dir, configure_compile_cache, cpu_capability_tag

__all__ = ["COMPILE_CHOICES", "COMPILE_MODES", "CompileFallbackWarning", "CompileSession", "CompiledPredictor",
           "compile_cache_dir", "compile_models", "configure_compile_cache", "cpu_capability_tag", "resolve_compile"]

COMPILE_CHOICES = ("auto", "true", "false")
COMPILE_MODES = ("default", "reduce-overhead", "step-graph")
#: dynamo's limit of recompilations per function: one per shape (lengths x last-batch sizes x dtypes)
RECOMPILE_LIMIT = 64


class CompileFallbackWarning(RuntimeWarning):
    """Compiling a network failed; it runs eagerly (same results, eager speed)."""


def resolve_compile(option: Any, device: torch.device | str) -> bool:
    """``auto``: compile on CUDA, eager elsewhere (on a CPU the compile time outweighs the gain for the default
    job); ``true`` / ``false``: as given."""
    s = str(option).lower()
    if s == "auto":
        return torch.device(device).type == "cuda"
    return s == "true"


@dataclasses.dataclass
class CompileSession:
    """What the compiled predictors of one run share: the log function, the one fallback warning, and the
    warm-up record (``(name, shape, seconds)`` per compiled shape)."""

    log: Callable[[str], None] | None = None
    warned: bool = False
    warmups: list = dataclasses.field(default_factory=list)

    def fallback(self, name: str, err: BaseException) -> None:
        if not self.warned:
            self.warned = True
            # two lines: Inductor's first is only "backend='inductor' raised:", the next names the error
            lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
            msg = " ".join(lines[:2])
            warnings.warn(f"compile: compiling {name} failed ({type(err).__name__}: {msg[:400]}); running it eagerly "
                          "(same results, eager speed); compile=false skips compiling", CompileFallbackWarning,
                          stacklevel=3)


def _shape_key(args: tuple, kwargs: dict) -> tuple:
    out = []
    for v in list(args) + [kwargs[k] for k in sorted(kwargs)]:
        out.append((tuple(v.shape), v.dtype, v.device.type) if isinstance(v, Tensor) else (v is None,))
    return tuple(out)


class CompiledPredictor(nn.Module):
    """A frame predictor whose steady-state calls run through ``torch.compile`` (module docstring).

    Behaves as the wrapped predictor: same call signature ``(rotmats, trans, t, mask, self_cond_state, **kw)``,
    same outputs; other attributes (``config``, ``conf``, ``diffuser_cfg``, ...) are the inner predictor's.

    Args:
        inner: the predictor (a ``torch.nn.Module``).
        name: shown in the warm-up log line and the fallback warning.
        mode: ``default``, ``reduce-overhead`` (CUDA graphs of the network) or ``step-graph`` (compiled as
            ``default``; the sampler graphs the whole step).
        session: shared by the predictors of one run (one fallback warning, one log).
        backend: torch.compile backend (``inductor``; tests use ``aot_eager`` for a fast graph-capture check).
    """

    def __init__(self, inner: nn.Module, name: str = "predictor", mode: str = "default",
                 session: CompileSession | None = None, backend: str = "inductor"):
        super().__init__()
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        self.inner = inner
        self.name, self.mode, self.backend = name, mode, backend
        self.session = session or CompileSession()
        self.failed = False
        self._seen: set = set()
        self.__dict__["_compiled"] = None        # not a submodule: the state dict stays the inner one's

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def _compiled_fn(self):
        if self._compiled is None:
            configure_compile_cache(RECOMPILE_LIMIT)
            # step-graph: the networks compile as in default mode; the sampler captures the whole step around them
            kw = {"mode": self.mode if self.mode == "reduce-overhead" else None} if self.backend == "inductor" else {}
            self.__dict__["_compiled"] = torch.compile(self.inner, backend=self.backend, dynamic=False, **kw)
        return self._compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        cond = args[4] if len(args) > 4 else kwargs.get("self_cond_state")
        if self.failed or cond is None or torch.is_grad_enabled():
            return self.inner(*args, **kwargs)
        key = _shape_key(args, kwargs)
        if key in self._seen:
            return self._run(args, kwargs)
        t0 = time.perf_counter()
        try:
            out = self._run(args, kwargs)
            if torch.cuda.is_available() and any(isinstance(a, Tensor) and a.is_cuda for a in args):
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - any compile failure falls back to eager
            if isinstance(e, torch.cuda.OutOfMemoryError):     # out of memory is not a compile failure
                raise
            self.failed = True
            self.session.fallback(self.name, e)
            return self.inner(*args, **kwargs)
        dt = time.perf_counter() - t0
        self._seen.add(key)
        shape = tuple(args[1].shape[:2]) if len(args) > 1 and isinstance(args[1], Tensor) else ()
        self.session.warmups.append((self.name, shape, dt))
        if self.session.log is not None:
            what = " x ".join(map(str, shape))
            where = f" on {args[1].device}" if len(args) > 1 and isinstance(args[1], Tensor) else ""
            self.session.log(f"compile: {self.name} ready for batch x length {what}{where} in {dt:.1f} s "
                             f"(mode {self.mode}; cache {compile_cache_dir()})")
        return out

    def _run(self, args: tuple, kwargs: dict) -> Any:
        fn = self._compiled_fn()
        # contiguous inputs: dynamo's guards include the strides, and the same shape arrives with other strides
        # (an expanded scalar t, a sliced state); without this each variant would compile again
        args = tuple(a.contiguous() if isinstance(a, Tensor) else a for a in args)
        kwargs = {k: v.contiguous() if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
            return clone_tree(fn(*args, **kwargs))
        return fn(*args, **kwargs)


def compile_models(models: Sequence[Any], option: Any = "auto", device: torch.device | str = "cpu",
                   mode: str = "default", labels: Sequence[str] | None = None,
                   log: Callable[[str], None] | None = None, backend: str = "inductor") -> CompileSession | None:
    """Wrap the ``predictor`` of each model that has a ``torch.nn.Module`` predictor in a
    :class:`CompiledPredictor` (in place), when ``option`` resolves to compiling on ``device``
    (:func:`resolve_compile`). Models without such a predictor (exact models, image models) are left alone.
    Returns the run's :class:`CompileSession`, or None when nothing is compiled."""
    if not resolve_compile(option, device):
        return None
    session = CompileSession(log=log)
    labels = list(labels) if labels is not None else [getattr(m, "name", f"model{i}") for i, m in enumerate(models)]
    wrapped = 0
    for m, lab in zip(models, labels):
        pred = getattr(m, "predictor", None)
        if isinstance(pred, nn.Module) and not isinstance(pred, CompiledPredictor):
            m.predictor = CompiledPredictor(pred, name=lab, mode=mode, session=session, backend=backend)
            wrapped += 1
    return session if wrapped else None
