"""The sampler's reverse-time grids (superdiff_protein/core/timegrid.py): endpoints, order, spacing laws."""
from __future__ import annotations

import math

import pytest
import torch

from superdiff_protein.core.timegrid import step_sizes, time_grid

KINDS = ["uniform", "quadratic", "cosine", "framediff"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 7, 50])
def test_grid_runs_from_one_to_min_t_strictly_descending(kind, n):
    min_t = 0.01
    ts = time_grid(n, min_t, kind)
    assert ts.dtype == torch.float64 and ts.numel() == n + 1
    assert float(ts[0]) == 1.0 and abs(float(ts[-1]) - min_t) <= 4 * math.ulp(1.0)
    assert bool((ts[:-1] > ts[1:]).all())
    dt = step_sizes(ts, kind)
    assert len(dt) == n and all(d > 0 for d in dt)


def test_spacing_laws():
    """uniform: equal steps; quadratic: steps grow linearly towards t = 1; cosine: symmetric, finest at both ends."""
    n, min_t = 50, 0.01
    du = torch.diff(time_grid(n, min_t, "uniform")).neg()
    assert float((du - du.mean()).abs().max()) <= 1e-15
    dq = torch.diff(time_grid(n, min_t, "quadratic")).neg()
    # t = min_t + (1 - min_t) u^2 on u = k/n: step k (from the top) is (1 - min_t) (2(n-k) - 1) / n^2
    k = torch.arange(n, dtype=torch.float64)
    assert torch.allclose(dq, (1 - min_t) * (2 * (n - k) - 1) / n ** 2, rtol=0, atol=1e-14)
    dc = torch.diff(time_grid(n, min_t, "cosine")).neg()
    assert torch.allclose(dc, dc.flip(0), rtol=0, atol=1e-14)            # symmetric about the middle
    assert float(dc[0]) < float(du[0]) / 10 and float(dc[-1]) < float(du[-1]) / 10
    # steps (1 - min_t)/2 (cos pi u_k+1 - cos pi u_k); the largest straddles u = 1/2 (n even): (1 - min_t)/2 sin(pi/n)
    assert float(dc.max()) == pytest.approx((1 - min_t) / 2 * math.sin(math.pi / n), rel=1e-12)
    assert float(dc.sum()) == pytest.approx(1 - min_t, abs=1e-14)


def test_unknown_grid_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="cosine"):
        time_grid(10, 0.01, "log")


def test_grids_do_not_depend_on_the_cpu_kernel_path():
    """Every grid is bit-identical under ATen's scalar kernels and its vectorised ones (ATen's scalar and
    vectorised cos differ in the last bit, so the cosine grid must not use them)."""
    import os
    import subprocess
    import sys

    code = ("import hashlib, torch; from superdiff_protein.core.timegrid import time_grid; h = hashlib.sha256()\n"
            "for k in ('uniform', 'quadratic', 'cosine', 'framediff'):\n"
            "    for n in (1, 7, 50, 99, 100, 499): h.update(time_grid(n, 0.01, k).numpy().tobytes())\n"
            "print(torch.backends.cpu.get_cpu_capability(), h.hexdigest())")
    out = {}
    for cap in ("default", "avx2"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        out[cap] = r.stdout.split()
    if out["default"][0] == out["avx2"][0]:
        pytest.skip(f"this CPU offers only ATen's {out['default'][0]} kernels")
    assert out["default"][1] == out["avx2"][1], out
