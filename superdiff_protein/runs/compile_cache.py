"""Where ``torch.compile`` keeps its kernels: one Inductor cache folder per CPU capability.

Used by every compile in the project: the sampler's ``compile`` (frames/compiling.py), ``fold.compile``
(eval/fold.py) and ``trainer.compile`` (models/framediff/fit.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["compile_cache_dir", "configure_compile_cache", "cpu_capability_tag"]


def cpu_capability_tag() -> str:
    """The CPU vector capability ATen runs with here (``avx512``, ``avx2``, ``default``, ...): the hardware's, or
    lower when ``ATEN_CPU_CAPABILITY`` says so."""
    try:
        return str(torch.backends.cpu.get_cpu_capability()).lower()
    except Exception:  # pragma: no cover - very old torch
        return "unknown"


def compile_cache_dir() -> Path:
    """Inductor's cache directory: ``TORCHINDUCTOR_CACHE_DIR`` when set, else (set to)
    ``$XDG_CACHE_HOME/superdiff_protein/inductor/<cpu capability>``.

    One directory per CPU capability, because Inductor's FX graph cache does not key on it (torch 2.13): a CPU
    graph generated under one vector width and loaded under another (``ATEN_CPU_CAPABILITY=avx2`` after a default
    AVX-512 run, or a home directory shared by an AVX-512 and an AVX2 machine) gave wrong values or corrupted the
    heap (tests/test_compile_cache_isa.py). A user-set ``TORCHINDUCTOR_CACHE_DIR`` is used as given, unless it is
    torch's own shared default (``/tmp/torchinductor_<user>``), which torch itself writes into the variable."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    shared = _torch_default_dir()
    if env and os.path.abspath(env) != shared:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "superdiff_protein" / "inductor" / cpu_capability_tag()
    if env:
        # torch writes its shared default into the variable the first time anything asks for its cache folder
        # (imports of transformers do), so here it is torch's choice, not the user's: switch, and drop what
        # Inductor already cached in memory for the old folder
        _clear_inductor_caches()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def _torch_default_dir() -> str | None:
    """torch's own default cache folder (``/tmp/torchinductor_<user>``), shared by every CPU capability."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return os.path.abspath(default_cache_dir())
    except Exception:  # pragma: no cover - other torch layouts
        return None


def _clear_inductor_caches() -> None:
    try:
        from torch._inductor.utils import clear_caches

        clear_caches()
    except Exception:  # pragma: no cover
        pass


def configure_compile_cache(recompile_limit: int = 64) -> Path:
    """Turn Inductor's FX graph cache on in :func:`compile_cache_dir` and raise Dynamo's recompile limit to at
    least ``recompile_limit``; call before the first ``torch.compile`` of a process. Returns the cache directory."""
    path = compile_cache_dir()
    try:
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
    except Exception:  # pragma: no cover - very old torch
        pass
    try:
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), recompile_limit))
    except Exception:  # pragma: no cover
        pass
    return path
