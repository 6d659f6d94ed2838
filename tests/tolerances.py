"""The one tolerance rule of the numeric and fixture tests (written out, with its reasons, in docs/testing.md).

Two evaluations of the same mathematical quantity (ours and the official code's, or one batch size and another, or
one CPU's kernels and another's) differ only by rounding. How much rounding a computation has follows from its
arithmetic, so every bound is built from

* ``eps(dtype)``: the machine epsilon of the precision the computation runs in (the least precise stage);
* ``scale``: the magnitude of the operands (not of the result: a small difference of large numbers keeps the
  large numbers' absolute error);
* ``n_ops``: the length of the longest chain of roundings (a sum of n terms, a dot product of length n, ...);
  independent roundings add like a random walk, so the error grows like ``sqrt(n_ops)``;
* ``cond``: the condition number of the formula (how much it amplifies a relative perturbation of its inputs).

A priori (closed-form formulas, where ``cond`` and ``n_ops`` are known)::

    atol = C * eps(dtype) * scale * cond * sqrt(n_ops)                       (rounding_tol)

Measured (deep networks and multi-step samplers, whose ``cond`` has no closed form): run our own implementation on
the same inputs once in its working dtype and once in float64. Their difference ``e`` is the rounding error of one
float32 evaluation order (float64's own error is 2^29 times smaller), with the conditioning of the whole
computation in it. Another evaluation order (the official code, another CPU's kernels, another batch composition)
has an error of the same kind, so::

    atol = C_MEASURED * max|ours_dtype - ours_float64| + rounding_tol(dtype, scale)   (shadow_tol)

``C = 4`` (a priori, random-walk model): a factor 2 because two independent evaluations each carry their own
rounding, and a factor 2 for the tail (4 standard deviations of a random walk of ``n_ops`` roundings of at most
``eps/2`` each is ``1.15 eps sqrt(n_ops)``, times sqrt(2) for two evaluations: below ``2 eps sqrt(n_ops)``).

``C_MEASURED = 16``: ``e`` is the error of *our* kernels. A vectorised dot product accumulates 8 or 16 partial sums
(AVX2 / AVX-512), a scalar loop one: its random-walk error is up to sqrt(16) = 4 times larger. Hence 4 (another
kernel family) x 2 (two evaluations) x 2 (the maximum of an error over a tensor varies between orders). Measured:
small and medium FrameDiff networks, 3 t, 2 seeds, scalar (ATEN_CPU_CAPABILITY=default) vs AVX2 vs AVX-512 vs two
threads differ by up to 7.6 e; the image pipeline by up to 2.7 e.

A bug moves the compared values by the size of the values themselves, orders of magnitude above these bounds, so
the tests still fail on real differences.

``close`` checks ``|actual - expected| <= atol`` elementwise (``atol`` a number or a broadcastable tensor) and reports
the observed error against the allowed one. With ``SUPERDIFF_TOL_LOG=<file>`` every check appends one JSON line
(test, quantity, observed, allowed) to that file: the margins quoted in docs/testing.md come from there.
"""
from __future__ import annotations

import json
import math
import os

import torch

C = 4.0
C_MEASURED = 16.0


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of ``dtype`` (float32: 1.19e-7, float64: 2.22e-16, bfloat16: 7.8e-3)."""
    return float(torch.finfo(dtype).eps)


def rounding_tol(dtype: torch.dtype, scale=1.0, n_ops: float = 1, cond=1.0, c: float = C):
    """A-priori rounding bound ``c * eps(dtype) * scale * cond * sqrt(n_ops)``. ``scale`` and ``cond`` may be tensors
    (an elementwise bound)."""
    return c * eps(dtype) * scale * cond * math.sqrt(max(1.0, float(n_ops)))


def magnitude(*xs, floor: float = 0.0) -> float:
    """The largest ``|x|`` over the given tensors (the ``scale`` of a comparison), at least ``floor``."""
    m = floor
    for x in xs:
        if x is not None and torch.as_tensor(x).numel():
            m = max(m, float(torch.as_tensor(x).double().abs().max()))
    return m


def shadow_error(low: torch.Tensor, high: torch.Tensor) -> float:
    """``max |low - high|``: the measured rounding error of ``low`` (working dtype) against ``high`` (float64)."""
    return float((low.double() - high.double()).abs().max()) if low.numel() else 0.0


def shadow_tol(low: torch.Tensor, high: torch.Tensor, dtype: torch.dtype | None = None, scale=None,
               n_ops: float = 1, c: float = C_MEASURED) -> float:
    """Measured bound ``c * max|low - high| + rounding_tol(dtype, scale, n_ops)``: ``low`` is our computation in its
    working dtype (default: ``low.dtype``), ``high`` the same computation in float64; ``scale`` defaults to the
    magnitude of ``high``."""
    dtype = dtype or low.dtype
    scale = magnitude(high) if scale is None else scale
    return c * shadow_error(low, high) + rounding_tol(dtype, scale, n_ops)


def _log(what: str, observed: float, allowed: float, ratio: float) -> None:
    path = os.environ.get("SUPERDIFF_TOL_LOG")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    with open(path, "a") as fh:
        fh.write(json.dumps({"test": test, "what": what, "observed": observed, "allowed": allowed,
                             "ratio": ratio}) + "\n")


def close(actual, expected, atol, what: str = "value", mask: torch.Tensor | None = None) -> float:
    """Assert ``|actual - expected| <= atol`` elementwise (where ``mask`` is true). Returns the observed max error.

    The log (``SUPERDIFF_TOL_LOG``) gets the entry closest to its bound: observed error, its allowed error, ratio."""
    a = torch.as_tensor(actual, dtype=torch.float64)  # python floats stay float64 (as_tensor alone gives float32)
    b = torch.as_tensor(expected, dtype=torch.float64)
    diff = (a - b).abs()
    diff, tol = torch.broadcast_tensors(diff, torch.as_tensor(atol, dtype=torch.float64, device=diff.device))
    if mask is not None:
        m = torch.broadcast_to(torch.as_tensor(mask, dtype=torch.bool, device=diff.device), diff.shape)
        diff, tol = diff[m], tol[m]
    diff, tol = diff.reshape(-1), tol.reshape(-1)
    if diff.numel() == 0:
        return 0.0
    ratio = torch.where(torch.isnan(diff), torch.inf, diff / tol.clamp_min(1e-300))
    worst = int(ratio.argmax())
    observed = float(diff.max()) if not torch.isnan(diff).any() else float("nan")
    _log(what, float(diff[worst]), float(tol[worst]), float(ratio[worst]))
    bad = ~(diff <= tol)  # NaN counts as bad
    assert not bad.any(), (f"{what}: |diff| {float(diff[worst]):.3g} > allowed {float(tol[worst]):.3g} "
                           f"({int(bad.sum())} of {diff.numel()} entries over; max |diff| {observed:.3g})")
    return observed


def igso3_series_bounds(omega, sigma, trig_dtype: torch.dtype = torch.float64, num_terms: int = 1000,
                        chunk: int = 1 << 22, worst_case: bool = False) -> dict[str, torch.Tensor]:
    """First-order rounding-error bounds of the official truncated IGSO(3) series, elementwise in (omega, sigma).

    The official code (and ours, which follows its dtype flow) evaluates, for l = 0..L-1,
    ``w_l = (2l+1) exp(-l(l+1) sigma^2/2)`` in float64, the trigonometric factors ``sin/cos(omega (l+1/2))``,
    ``sin/cos(omega/2)`` and the derivative's ``lo*dhi - hi*dlo`` in ``omega``'s dtype (``trig_dtype``: float32 for
    rotations predicted by a network, float64 otherwise), then sums L terms in float64. Each term's absolute
    error is bounded from its operands: the argument ``omega (l+1/2)`` is rounded relative to its size, so ``sin`` of
    it errs by ``eps_t (|x| + 1)``; ``exp(-a_l)`` errs relatively by ``eps64 (a_l + 1)``; every further float op adds
    ``eps`` relative to its operands' magnitude. The sum adds ``eps64 sqrt(L) sum|terms|``. This is the conditioning
    of the series: where the terms cancel (small sigma, large omega) the bound grows to the size of the value itself,
    and there the official value is rounding noise too.

    Returns the values (float64 evaluation) and bounds: ``exp``/``e_exp`` (the expansion), ``d``/``e_d`` (its omega
    derivative) and ``score``/``e_score`` (``d / (exp + 1e-4)``, the official score norm).
    """
    om, sg = torch.broadcast_tensors(torch.as_tensor(omega, dtype=torch.float64),
                                     torch.as_tensor(sigma, dtype=torch.float64))
    shape = om.shape
    om, sg = om.reshape(-1), sg.reshape(-1)
    et, e64 = eps(trig_dtype), eps(torch.float64)
    ls = torch.arange(num_terms, dtype=torch.float64)
    out = {k: [] for k in ("exp", "e_exp", "d", "e_d")}
    per = max(1, chunk // num_terms)
    agg = (lambda e: e.sum(-1)) if worst_case else (lambda e: e.square().sum(-1).sqrt())
    for i in range(0, om.numel(), per):
        o, s = om[i:i + per, None], sg[i:i + per, None]
        a = ls * (ls + 1) * s**2 / 2
        w = (2 * ls + 1) * torch.exp(-a)
        rel_w = e64 * (a + 3)
        x = o * (ls + 0.5)
        hi, co = torch.sin(x), torch.cos(x)
        dhi = (ls + 0.5) * co
        lo, dlo = torch.sin(o / 2), 0.5 * torch.cos(o / 2)
        alo = lo.abs()
        e_trig = et * (x.abs() + 1)                 # |error| of sin(x), cos(x)
        e_lo = et * (alo + o / 2 * dlo.abs() * 2)   # |error| of sin(o/2) (argument and result rounding)
        e_dlo = et * (dlo.abs() + o / 4 * alo)
        T = w * hi / lo
        eT = w * e_trig / alo + T.abs() * (rel_w + e_lo / alo + 2 * e64)
        num = lo * dhi - hi * dlo
        e_num = (alo * (ls + 0.5) * (e_trig + et * co.abs()) + dhi.abs() * e_lo
                 + dlo.abs() * e_trig + hi.abs() * e_dlo + 3 * et * (alo * dhi.abs() + hi.abs() * dlo.abs()))
        D = w * num / lo**2
        eD = w * e_num / lo**2 + D.abs() * (rel_w + 2 * e_lo / alo + 2 * et + 2 * e64)
        n = math.sqrt(num_terms)
        out["exp"].append(T.sum(-1))
        out["e_exp"].append(agg(eT) + e64 * n * T.abs().sum(-1))
        out["d"].append(D.sum(-1))
        out["e_d"].append(agg(eD) + e64 * n * D.abs().sum(-1))
    r = {k: torch.cat(v).reshape(shape) for k, v in out.items()}
    den = r["exp"] + 1e-4
    r["score"] = r["d"] / den
    r["e_score"] = r["e_d"] / den.abs() + r["d"].abs() * r["e_exp"] / den**2 + 2 * e64 * r["score"].abs()
    return r


def igso3_score_vec_bounds(vec: torch.Tensor, sigma, trig_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Elementwise bound of the official ``torch_score(vec)`` = ``score_norm(|v| + 1e-6) v / (|v| + 2e-6)``: the series
    bound of the score norm along the unit vector, plus the final scaling's float64 rounding."""
    nv = torch.linalg.norm(vec.double(), dim=-1)
    om = nv + 1e-6
    b = igso3_series_bounds(om, sigma, trig_dtype)
    unit = (nv / (om + 1e-6))[..., None]
    return b["e_score"][..., None] * unit + rounding_tol(torch.float64, b["score"].abs()[..., None] * unit, 4)


def score_jacobian_norm(diffuser, vec: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of d torch_score / d rotvec per residue (float64 autograd; residues are independent):
    how much the score amplifies an error of the rotation vector it is evaluated at."""
    v = vec.detach().double().requires_grad_(True)
    s = diffuser.rot_score_from_rotvec(v, t)
    rows = [torch.autograd.grad(s[..., k].sum(), v, retain_graph=k < 2)[0] for k in range(3)]
    return torch.stack(rows, -2).flatten(-2).norm(dim=-1)


def rot_score_tol(diffuser, rotvec: torch.Tensor, t: torch.Tensor, v_tol,
                  trig_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bound of an official rotation score evaluated at ``rotvec`` (B, N, 3) when the rotation vector itself is only
    known to ``v_tol`` (B, N) (a tolerance: the rounding of the frames it comes from): ``|dS/dv| v_tol`` plus the
    series bound with trigonometry in ``trig_dtype`` (float32 for network predictions)."""
    sig = diffuser.tabulated_sigma(torch.as_tensor(t))[:, None]
    jac = score_jacobian_norm(diffuser, rotvec, torch.as_tensor(t, dtype=torch.float64))
    return (jac * v_tol)[..., None] + igso3_score_vec_bounds(rotvec, sig, trig_dtype)


def quat_path_tol(rotvec: torch.Tensor, dtype: torch.dtype = torch.float32, k: float = 20.0) -> torch.Tensor:
    """Tolerance of a relative rotation vector computed the official way from ``dtype`` frames:
    ``rounding_tol(dtype, 1 + omega/2, cond=k)``, k = 20 for two eigh quaternions (3 eps each: condition of the 4x4
    eigenproblem), the quaternion product (4 eps) and the angle (atan2, norms: the rest), through the 2x angle map."""
    return rounding_tol(dtype, 1 + torch.linalg.norm(rotvec.double(), dim=-1) / 2, cond=k)


def vp_var_tol(B: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Bound of ``1 - exp(-B)`` computed in ``dtype``: exp(-B) carries B's relative error times B, plus the
    subtraction's rounding of 1. Relative to the result this is the condition ``exp(-B) / (1 - exp(-B))`` (~ 1/B at small t)."""
    B = torch.as_tensor(B, dtype=torch.float64)
    return torch.exp(-B) * (B * rounding_tol(dtype, 1.0, 5) + rounding_tol(dtype)) + rounding_tol(dtype, 1.0, 2)


def trans_score_tol(diffuser, trans_t: torch.Tensor, trans_0: torch.Tensor, score: torch.Tensor, t,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bound of the official translation score ``-(x_t - e^{-B/2} x_0) / (1 - e^{-B})`` computed in ``dtype`` from
    Angstrom inputs (B, N, 3), ``t`` (B,): the operands ``|x_t| + |x_0|`` (scaled) over the variance, and the
    variance's own conditioning times the score."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    B = diffuser.marginal_b_t(t)[:, None, None]
    var = 1 - torch.exp(-B)
    cs = diffuser.cfg.coordinate_scaling
    ops = (trans_t.double().abs() + trans_0.double().abs()) * cs / var
    return rounding_tol(dtype, ops, 6) + score.double().abs() * vp_var_tol(B, dtype) / var


def float64_tol(out32: torch.Tensor, out64: torch.Tensor, c: float = C_MEASURED) -> float:
    """Bound for comparing two float64 evaluations of a computation whose condition has no closed form: its float32
    rounding ``max|out32 - out64|`` (the same computation run in float32 and in float64) scaled by eps64/eps32 -
    rounding errors scale with the unit roundoff, the conditioning is the same - times ``c``, plus the float64
    floor."""
    e = shadow_error(out32, out64) * eps(torch.float64) / eps(torch.float32)
    return c * e + rounding_tol(torch.float64, magnitude(out64))
