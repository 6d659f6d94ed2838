"""Feynman–Kac rules on the Stable Diffusion path (issue 15, "Images"), on the tiny random SD components.

* the product of two prompts runs end to end, with finite weights and the group structure of its SMC options;
* CFG as a geometric average: ``GeometricRule(gamma=1)`` over ``[unconditional, prompt]`` is the prompt alone
  (weights zero to rounding, the same images to the float32 rounding of a different batch composition);
* at ``gamma = 0.5`` every step's log-weight increment is ``-gamma (1 - gamma) g^2/2 |s_1 - s_2|^2 dtau``,
  recomputed from the models' scores at the step's state (Sampler step API), and the pipeline's final log-weight
  is their sum;
* bad FKC options of ``generate_images``: one line, exit code 2, checked before the model is loaded.

Tolerances follow tests/tolerances.py (docs/testing.md): a priori float64 rounding bounds for the weight formula
(operands ``g^2/2 dtau (|s_1|^2 + |s_2|^2)``, dot products of length d), the measured float32-vs-float64 rule for
images that went through differently batched UNet calls.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
from models.image.adapters import ImageModelError  # noqa: E402
from models.image.pipeline import SuperDiffPipeline  # noqa: E402
from models.image.tiny import save_components, tiny_sd_components  # noqa: E402
from superdiff_protein.core.fkc import GeometricRule, ImproperTargetWarning  # noqa: E402
from superdiff_protein.core.sampler import Sampler, SamplerConfig  # noqa: E402
from tolerances import close, rounding_tol, shadow_error, shadow_tol  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat", "a dog"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd_fkc")
    save_components(d / "model", tiny_sd_components(d, seed=0))
    return d / "model"


@pytest.fixture(scope="module")
def pipe(sd_dir):
    return SuperDiffPipeline.from_pretrained(str(sd_dir))


# ------------------------------------------------------------------------------------------ product
def test_product_of_two_prompts_weights_and_groups(pipe):
    S, K, seeds = 5, 2, [0, 1, 2, 3]
    kw = dict(rule="product", num_inference_steps=S, seeds=seeds, output_type="np")
    w = pipe(PROMPTS, smc={"group_size": K, "resample": "none"}, **kw)
    assert len(w.images) == 4 and w.model_names == PROMPTS
    assert torch.equal(w.kappa, torch.ones_like(w.kappa))            # b = (1, 1); c / c_s = 1 at noise_scale 1
    assert w.log_weight.shape == (4,) and torch.isfinite(w.log_weight).all() and (w.log_weight != 0).all()
    assert w.group.tolist() == [0, 0, 1, 1] and w.ancestor.tolist() == [0, 1, 2, 3]
    assert w.ess.shape == (S, 2) and not w.resampled.any()
    assert ((w.ess > 0) & (w.ess <= 1 + 1e-12)).all()
    iw = w.importance_weights
    close(torch.stack([iw[:2].sum(), iw[2:].sum()]), torch.ones(2), rounding_tol(torch.float64, 1.0, K), "sum w")
    # log Z per group from the carried weights alone: log mean exp(log w)
    lz = torch.logsumexp(w.log_weight.reshape(2, K), -1) - math.log(K)
    close(w.log_z, lz, rounding_tol(torch.float64, w.log_weight.abs().max(), 2 * K), "log Z")
    assert w.rule["rule"] == "product" and w.rule["smc"]["group_size"] == K

    # resampling at every step: weights reset to 0, ancestors stay inside their group, deterministic
    r = pipe(PROMPTS, smc={"group_size": K, "ess_threshold": 1.0}, **kw)
    r2 = pipe(PROMPTS, smc={"group_size": K, "ess_threshold": 1.0}, **kw)
    assert r.resampled.all() and torch.equal(r.log_weight, torch.zeros(4, dtype=r.log_weight.dtype))
    assert torch.equal(r.ancestor // K, r.group) and torch.isfinite(r.log_z).all()
    assert torch.equal(r.ancestor, r2.ancestor) and torch.equal(r.latents, r2.latents)
    # the first step's weights (no resampling yet) are the weights-only run's: same prior, same noise
    assert torch.equal(r.ess[0], w.ess[0])
    rec = r.fkc_record()
    assert set(rec) >= {"log_weight", "importance_weight", "ancestor", "group", "log_z", "ess"}
    json.dumps(rec)


def test_weights_option_product_exponents_and_average_kappa(pipe):
    """``weights``: the product's exponents b (kappa = b at noise scale 1, prior scaled by 1/sqrt(sum b)) and, as
    in generate_backbones, the fixed kappa of rule=average."""
    kw = dict(num_inference_steps=2, seeds=[0], output_type="np")
    p = pipe(PROMPTS, rule="product", weights=[0.5, 2.0], **kw)
    assert p.rule["weights"] == [0.5, 2.0] and torch.equal(p.kappa[..., 1], torch.full_like(p.kappa[..., 1], 2.0))
    a = pipe(PROMPTS, rule="average", weights=[0.25, 0.75], **kw)
    assert torch.equal(a.kappa[..., 0], torch.full_like(a.kappa[..., 0], 0.25)) and a.log_weight is None
    with pytest.raises(ImageModelError, match="weights has 3 values"):
        pipe(PROMPTS, rule="product", weights=[1, 1, 1], **kw)


def test_anneal_one_prompt_runs_with_weights(pipe):
    out = pipe(["a cat"], rule="anneal", beta=2.0, num_inference_steps=3, seeds=[0, 1], output_type="np")
    assert out.rule == {"rule": "anneal", "beta": 2.0, "index": 0, "smc": out.rule["smc"]}
    assert torch.isfinite(out.log_weight).all() and (out.log_weight != 0).all()
    assert torch.equal(out.kappa, torch.full_like(out.kappa, 2.0))


# ------------------------------------------------------------------------------------------ geometric
def _step_loop(pipe, gamma: float, seeds, steps: int):
    """Sample with the Sampler step API on the pipeline's own models ([unconditional, 'a cat'], no guidance);
    per step: the sampler's log-weight increment, the recomputed ``-gamma (1-gamma) g^2/2 |s_1 - s_2|^2 dtau``
    and its a-priori float64 rounding bound. Returns (final state, dlogw, expected, tol) with (S, B) tensors."""
    models = pipe.build_models(["", "a cat"], guidance_scale=1.0)
    space = models[0].group.space
    sp = space.components["x"]
    n = pipe.schedules[0][0].n
    cfg = SamplerConfig(num_steps=steps, min_t=1.0 / n, dtype=torch.float64, device="cpu")
    sampler = Sampler(space, models, GeometricRule(gamma=gamma), cfg)
    state = sampler.init_state(seeds, {"x": pipe._state_shape(None, None)})
    got, want, tol = [], [], []
    for i in range(sampler.num_steps):
        x = {"x": state.x["x"].clone()}
        out = sampler.step(state)
        tb = sampler.ts[i].expand(len(seeds))
        s1, s2 = (m(x, tb, None, None).scores["x"].double() for m in models)
        g2, dtau = sp.diffusion(tb) ** 2, sampler.dtaus[i]
        d = s1[0].numel()
        want.append(-gamma * (1 - gamma) * 0.5 * g2 * sp.inner(s1 - s2, s1 - s2) * dtau)
        # the sampler forms b^T G b - sum b_i G_ii from Gram entries (dot products of length d): cancellation of
        # operands of size g^2/2 (|s_1|^2 + |s_2|^2) dtau, about 8 further operations
        tol.append(rounding_tol(torch.float64, 0.5 * g2 * (sp.inner(s1, s1) + sp.inner(s2, s2)) * dtau, d + 8))
        got.append(out.dlogw)
        state = out.state
    for m in models:
        m.group.clear_cache()
    return state, torch.stack(got), torch.stack(want), torch.stack(tol)


def test_geometric_gamma_one_is_the_conditional_alone(pipe, sd_dir):
    seeds, S = [3, 4], 4
    state, dlogw, want, tol = _step_loop(pipe, 1.0, seeds, S)
    close(want, torch.zeros_like(want), 0.0, "gamma=1: formula")          # gamma (1 - gamma) = 0 exactly
    close(dlogw, torch.zeros_like(dlogw), tol, "gamma=1: dlogw")
    kw = dict(num_inference_steps=S, seeds=seeds, output_type="np")
    geo = pipe(["a cat"], rule="geometric", gamma=1.0, **kw)
    assert geo.model_names == ["(unconditional)", "a cat"]
    assert torch.equal(geo.kappa[..., 0], torch.zeros_like(geo.kappa[..., 0]))
    assert torch.equal(geo.kappa[..., 1], torch.ones_like(geo.kappa[..., 1]))
    close(geo.log_weight, torch.zeros(2), tol.sum(0), "gamma=1: log-weight")
    close(geo.log_weight, state.logw, 0.0, "pipeline vs step API")
    # the prompt alone (one model, no guidance) runs its UNet on B rows instead of 2B: the same images up to the
    # float32 rounding of that computation (measured against a float64 UNet, tests/tolerances.py)
    one = pipe(["a cat"], rule="single", guidance_scale=1.0, **kw)
    ref = SuperDiffPipeline.from_pretrained(str(sd_dir), torch_dtype=torch.float64)(
        ["a cat"], rule="single", guidance_scale=1.0, **kw)
    assert shadow_error(one.latents, ref.latents) > 0
    close(geo.latents, one.latents, shadow_tol(one.latents, ref.latents, dtype=torch.float32), "geometric vs alone")
    close(geo.logq[..., 1], one.logq[..., 0], shadow_tol(one.logq, ref.logq, dtype=torch.float32), "log q")


def test_geometric_half_weight_increments_match_formula(pipe):
    gamma, seeds, S = 0.5, [5, 6, 7], 5
    state, dlogw, want, tol = _step_loop(pipe, gamma, seeds, S)
    assert (want < 0).all() and (want.abs() > 1e3 * tol).all()            # a real signal, far above rounding
    close(dlogw, want, tol, "dlogw = -gamma(1-gamma) g^2/2 |s1-s2|^2 dtau")
    close(state.logw, want.sum(0), tol.sum(0), "summed over the steps")
    out = pipe(["a cat"], rule="geometric", gamma=gamma, num_inference_steps=S, seeds=seeds, output_type="np")
    close(out.log_weight, want.sum(0), tol.sum(0), "pipeline log-weight")
    assert out.ancestor.tolist() == [0, 1, 2] and out.group.tolist() == [0, 1, 2]


def test_cfg_as_geometric_warns_and_refuses_guidance(pipe):
    with pytest.warns(ImproperTargetWarning):
        out = pipe(["a cat"], rule="geometric", gamma=7.5, num_inference_steps=2, seeds=[0], output_type="np")
    assert out.rule["gamma"] == 7.5 and torch.isfinite(out.log_weight).all()
    with pytest.raises(ImageModelError, match="guidance_scale"):
        pipe(["a cat"], rule="geometric", gamma=7.5, guidance_scale=7.5, num_inference_steps=2, seeds=[0])
    with pytest.raises(ImageModelError, match="exactly 2 models"):
        pipe(["a cat", "a dog", "a car"], rule="geometric", num_inference_steps=2, seeds=[0])
    with pytest.raises(ImageModelError, match="does not divide"):
        pipe(PROMPTS, rule="product", smc={"group_size": 3}, num_inference_steps=2, seeds=[0, 1, 2, 3])
    with pytest.raises(ImageModelError, match="beta"):
        pipe(["a cat"], rule="anneal", beta=0.0, num_inference_steps=2, seeds=[0])
    with pytest.raises(ImageModelError, match="smc options apply"):
        pipe(PROMPTS, rule="and", smc={"group_size": 2}, num_inference_steps=2, seeds=[0, 1])


# ------------------------------------------------------------------------------------------ CLI
def test_generate_images_fkc_files(sd_dir, tmp_path):
    from superdiff_protein.cli.images import GenerateConfig, run_generate

    cfg = GenerateConfig(model_path=str(sd_dir), prompts=PROMPTS, rule="product", num_inference_steps=3,
                         batch_size=4, smc={"group_size": 2, "resample": "none"}, out_dir=str(tmp_path / "o"),
                         device="cpu")
    s = run_generate(cfg)
    assert s["fkc"]["group"] == [0, 0, 1, 1] and len(s["fkc"]["log_weight"]) == 4
    assert all(math.isfinite(v) for v in s["fkc"]["log_weight"]) and s["rule"]["smc"]["group_size"] == 2
    tr = json.loads((tmp_path / "o" / "traces.json").read_text())
    assert tr["log_weight"] == s["fkc"]["log_weight"] and len(tr["ess"]) == 3


BAD = [  # (arguments, words of the error line)
    (["rule=anneal", "beta=0"], ["beta must be a positive finite number"]),
    (["rule=anneal", "beta=-1.5"], ["beta must be a positive finite number"]),
    (["rule=product", "batch_size=4", "smc.group_size=3"], ["smc.group_size=3 does not divide", "(4)"]),
    (["rule=geometric", "seeds=[1,2,3]", "smc.group_size=2"], ["smc.group_size=2 does not divide", "(3)"]),
    (["rule=product", "smc.resample=sometimes"], ["smc.resample must be one of"]),
    (["rule=product", "smc.ess_threshold=2"], ["smc.ess_threshold must lie in [0, 1]"]),
    (["rule=product", "smc.group_size=0"], ["smc.group_size must be >= 1"]),
    (["rule=product", "smc.foo=1"], ["unknown option 'smc.foo'"]),
    (["rule=product", "weights=[1,nan]"], ["weights must be finite"]),
    (["rule=anneal", "anneal_of=sum"], ["anneal_of must be one of"]),
    (["rule=product", "guidance_scale=7.5"], ["guidance_scale"]),
    (["rule=and", "smc.group_size=2"], ["smc options apply to the Feynman-Kac rules"]),
]


@pytest.mark.parametrize("args,needles", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_fkc_inputs_one_line_exit_2(args, needles, tmp_path, capfd):
    """As tests/test_bad_inputs.py: one ``generate_images: error:`` line, exit 2, nothing written. The model
    directory has no model_index.json, so an error naming the FKC option proves it came before loading."""
    from superdiff_protein.cli.images import generate_main

    (tmp_path / "adir").mkdir()
    out = tmp_path / "out"
    argv = [f"model_path={tmp_path / 'adir'}", f"out_dir={out}", "num_inference_steps=2", "batch_size=2",
            "prompts=[a cat, a dog]", *args]
    capfd.readouterr()
    try:
        rc = generate_main(argv)
    except SystemExit as e:
        rc = e.code
    stdout, stderr = capfd.readouterr()
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert rc == 2, (rc, stdout, stderr)
    assert len(lines) == 1 and lines[0].startswith("generate_images: error: "), stderr
    assert "Traceback" not in stderr and stdout.strip() == ""
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    assert not out.exists()


def test_bad_fkc_input_console_entry(tmp_path):
    """The real console entry (a subprocess): the same single line, no warning or traceback around it."""
    (tmp_path / "adir").mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "superdiff_protein.cli.images", f"model_path={tmp_path / 'adir'}",
                        f"out_dir={tmp_path / 'out'}", "rule=anneal", "beta=0"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == "generate_images: error: beta must be a positive finite number, got 0"
    assert not (tmp_path / "out").exists()
