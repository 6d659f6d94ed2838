"""Python API of generate_backbones (in-process, fast) and the config contract."""
from __future__ import annotations

import pytest
import yaml

from models.exact_frames import load_exact_model
from superdiff_protein.frames.generate_config import (CONFIG_DIR, GenerateConfig, GenerateError, load_config, option_tree,
                                                      validate)
from superdiff_protein.frames.generation import generate

CONTRACT = ["models", "rule", "temperature", "bias", "kappa_scope", "estimator", "num_steps", "min_t", "noise_scale",
            "lengths", "samples_per_length", "batch_size", "seed", "device", "precision", "out_dir", "save_traj"]
TINY = dict(models=["exact-helix", "exact-strand"], lengths=[10], samples_per_length=2, num_steps=4, plots=False,
            progress=False)


def test_yaml_holds_the_public_contract_and_matches_the_schema():
    cfg = yaml.safe_load((CONFIG_DIR / "generate_backbones.yaml").read_text())
    keys = [k for k in cfg if k not in ("defaults", "hydra")]
    assert keys[:len(CONTRACT)] == CONTRACT
    assert set(keys) == set(GenerateConfig.__dataclass_fields__)
    dc = option_tree()
    for k in keys:
        assert cfg[k] == dc[k], k                 # the fallback defaults (no configs/ dir) are the yaml's


# The official SuperDiff protein run (necludov/super-diffusion @ e3afac2: applications/proteins/superdiff/
# config/composition.yaml, run_inference.sh, composition.py, README "seeds 0-49 for lengths 100, ..., 300").
OFFICIAL = dict(kappa_scope="per_component", num_steps=499, time_grid="framediff", min_t=0.002, noise_scale=0.1,
                sampling="sde", temperature=1.0, final="state", lengths=[100, 150, 200, 250, 300],
                samples_per_length=50)
PAPER = {"paper_or": dict(rule="or", bias=None, bias_convention="official"),
         "paper_or_bias": dict(rule="or", bias=[0.0, 1.0], bias_convention="official"),
         "paper_and": dict(rule="and", bias=None)}


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIG_DIR / "generate").glob("*.yaml")))
def test_every_preset_loads_and_validates(preset):
    opts = validate(load_config(preset=preset))
    if preset.startswith("exact"):
        assert opts.num_steps == 500 and opts.noise_scale == 1.0 and opts.estimator == "ito"
        return
    base = preset.removesuffix("_corrected")
    assert base in PAPER, f"a paper preset without its official settings in this test: {preset}"
    for k, v in {**OFFICIAL, **PAPER[base]}.items():
        assert getattr(opts, k) == v, (preset, k)
    if preset.endswith("_corrected"):           # our two fixes, nothing else
        assert opts.estimator == "hutchinson" and opts.and_correction is True
    else:                                        # the official estimator and AND
        assert opts.estimator == "ito" and opts.and_correction is False
    names = {p.stem for p in (CONFIG_DIR / "generate").glob("*.yaml")}
    assert preset.endswith("_corrected") or f"{preset}_corrected" in names      # every paper preset has its fix


def test_tutorial_preset_table_lists_every_preset_with_its_settings():
    """docs/tutorial.md's preset table has a row per preset file whose cells match the preset (setting by setting)."""
    import re

    text = (CONFIG_DIR.parent / "docs" / "tutorial.md").read_text()
    presets = sorted(p.stem for p in (CONFIG_DIR / "generate").glob("*.yaml"))
    lines = text.splitlines()
    h = next(i for i, ln in enumerate(lines) if ln.startswith("| setting |"))
    cols = [c.strip().strip("`") for c in lines[h].strip("|").split("|")]
    rows = {}
    for ln in lines[h + 2:]:                       # after the header's |---| line, up to the end of the table
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == len(cols), ln
        rows[cells[0].strip("`")] = dict(zip(cols, cells))
    assert {"rule", "bias", "bias_convention", "kappa_scope", "estimator", "num_steps", "min_t", "noise_scale",
            "and_correction", "time_grid", "final"} <= set(rows)
    for preset in presets:
        assert preset in cols, f"{preset} missing from the tutorial's preset table"
        opts = validate(load_config(preset=preset))
        for key, row in rows.items():
            if not hasattr(opts, key):
                continue
            want = getattr(opts, key)
            cell = re.sub(r"\s*\(.*\)$", "", row[preset]).strip("` ")
            if isinstance(want, list):
                want = "[" + ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in want) + "]"
            elif isinstance(want, bool):
                want = str(want).lower()
            elif isinstance(want, float):
                want = f"{want:g}"
            assert cell == str(want if want is not None else "null"), (preset, key, cell, want)


def test_api_runs_and_resumes(tmp_path):
    s = generate(out_dir=str(tmp_path / "a"), seed=2, **TINY)
    assert s.generated == 2 and s.skipped == 0 and len(s.rows) == 2
    assert "2 sample(s) generated" in s.text()
    assert (tmp_path / "a" / "length_10" / "sample_1.pdb").is_file()
    s2 = generate({"out_dir": str(tmp_path / "a"), "seed": 2, **TINY})
    assert s2.generated == 0 and s2.skipped == 2


def test_api_accepts_model_objects_and_presets(tmp_path):
    m = load_exact_model("exact-strand", windows_per_chain=1)
    s = generate(**{**TINY, "models": [m, "exact-helix"]}, rule="single", single_index=0, out_dir=str(tmp_path / "o"))
    assert all(r["final_model"] == "exact-strand" for r in s.rows)
    assert all(float(r["kappa.exact-strand"]) == 1.0 for r in s.rows)
    s = generate({"out_dir": str(tmp_path / "p"), **TINY}, preset="paper_and")
    assert s.rows[0]["rule"] == "and" and s.rows[0]["noise_scale"] == "0.1"
    assert any("biased" in w for w in s.warnings)


@pytest.mark.parametrize("kw, msg", [
    ({"temperature": 0.0}, "T must be > 0"),
    ({"temperature": -2}, "T must be > 0"),
    ({"lengths": [-5, 10]}, ">= 1"),
    ({"lengths": [100000]}, "maximum"),
    ({"lengths": "sixty"}, "cannot parse"),
    ({"rule": "xor"}, "rule"),
    ({"num_steps": 0}, "num_steps"),
    ({"min_t": 1.5}, "min_t"),
    ({"noise_scale": -1}, "noise_scale"),
    ({"device": "tpu"}, "device"),
    ({"final": "best"}, "final"),
    ({"tempreature": 1.0}, "unknown option"),
    ({"lengths": "0-5"}, ">= 1"),
    ({"models": ["exact-helix"], "bias": [0.0, 1.0]}, "one per model"),
    ({"preset": "nope"}, "unknown preset"),
    ({"rule": "single", "single_index": 5}, "single_index"),
    ({"samples_per_length": 0}, "samples_per_length"),
    ({"save_traj": "maybe"}, "save_traj"),
    ({"bias_convention": "inside"}, "bias_convention"),
    ({"rule": "and", "bias": [0.0, 1.0], "bias_convention": "official"}, "rule=or only"),
    ({"layout": "nested"}, "layout"),
    ({"time_grid": "log"}, "time_grid"),
])
def test_api_bad_input_raises_and_writes_nothing(tmp_path, kw, msg):
    out = tmp_path / "never"
    with pytest.raises(GenerateError, match=msg):
        generate(**{**TINY, "out_dir": str(out), **kw})
    assert not out.exists()


def test_defaults_are_the_shipped_trained_models(tmp_path):
    """The plain job uses the two trained checkpoints of models/checkpoints/ (both load through the registry)."""
    from superdiff_protein.frames.registry import BUILTIN_CHECKPOINTS, available_models

    cfg = load_config()
    assert cfg["models"] == ["default-helix", "default-strand"]
    assert all(name in available_models() for name in cfg["models"])
    assert set(cfg["models"]) <= set(BUILTIN_CHECKPOINTS)
    s = generate(out_dir=str(tmp_path / "d"), lengths=[12], samples_per_length=2, batch_size=2, num_steps=3,
                 plots=False, progress=False)
    assert s.generated == 2
    assert [r["models"] for r in s.rows] == ["default-helix;default-strand"] * 2
    # config.yaml records what device=auto / precision=auto resolved to: the networks' float32 weights on this device
    import torch

    cfg = yaml.safe_load((tmp_path / "d" / "config.yaml").read_text())
    assert cfg["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu") and cfg["precision"] == "float32"


def test_config_yaml_records_the_resolved_device_and_precision(tmp_path):
    s = generate(out_dir=str(tmp_path / "a"), **TINY)
    cfg = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    # device=auto picks CUDA when present (the exact models then run there too)
    import torch

    assert cfg["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert cfg["precision"] == "float64"                     # exact models only: no weights, float64 maths
    assert cfg["layout"] == "flat" and cfg["bias_convention"] == "algorithm1"
    generate(out_dir=str(tmp_path / "b"), device="cpu", precision="bfloat16", **TINY)
    cfg = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert cfg["device"] == "cpu" and cfg["precision"] == "bf16"
    # the resolved precision counts as what "auto" meant: a rerun with the explicit value resumes
    assert generate(out_dir=str(tmp_path / "a"), precision="float64", **TINY).skipped == s.generated


def test_a_directory_of_an_older_version_still_resumes(tmp_path):
    """config.yaml written before device/precision were resolved and before layout/bias_convention existed."""
    out = tmp_path / "old"
    s = generate(out_dir=str(out), **TINY)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg.update(device="auto", precision="auto")
    for k in ("layout", "bias_convention"):
        del cfg[k]
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    again = generate(out_dir=str(out), **TINY)
    assert again.generated == 0 and again.skipped == s.generated
    with pytest.raises(GenerateError, match="layout: 'flat' -> 'framediff'"):
        generate(out_dir=str(out), layout="framediff", **TINY)


@pytest.mark.parametrize("conv", ["algorithm1", "official"])
def test_bias_convention_reaches_the_sampler(tmp_path, conv):
    """Per-component OR on exact models: every recorded kappa is the named softmax of the recorded log q of that
    step (traces hold log q before each step and the kappa computed from it)."""
    import numpy as np

    T, l = 2.5, [0.0, 0.8]
    s = generate(out_dir=str(tmp_path / conv), rule="or", temperature=T, bias=l, bias_convention=conv,
                 kappa_scope="per_component", noise_scale=0.1, **{**TINY, "num_steps": 6})
    for r in s.rows:
        assert (r.get("bias_convention") or "algorithm1") == conv
        tr = np.load(tmp_path / conv / r["traces_path"])
        logq, kappa = tr["logq"][:-1], tr["kappa"]                                   # (S, C, M)
        z = T * (logq + np.array(l)) if conv == "official" else T * logq + np.array(l)
        ref = np.exp(z - z.max(-1, keepdims=True))
        np.testing.assert_allclose(kappa, ref / ref.sum(-1, keepdims=True), rtol=1e-12, atol=1e-14)
    pdb = (tmp_path / conv / s.rows[0]["pdb_path"]).read_text()
    assert ("bias_convention=official" in pdb) == (conv == "official")


@pytest.mark.parametrize("preset", ["paper_or_corrected", "paper_or_bias_corrected", "paper_and_corrected"])
def test_corrected_presets_run_unbiased(tmp_path, preset):
    """Hutchinson at noise_scale 0.1 (and the AND correction): no biased-estimator warning, the official settings
    otherwise (the paper preset runs with the warning: test_api_accepts_model_objects_and_presets)."""
    s = generate({"out_dir": str(tmp_path / preset), **TINY}, preset=preset)
    assert s.generated == 2 and not any("biased" in w for w in s.warnings)
    assert all(r["estimator"] == "hutchinson" and r["noise_scale"] == "0.1" and r["final"] == "state"
               for r in s.rows)
