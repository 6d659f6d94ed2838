"""Python API of generate_backbones (in-process, fast) and the config contract."""
from __future__ import annotations

import pytest
import yaml

from superdiff_protein.generate import (
    CONFIG_DIR,
    GenerateConfig,
    GenerateError,
    _validate,
    generate,
    load_config,
    load_exact_model,
)

CONTRACT = ["models", "rule", "temperature", "bias", "kappa_scope", "estimator", "num_steps", "min_t", "noise_scale",
            "lengths", "samples_per_length", "batch_size", "seed", "device", "precision", "out_dir", "save_traj"]
TINY = dict(models=["exact-helix", "exact-strand"], lengths=[10], samples_per_length=2, num_steps=4, plots=False,
            progress=False)


def test_yaml_holds_the_public_contract_and_matches_the_schema():
    cfg = yaml.safe_load((CONFIG_DIR / "generate_backbones.yaml").read_text())
    keys = [k for k in cfg if k not in ("defaults", "hydra")]
    assert keys[:len(CONTRACT)] == CONTRACT
    assert set(keys) == set(GenerateConfig.__dataclass_fields__)
    dc = GenerateConfig()
    for k in keys:
        assert cfg[k] == getattr(dc, k), k        # the fallback defaults (no configs/ dir) are the yaml's


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIG_DIR / "generate").glob("*.yaml")))
def test_every_preset_loads_and_validates(preset):
    opts = _validate(load_config(preset=preset))
    assert opts.num_steps == 500
    assert opts.noise_scale in (0.1, 1.0)
    if preset.startswith("paper"):
        assert opts.noise_scale == 0.1 and opts.estimator == "ito"


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
])
def test_api_bad_input_raises_and_writes_nothing(tmp_path, kw, msg):
    out = tmp_path / "never"
    with pytest.raises(GenerateError, match=msg):
        generate(**{**TINY, "out_dir": str(out), **kw})
    assert not out.exists()


def test_defaults_are_the_shipped_trained_models(tmp_path):
    """The plain job uses the two trained checkpoints of models/checkpoints/ (both load through the registry)."""
    from superdiff_protein.registry import BUILTIN_CHECKPOINTS, available_models

    cfg = load_config()
    assert cfg["models"] == ["default-helix", "default-strand"]
    assert all(name in available_models() for name in cfg["models"])
    assert set(cfg["models"]) <= set(BUILTIN_CHECKPOINTS)
    s = generate(out_dir=str(tmp_path / "d"), lengths=[12], samples_per_length=2, batch_size=2, num_steps=3,
                 plots=False, progress=False)
    assert s.generated == 2
    assert [r["models"] for r in s.rows] == ["default-helix;default-strand"] * 2
