"""SuperDiffPipeline and the generate_images CLI end to end on tiny random SD / DDPM components."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from models.image.adapters import ImageModelError  # noqa: E402
from models.image.pipeline import SuperDiffPipeline, lift_to_bias  # noqa: E402
from models.image.tiny import save_components, tiny_ddpm_components, tiny_sd_components  # noqa: E402
from superdiff_protein.cli.images import GenerateConfig, run_generate  # noqa: E402
from tolerances import close, shadow_error, shadow_tol  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat", "a dog"]


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def sd_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"sd_{request.param}")
    save_components(d / "model", tiny_sd_components(d, seed=0, prediction_type=request.param))
    return d / "model"


@pytest.fixture(scope="module")
def sd_pipe(sd_dir):
    return SuperDiffPipeline.from_pretrained(str(sd_dir))


@pytest.mark.parametrize("rule", ["and", "or", "average", "joint", "single"])
def test_sd_rules_end_to_end(sd_pipe, rule):
    out = sd_pipe(PROMPTS, rule=rule, num_inference_steps=6, guidance_scale=7.5, batch_size=2,
                  generator=torch.Generator().manual_seed(0), output_type="np")
    m = 1 if rule == "joint" else 2
    assert len(out.images) == 2 and out.images[0].shape == (16, 16, 3) and out.images[0].dtype == np.uint8
    assert out.kappa.shape == (6, 2, m) and out.logq.shape == (7, 2, m) and out.t.shape == (7,)
    assert torch.isfinite(out.logq).all() and torch.isfinite(out.kappa).all()
    assert torch.allclose(out.kappa.sum(-1), torch.ones(6, 2, dtype=out.kappa.dtype))
    if rule == "joint":
        assert out.model_names == ["a cat and a dog"]
    if rule == "average":
        assert torch.allclose(out.kappa, torch.full_like(out.kappa, 0.5))
    if rule == "and":   # AND keeps the per-prompt log-density increments equal (l = 0)
        d = out.logq[:, :, 1] - out.logq[:, :, 0]
        assert torch.allclose(d, d[:1].expand_as(d), atol=1e-6 * (1 + out.logq.abs().max()))


def test_and_lift_and_correction_and_hutchinson(sd_pipe):
    steps = 5
    out = sd_pipe(PROMPTS, rule="and", bias=2.0, num_inference_steps=steps, batch_size=1, seeds=[4], output_type="np")
    d = out.logq[:, 0, 1] - out.logq[:, 0, 0]
    # with bias l = [0, 2], log q_2 - log q_1 drifts linearly in time to +2 over the run
    frac = (out.t[0] - out.t) / (out.t[0] - out.t[-1])
    assert torch.allclose(d - d[0], 2.0 * frac.to(d.dtype), atol=1e-5)
    corr = sd_pipe(PROMPTS, rule="and", num_inference_steps=3, seeds=[4], and_correction=False, output_type="np")
    ode = sd_pipe(PROMPTS, rule="or", num_inference_steps=3, seeds=[4], sampling="ode", estimator="hutchinson",
                  output_type="np")
    assert torch.isfinite(corr.logq).all() and torch.isfinite(ode.logq).all()


def test_batch_independence_and_seeds(sd_pipe, sd_dir):
    """Sample 1 of a batch of 3 seeds == the same seed alone, to float32 rounding.

    Each image has its own noise stream and its own kappa, so the batch only changes which kernels the UNet's
    float32 convolutions and GEMMs use (oneDNN/MKL pick blockings by batch size and CPU: bit-identical here on
    AVX-512, ~1e-4 apart on an AMD AVX2 machine). The bound is the rounding this computation really has
    (tests/tolerances.py, docs/testing.md): 16x the distance between the float32 run and the same run with a
    float64 UNet (another kernel family x 2 evaluations x 2; measured across CPU paths: up to 2.7x), plus the float32
    floor. A sample that leaked into another (noise, kappa) moves by O(1)."""
    kw = dict(rule="and", num_inference_steps=4, output_type="np")
    big = sd_pipe(PROMPTS, seeds=[10, 11, 12], **kw)
    one = sd_pipe(PROMPTS, seeds=[11], **kw)
    ref = SuperDiffPipeline.from_pretrained(str(sd_dir), torch_dtype=torch.float64)(PROMPTS, seeds=[11], **kw)
    for name in ("latents", "kappa"):
        b, o, r = getattr(big, name), getattr(one, name), getattr(ref, name)
        b, o, r = (b[1], o[0], r[0]) if name == "latents" else (b[:, 1], o[:, 0], r[:, 0])
        assert shadow_error(o, r) > 0  # the float64 run really is another computation
        close(b, o, shadow_tol(o, r, dtype=torch.float32), f"batch vs single {name}")
    assert not torch.allclose(big.latents[0], big.latents[1], atol=1e-2)  # distinct seeds give distinct samples
    g1 = sd_pipe(PROMPTS, num_inference_steps=2, batch_size=2, generator=torch.Generator().manual_seed(7), output_type="np")
    g2 = sd_pipe(PROMPTS, num_inference_steps=2, batch_size=2, generator=torch.Generator().manual_seed(7), output_type="np")
    assert g1.seeds == g2.seeds and torch.equal(g1.latents, g2.latents)


def test_multiple_unets_and_bad_inputs(sd_dir, tmp_path):
    other = tmp_path / "other"
    c = tiny_sd_components(tmp_path, seed=1)
    c.pop("vae"), c.pop("text_encoder"), c.pop("tokenizer")
    save_components(other, c)          # a UNet-only model directory (different weights)
    pipe = SuperDiffPipeline.from_pretrained([str(sd_dir), str(other)])
    out = pipe(["a cat"], rule="and", num_inference_steps=3, seeds=[0], output_type="pil", height=16, width=16)
    assert out.model_names == ["model:a cat", "other:a cat"] and out.images[0].size == (16, 16)
    with pytest.raises(ImageModelError, match="multiples"):
        pipe(["a cat"], height=15, width=16, num_inference_steps=2)
    with pytest.raises(ImageModelError, match="unknown rule"):
        pipe(["a cat"], rule="xor", num_inference_steps=2)
    with pytest.raises(ImageModelError, match="prompt"):
        pipe(None, num_inference_steps=2)
    with pytest.raises(ImageModelError, match="bias"):
        pipe(["a", "b", "c"], bias=1.0, num_inference_steps=2)
    with pytest.raises(ImageModelError, match="give bias= only"):
        pipe(["a", "b"], bias=1.0, lift=1.0, num_inference_steps=2)
    with pytest.raises(ImageModelError, match="model_index"):
        SuperDiffPipeline.from_pretrained(str(tmp_path / "missing"), local_files_only=True)
    assert lift_to_bias(0.0, 2) is None and lift_to_bias([1, 2, 3], 3) == [1.0, 2.0, 3.0]


def test_pixel_ddpm_or_and_v_prediction(tmp_path):
    for name, seed, pred in (("a", 0, "epsilon"), ("b", 1, "v_prediction")):
        save_components(tmp_path / name, tiny_ddpm_components(seed=seed, prediction_type=pred))
    pipe = SuperDiffPipeline.from_pretrained([str(tmp_path / "a"), str(tmp_path / "b")])
    assert pipe.describe()["prediction_types"] == ["epsilon", "v_prediction"]
    out = pipe(None, rule="or", num_inference_steps=5, batch_size=3, seeds=[0, 1, 2], output_type="np")
    assert out.images[0].shape == (8, 8, 3) and out.kappa.shape == (5, 3, 2)
    with pytest.raises(ImageModelError, match="unconditional"):
        pipe(["a cat"], num_inference_steps=2)


def test_generate_images_in_process_and_cli(sd_dir, tmp_path):
    cfg = GenerateConfig(model_path=str(sd_dir), prompts=PROMPTS, rule="and", num_inference_steps=4, batch_size=3,
                         out_dir=str(tmp_path / "out"), device="cpu")
    s = run_generate(cfg)
    od = tmp_path / "out"
    assert len(s["images"]) == 3 and all((od / f).is_file() for f in s["images"])
    for f in ("grid.png", "traces.png", "traces.json", "summary.json"):
        assert (od / f).is_file(), f
    tr = json.loads((od / "traces.json").read_text())
    assert np.asarray(tr["kappa"]).shape == (4, 3, 2) and tr["model_names"] == PROMPTS
    from PIL import Image
    assert Image.open(od / "grid.png").size == (2 * 16, 2 * 16)
    assert not [p for p in od.iterdir() if ".tmp" in p.name]

    if "sd_epsilon" not in str(sd_dir):       # the console-entry subprocesses (slow imports) once is enough
        return
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ok = subprocess.run([sys.executable, "-m", "superdiff_protein.cli.images", f"model_path={sd_dir}",
                         "prompts=[a cat, a dog]", "rule=or", "num_inference_steps=2", "batch_size=1",
                         f"out_dir={tmp_path / 'cli'}", "device=cpu"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "cli" / "grid.png").is_file()
    bad = subprocess.run([sys.executable, "-m", "superdiff_protein.cli.images", f"model_path={tmp_path / 'nope'}",
                          f"out_dir={tmp_path / 'bad'}"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert bad.returncode == 2 and "generate_images: error:" in bad.stderr and "Traceback" not in bad.stderr


def test_old_spellings_deprecated_same_result(sd_pipe, sd_dir, tmp_path, capfd):
    """lift= / index= / output_dir= (the image CLI's old words) still work for one release: same images as
    bias= / single_index= / out_dir=, one warning line per old key naming the new one; both at once: exit 2."""
    from superdiff_protein.cli.images import generate_main

    new = sd_pipe(PROMPTS, rule="or", bias=1.5, num_inference_steps=2, seeds=[3], output_type="np")
    with pytest.warns(DeprecationWarning, match="use bias="):
        old = sd_pipe(PROMPTS, rule="or", lift=1.5, num_inference_steps=2, seeds=[3], output_type="np")
    assert np.array_equal(new.images[0], old.images[0]) and torch.equal(new.kappa, old.kappa)
    with pytest.warns(DeprecationWarning, match="use single_index="):
        one = sd_pipe(PROMPTS, rule="single", index=1, num_inference_steps=2, seeds=[3], output_type="np")
    assert torch.equal(one.kappa[..., 1], torch.ones_like(one.kappa[..., 1]))

    def cli(*args):
        capfd.readouterr()
        try:
            generate_main([f"model_path={sd_dir}", "prompts=[a cat, a dog]", "num_inference_steps=2", "batch_size=1",
                           "device=cpu", *args])
        except SystemExit as e:
            return e.code, capfd.readouterr().err
        return 0, capfd.readouterr().err

    rc_new, err_new = cli("rule=and", "bias=1.0", f"out_dir={tmp_path / 'new'}")
    rc_old, err_old = cli("rule=and", "lift=1.0", f"output_dir={tmp_path / 'old'}")
    assert rc_new == 0 and rc_old == 0 and "warning" not in err_new
    warn = [ln for ln in err_old.splitlines() if "deprecated" in ln]
    assert len(warn) == 2 and any("use bias=" in w for w in warn) and any("use out_dir=" in w for w in warn)
    assert all(w.startswith("generate_images: warning: ") for w in warn)
    assert (tmp_path / "new" / "grid.png").read_bytes() == (tmp_path / "old" / "grid.png").read_bytes()
    s_new, s_old = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("new", "old"))
    assert s_new["final_kappa"] == s_old["final_kappa"] and s_old["config"]["bias"] == 1.0
    rc_i, err_i = cli("rule=single", "index=1", f"out_dir={tmp_path / 'idx'}")
    assert rc_i == 0 and "use single_index=" in err_i
    assert json.loads((tmp_path / "idx" / "summary.json").read_text())["config"]["single_index"] == 1
    rc_both, err_both = cli("lift=1.0", "bias=1.0", f"out_dir={tmp_path / 'both'}")
    assert rc_both == 2 and "give bias= only" in err_both and not (tmp_path / "both").exists()
