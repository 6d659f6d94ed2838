"""The reverse-time grid of the sampler (``SamplerConfig.time_grid``) and its step sizes."""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["time_grid", "step_sizes"]


def time_grid(num_steps: int, min_t: float, kind: str = "uniform", dtype=torch.float64) -> Tensor:
    """Descending times from 1 to ``min_t``.

    ``uniform``: equal steps (FrameDiff, the paper). ``quadratic``: ``t = min_t + (1 - min_t) u^2`` for
    ``u`` uniform -- steps shrink towards ``min_t`` where the marginals are sharpest, which cuts the
    discretisation error of both the sampler and the density estimates (docs/superposition.md).
    ``cosine``: ``t = min_t + (1 - min_t) (1 - cos(pi u)) / 2``: fine steps at both ends, near ``min_t`` (local
    geometry) and near 1 (where the VP drift is largest), coarse in the middle.
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
    # The grid must not depend on the CPU's kernel path: ATen's scalar and vectorised linspace and cos differ in
    # the last bit (ATEN_CPU_CAPABILITY=default vs avx2). So u = k / n by IEEE division (exact to rounding on
    # every path) and the cosine from Python's math.cos; everything in float64, cast at the end.
    n = num_steps
    u = torch.arange(n, -1, -1, dtype=torch.float64) / n
    if kind == "uniform":
        ts = min_t + (1.0 - min_t) * u
    elif kind == "quadratic":
        ts = min_t + (1.0 - min_t) * u * u
    elif kind == "cosine":
        c = torch.tensor([math.cos(math.pi * k / n) for k in range(n, -1, -1)], dtype=torch.float64)
        ts = min_t + (1.0 - min_t) * 0.5 * (1.0 - c)
        ts[0], ts[-1] = 1.0, min_t
    else:
        raise ValueError(f"unknown time grid {kind!r}; choose 'uniform', 'quadratic', 'cosine' or 'framediff'")
    return ts.to(dtype)


def step_sizes(ts: Tensor, kind: str = "uniform") -> list[float]:
    """Reverse-time step sizes ``dtau`` for a grid from :func:`time_grid`: the grid differences, except
    for ``framediff`` where every step is ``1 / num_t = 1 / len(ts)`` as in the official samplers."""
    n = ts.numel() - 1
    if kind == "framediff":
        return [1.0 / (n + 1)] * n
    return [float(ts[i] - ts[i + 1]) for i in range(n)]
