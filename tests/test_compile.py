"""``compile=auto|true|false``: compiled frame predictors agree with eager to float32 rounding.

Tolerances (docs/testing.md, tests/tolerances.py): a compiled forward is another evaluation order of the same
float32 arithmetic (other fusions, other summation orders). Its bound is the measured rule: ``16 e + 4 eps32 |x|``,
where ``e`` is the distance of the eager float32 forward to a float64 copy of the same network on the same inputs.
A compiled sampling run is bounded the same way, by the run's own float32-vs-float64 distance.

* fast: the wrapper (eager first call, eager under autograd, options, fallback with one warning, one compile per
  shape whatever the strides), graph capture with the ``aot_eager`` backend (dynamo + AOTAutograd decompositions,
  no code generation), and the IGSO(3) score's host-side term count;
* ``slow``: Inductor's generated code on CPU (about a minute of compiling per network), on the official fixture
  checkpoints (skipped cleanly without them) and a tiny random network, and a compiled ``generate`` run;
* ``gpu``: paper-size FrameDiff compiled on CUDA, with and without CUDA graphs, and no host sync in a model call
  (skipped without a GPU).

For Proteus, ``e`` holds the float32 cancellation noise of the template's psi feature (docs/proteus.md, trap 1), so
its bound is wide (about 0.9 A on the fixture); the FrameDiff and tiny-network checks are the tight ones (observed
at 0.2-0.76 of their bounds on an Intel AVX-512 CPU).
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from conftest import official_fixtures_dir, official_skip_reason
from models.framediff import FrameDiffAdapter, FrameDiffConfig, FrameDiffScoreNetwork
from models.frame_models import FrameScoreModel
from models.proteus import ProteusAdapter
from superdiff_protein.frames.compiling import (CompileFallbackWarning, CompiledPredictor, CompileSession,
                                                compile_models, resolve_compile)
from superdiff_protein.frames.generate_config import GenerateError, load_config, validate
from superdiff_protein.frames.geometry import so3_exp
from tolerances import C_MEASURED, close, magnitude, rounding_tol, shadow_error

FIX = official_fixtures_dir()
CKPTS = {"framediff": (FrameDiffAdapter, FIX / "framediff_small_public.pth"),
         "proteus": (ProteusAdapter, FIX / "proteus_small_public.pth")}
TINY = {"node_embed_size": 32, "edge_embed_size": 16, "embed": {"index_embed_size": 8, "num_bins": 22},
        "ipa": {"c_hidden": 16, "c_skip": 8, "no_heads": 2, "no_qk_points": 4, "no_v_points": 4,
                "seq_tfmr_num_heads": 2, "seq_tfmr_num_layers": 1, "num_blocks": 2}}
KEYS = ("trans", "rotmats", "quats")


def _tiny_framediff(seed: int = 0) -> FrameDiffAdapter:
    """Random non-zero weights (the zero-initialised layers too), so every layer matters."""
    g = torch.Generator().manual_seed(seed)
    net = FrameDiffScoreNetwork(FrameDiffConfig.from_dict(TINY)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return FrameDiffAdapter(net).eval()


def _adapter(kind: str):
    if kind == "tiny":
        return _tiny_framediff()
    cls, path = CKPTS[kind]
    if not path.is_file():
        pytest.skip(official_skip_reason(path.name))
    return cls.from_checkpoint(path)


def _inputs(b: int, n: int, seed: int = 1, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    R = so3_exp(torch.randn(b, n, 3, generator=g, dtype=torch.float64))
    T = torch.randn(b, n, 3, generator=g, dtype=torch.float64) * 8
    t = torch.rand(b, generator=g, dtype=torch.float64) * 0.9 + 0.05
    m = torch.ones(b, n, dtype=torch.float64)
    return [x.to(device=device, dtype=dtype) for x in (R, T, t, m)]


def _check_against_eager(adapter, backend: str, b: int = 2, n: int = 14, device="cpu"):
    """Eager float32, eager float64 (the rounding reference) and the compiled float32 forward on the same inputs,
    at the steady-state call (with the self-conditioning state of a first call)."""
    a32 = adapter.to(device)
    a64 = copy.deepcopy(adapter).double()
    R, T, t, m = _inputs(b, n, device=device)
    comp = CompiledPredictor(a32, name="net", backend=backend)
    with torch.no_grad():
        first = a32(R, T, t, m, None)
        first_c = comp(R, T, t, m, None)               # no self-conditioning input: runs eagerly
        for k in KEYS:
            assert torch.equal(getattr(first_c, k), getattr(first, k)), k
        cond = first.self_cond_state
        ref32 = a32(R, T, t, m, cond)
        ref64 = a64(*(x.double() for x in (R, T)), t, m.double(), cond.double())
        out = comp(R, T, t, m, cond)
        again = comp(R, T, t, m, cond)                 # second call: the compiled code, no recompiling
    assert not comp.failed and len(comp.session.warmups) == 1
    for k in KEYS:
        o32, o64, oc = getattr(ref32, k), getattr(ref64, k), getattr(out, k)
        atol = C_MEASURED * shadow_error(o32, o64) + rounding_tol(torch.float32, magnitude(o64))
        close(oc.double(), o32.double(), atol, what=f"compiled ({backend}) {k}")
        assert torch.equal(getattr(again, k), oc), f"{k}: the compiled forward is not deterministic"
    return out


# ------------------------------------------------------------------------------------------- fast
def test_compile_option_resolves_and_validates():
    assert resolve_compile("auto", "cpu") is False
    assert resolve_compile("auto", torch.device("cuda")) is True
    assert resolve_compile("true", "cpu") is True and resolve_compile("false", "cuda") is False
    assert validate(load_config({"compile": True})).compile == "true"   # Hydra/YAML give a bool
    assert validate(load_config()).compile == "auto" and validate(load_config()).compile_mode == "default"
    with pytest.raises(GenerateError, match="compile: must be one of"):
        validate(load_config({"compile": "sometimes"}))
    with pytest.raises(GenerateError, match="compile_mode: must be one of"):
        validate(load_config({"compile_mode": "max-autotune"}))


def test_compile_models_wraps_module_predictors_only():
    fd = FrameScoreModel.from_adapter(_tiny_framediff(), name="fd")

    class Exact:                                       # a model without a network (like the exact models)
        name = "exact"

    assert compile_models([fd, Exact()], "auto", "cpu") is None     # auto: eager on CPU
    assert not isinstance(fd.predictor, CompiledPredictor)
    inner = fd.predictor
    session = compile_models([fd, Exact()], "true", "cpu")
    assert isinstance(fd.predictor, CompiledPredictor) and session is fd.predictor.session
    assert fd.predictor.inner is inner and fd.predictor.config is inner.config       # attributes pass through
    assert [p.data_ptr() for p in fd.predictor.parameters()] == [p.data_ptr() for p in inner.parameters()]
    assert fd.kind == "framediff" and fd._embeds_self_conditioning()


def test_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(*a, **k):
        def fn(*aa, **kk):
            raise RuntimeError("no compiler here\nsecond line")
        return fn

    monkeypatch.setattr(torch, "compile", broken)
    session = CompileSession()
    nets = [_tiny_framediff(0), _tiny_framediff(1)]
    preds = [CompiledPredictor(n, name=f"net{i}", session=session) for i, n in enumerate(nets)]
    R, T, t, m = _inputs(2, 9)
    with warnings.catch_warnings(record=True) as rec, torch.no_grad():
        warnings.simplefilter("always")
        for net, pred in zip(nets, preds):
            cond = net(R, T, t, m, None).self_cond_state
            for _ in range(3):
                out = pred(R, T, t, m, cond)
                assert torch.equal(out.trans, net(R, T, t, m, cond).trans)
    msgs = [str(w.message) for w in rec if issubclass(w.category, CompileFallbackWarning)]
    assert len(msgs) == 1 and "net0" in msgs[0] and "no compiler here" in msgs[0] and "\n" not in msgs[0]
    assert all(p.failed for p in preds)


def test_graph_capture_matches_eager_tiny_framediff():
    """dynamo + AOTAutograd (backend aot_eager): the captured graph computes what the eager network computes."""
    _check_against_eager(_tiny_framediff(), "aot_eager")


# ------------------------------------------------------------------------------------------- slow
@pytest.fixture
def inductor_cache(tmp_path_factory, monkeypatch):
    """One Inductor cache for the module's tests (never the user's cache)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "inductor"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tiny", "framediff", "proteus"])
def test_inductor_forward_matches_eager(kind, inductor_cache):
    """Inductor's generated CPU code: within 16 e of eager (e: eager float32 vs float64), on the official fixture
    checkpoints and a tiny random network."""
    torch._dynamo.reset()
    _check_against_eager(_adapter(kind), "inductor")


def _ca(pdb_dir, n: int) -> np.ndarray:
    out = []
    for i in range(n):
        lines = [ln for ln in (pdb_dir / "length_12" / f"sample_{i}.pdb").read_text().splitlines()
                 if ln.startswith("ATOM") and ln[12:16].strip() == "CA"]
        out.append([[float(ln[30:38]), float(ln[38:46]), float(ln[46:54])] for ln in lines])
    return np.array(out)


def _rmsd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a - b) ** 2).sum(-1).mean(-1))


@pytest.mark.slow
def test_compiled_generate_matches_eager_pdbs(tmp_path, inductor_cache):
    """A compiled fp32 run writes the eager run's backbones to within 16x the run's own float32 rounding: the
    CA-RMSD of the eager float32 run to the same run in float64, plus the PDB's 3-decimal rounding. A second
    compiled run with the same options writes the same bytes."""
    path = CKPTS["framediff"][1]
    if not path.is_file():
        pytest.skip(official_skip_reason(path.name))
    from superdiff_protein.frames.generation import generate

    torch._dynamo.reset()
    base = dict(models=[str(path)], rule="single", lengths=[12], samples_per_length=2, batch_size=2, num_steps=8,
                seed=3, device="cpu", plots=False, progress=False)
    runs = {}
    for name, kw in {"eager": dict(compile="false", precision="float32"),
                     "f64": dict(compile="false", precision="float64"),
                     "compiled": dict(compile="true", precision="float32"),
                     "compiled_again": dict(compile="true", precision="float32")}.items():
        generate(**base, **kw, out_dir=tmp_path / name)
        runs[name] = _ca(tmp_path / name, 2)
    for i in range(2):                                 # determinism: the same options give the same bytes
        pdb = f"length_12/sample_{i}.pdb"
        assert (tmp_path / "compiled" / pdb).read_bytes() == (tmp_path / "compiled_again" / pdb).read_bytes()
    own = _rmsd(runs["eager"], runs["f64"])
    pdb_rounding = 1e-3 * np.sqrt(3)                   # two files, each coordinate rounded to 0.001 A
    got = _rmsd(runs["compiled"], runs["eager"])
    close(got, np.zeros_like(got), C_MEASURED * own + pdb_rounding, what="CA-RMSD compiled vs eager (A)")
    assert (tmp_path / "compiled" / "config.yaml").read_text().count("compile: 'true'") + \
        (tmp_path / "compiled" / "config.yaml").read_text().count("compile: true") == 1


# ------------------------------------------------------------------------------------------- gpu
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_paper_size_framediff_compiled_on_cuda(mode, inductor_cache):
    """Paper-size FrameDiff (random weights, TF32 off): compiled (and CUDA-graphed) within 16 e of eager."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = FrameDiffScoreNetwork(FrameDiffConfig())
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn_like(p) * 0.02)
    a32 = FrameDiffAdapter(net).eval().cuda()
    a64 = copy.deepcopy(a32).double()
    R, T, t, m = _inputs(4, 100, device="cuda")
    comp = CompiledPredictor(a32, name="framediff", mode=mode)
    with torch.no_grad():
        cond = a32(R, T, t, m, None).self_cond_state
        ref32, ref64 = a32(R, T, t, m, cond), a64(R.double(), T.double(), t, m.double(), cond.double())
        outs = [comp(R, T, t, m, cond) for _ in range(3)]
    assert not comp.failed
    for k in KEYS:
        o32, o64 = getattr(ref32, k), getattr(ref64, k)
        atol = C_MEASURED * shadow_error(o32, o64) + rounding_tol(torch.float32, magnitude(o64))
        for o in outs:
            close(getattr(o, k).double(), o32.double(), atol, what=f"compiled ({mode}) {k}")


# ------------------------------------------------------------------------------------------- no host sync
def test_series_term_count_from_the_host_floor_changes_rounding_only():
    """On a GPU the IGSO(3) score takes its term count from the sigma grid's smallest value (known on the host)
    instead of reading the batch's smallest sigma back (a device sync per model call). The extra terms weigh
    exactly 0: the score moves by summation-order rounding only, within twice the series' float64 rounding bound."""
    from superdiff_protein.frames.official_numerics import igso3_score_from_rotvec, sigma_of_t
    from superdiff_protein.frames.se3 import SE3DiffuserConfig
    from tolerances import igso3_score_vec_bounds

    cfg = SE3DiffuserConfig()
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(3, 7, 3, generator=g, dtype=torch.float64) * 1.2
    sigma = torch.tensor([[0.2], [0.9], [1.5]], dtype=torch.float64)
    floor = float(sigma_of_t(torch.zeros((), dtype=torch.float64), cfg))
    synced = igso3_score_from_rotvec(vec, sigma, cfg.num_terms)
    hosted = igso3_score_from_rotvec(vec, sigma, cfg.num_terms, sigma_floor=floor)
    close(hosted, synced, 2 * igso3_score_vec_bounds(vec, sigma.expand(3, 7), torch.float64),
          what="IGSO(3) score, host term count")


def test_same_shape_with_other_strides_does_not_compile_again():
    """The sampler hands the same shapes with other strides (an expanded scalar time, sliced states); the wrapper
    makes inputs contiguous so that dynamo's stride guards hold and each shape compiles once."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    net = _tiny_framediff()
    comp = CompiledPredictor(net, backend="aot_eager")
    R, T, t, m = _inputs(3, 8)
    with torch.no_grad():
        cond = net(R, T, t, m, None).self_cond_state
        comp(R, T, t, m, cond)
        graphs = counters["stats"]["unique_graphs"]    # on CPU the network's graph breaks give several
        comp(R.transpose(-1, -2).contiguous().transpose(-1, -2), T, t[:1].expand(3), m, cond)
        comp(R, T[:, :, None].expand(3, 8, 2, 3)[:, :, 0], t, m, cond)
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["framediff", "proteus"])
def test_no_host_sync_in_a_model_call_on_cuda(kind):
    """A steady-state model call on CUDA (network, eager, and the official scores) makes no synchronising CUDA
    operation: torch's sync debug mode turns any into an error."""
    model = FrameScoreModel.from_adapter(_adapter(kind).cuda())
    B, N, dev = 2, 16, torch.device("cuda")
    gens = [torch.Generator(device=dev).manual_seed(i) for i in range(B)]
    x = model.diffuser.space.sample_prior(B, {"rot": (N,), "trans": (N, 3)}, gens, None, torch.float32, dev)
    t = torch.full((B,), 0.5, device=dev)
    with torch.no_grad():
        state = model(x, t, None, model.init_state(B, None)).state
        model(x, t, None, state)                       # caches (the sigma grid, constants) are built once
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x, t, None, state)
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_calls_under_autograd_run_eagerly():
    """The Hutchinson estimator and the AND correction take vector-Jacobian products through the network: those
    calls run eagerly (same graph of autograd as without compile); only no-grad calls compile."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    net = _tiny_framediff()
    comp = CompiledPredictor(net, backend="aot_eager")
    R, T, t, m = _inputs(2, 8)
    cond = net(R, T, t, m, None).self_cond_state.detach()
    T = T.clone().requires_grad_(True)
    out = comp(R, T, t, m, cond)
    ref = net(R, T, t, m, cond)
    assert torch.equal(out.trans, ref.trans) and counters["stats"]["unique_graphs"] == 0
    g, = torch.autograd.grad(out.trans.sum(), T)
    g_ref, = torch.autograd.grad(ref.trans.sum(), T)
    assert torch.equal(g, g_ref) and not comp.session.warmups


@pytest.mark.slow
def test_framediff_traces_as_one_graph_on_cpu():
    """No graph break in a FrameDiff forward on the CPU: the CPU fast paths that read tensors on the host (the
    all-ones mask test, the offset range of the relative-index table) step aside while torch.compile traces."""
    import torch._dynamo as dynamo
    from models.framediff import FrameDiffAdapter, FrameDiffConfig, FrameDiffScoreNetwork
    from models.framediff.config import IpaConfig
    from superdiff_protein.core.igso3 import sample_uniform_so3

    torch.manual_seed(0)
    net = FrameDiffScoreNetwork(FrameDiffConfig(node_embed_size=32, edge_embed_size=16, ipa=IpaConfig(
        c_s=32, c_z=16, c_hidden=16, c_skip=8, num_blocks=1)))
    ad = FrameDiffAdapter(net).eval()
    B, N = 2, 12
    R = sample_uniform_so3((B, N), dtype=torch.float32)
    T, t, m = torch.randn(B, N, 3), torch.full((B,), 0.5), torch.ones(B, N)
    with torch.no_grad():
        first = ad(R, T, t, m, None)
        ex = dynamo.explain(ad)(R, T, t, m, first.self_cond_state)
    assert ex.graph_break_count == 0, [str(b.reason)[:120] for b in ex.break_reasons]


@pytest.mark.slow
def test_compiled_network_gradients_match_eager(inductor_cache):
    """What ``trainer.compile=true`` runs (``nn.Module.compile(dynamic=True)`` on the score network, with grad):
    the loss-like scalar and every parameter gradient within 16 e of eager float32 (e: eager float32 vs float64),
    plus the a-priori worst-case bound of a float32 sum re-done in another order, ``n * eps * scale``: a weight
    gradient sums up to n = B * N^2 pair terms, which Inductor's generated loops add sequentially where eager's
    BLAS adds them blockwise (measured: 3e-6 on an entry where eager's own error was far smaller). Two batch
    shapes (dynamic shapes: no recompile needed)."""
    torch._dynamo.reset()
    base = _tiny_framediff(3).train()
    eager32, eager64, comp = copy.deepcopy(base), copy.deepcopy(base).double(), copy.deepcopy(base)
    comp.network.compile(dynamic=True)

    def grads(adapter, R, T, t, m, w):
        adapter.zero_grad()
        out = adapter(R, T, t, m, None)
        val = sum((getattr(out, k) * w[k].to(getattr(out, k).dtype)).sum() for k in ("trans", "rotmats", "psi"))
        val.backward()
        return val.detach(), {n: p.grad.detach().clone() for n, p in adapter.named_parameters() if p.grad is not None}

    for b, n in ((2, 14), (3, 19)):
        R, T, t, m = _inputs(b, n)
        g = torch.Generator().manual_seed(b * 100 + n)
        w = {"trans": torch.randn(b, n, 3, generator=g, dtype=torch.float64),
             "rotmats": torch.randn(b, n, 3, 3, generator=g, dtype=torch.float64),
             "psi": torch.randn(b, n, 2, generator=g, dtype=torch.float64)}
        v32, g32 = grads(eager32, R, T, t, m, w)
        v64, g64 = grads(eager64, R.double(), T.double(), t, m.double(), w)
        vc, gc = grads(comp, R, T, t, m, w)
        assert set(gc) == set(g32) == set(g64) and gc
        close(vc.double(), v32.double(), C_MEASURED * shadow_error(v32, v64) + rounding_tol(torch.float32, v64.abs()),
              what=f"compiled scalar {b}x{n}")
        for name in g64:
            n_sum = b * n * n
            tol = C_MEASURED * shadow_error(g32[name], g64[name]) + rounding_tol(torch.float32, magnitude(g64[name]),
                                                                                  n_ops=n_sum ** 2)  # sqrt -> n
            close(gc[name].double(), g32[name].double(), tol, what=f"grad {name} {b}x{n}")

