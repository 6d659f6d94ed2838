"""Model registry: names, kind:path specs, checkpoint autodetection, entry points, clear errors."""
from __future__ import annotations

import json
import shutil
import sys
import textwrap

import pytest
import torch

from conftest import official_fixtures_dir, official_skip_reason
from superdiff_protein.frames import registry
from superdiff_protein.frames.checkpoints import CheckpointError
from superdiff_protein.frames.registry import UnknownModelError, available_models, load_model, register_model

FIX = official_fixtures_dir()


def _ckpts() -> dict[str, object]:
    out = {}
    for ref in sorted(FIX.glob("*_small_public_reference.json")):
        meta = json.loads(ref.read_text())
        kind = "proteus" if "ema" in meta.get("checkpoint_container_keys", []) else "framediff"
        out[kind] = ref.parent / meta["checkpoint_file"]
    return out


CKPTS = _ckpts()
needs_ckpts = pytest.mark.skipif(len(CKPTS) < 2, reason=official_skip_reason("FrameDiff and Proteus fixture checkpoints"))


@needs_ckpts
@pytest.mark.parametrize("kind", ["framediff", "proteus"])
def test_autodetect_and_prefix(kind):
    path = CKPTS[kind]
    m = load_model(str(path))
    assert m.kind == kind and m.name == f"{kind}:{path.stem}"
    m2 = load_model(f"{kind}:{path}", name="mine")
    assert m2.kind == kind and m2.name == "mine"
    assert m.signature() == m2.signature()
    p = next(m.predictor.parameters())
    assert p.dtype == torch.float32 and not m.predictor.training


@needs_ckpts
def test_wrong_architecture_prefix_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="missing|unexpected"):
        load_model(f"framediff:{CKPTS['proteus']}")
    with pytest.raises(CheckpointError):
        load_model(f"proteus:{CKPTS['framediff']}")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match="not found"):
        load_model(f"framediff:{tmp_path / 'nope.pth'}")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError):
        load_model(str(bad))
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    with pytest.raises(CheckpointError, match="model"):
        load_model(str(other))


def test_unknown_name_lists_available():
    register_model("tmp-test-model", lambda device="cpu", dtype=None, **kw: ("built", device), overwrite=True)
    try:
        with pytest.raises(UnknownModelError) as e:
            load_model("no-such-model")
        assert "tmp-test-model" in str(e.value) and "framediff:<path>" in str(e.value)
        assert load_model("tmp-test-model", device="meta") == ("built", "meta")
        with pytest.raises(ValueError, match="already registered"):
            register_model("tmp-test-model", lambda **kw: None)
        with pytest.raises(ValueError):
            register_model("bad:name", lambda **kw: None)
        with pytest.raises(UnknownModelError, match="kind"):
            registry.load_frame_checkpoint("x.pt", kind="genie")
    finally:
        registry.unregister_model("tmp-test-model")
    assert "tmp-test-model" not in available_models()


@needs_ckpts
def test_builtin_table_offers_existing_files_only(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "CHECKPOINT_DIR", tmp_path)
    assert "default-helix" not in available_models()
    with pytest.raises(UnknownModelError):
        load_model("default-helix")
    shutil.copy(CKPTS["framediff"], tmp_path / registry.BUILTIN_CHECKPOINTS["default-helix"][1])
    assert "default-helix" in available_models()
    m = load_model("default-helix")
    assert m.name == "default-helix" and m.kind == "framediff"


def test_entry_point_plugin(tmp_path, monkeypatch):
    """A third-party distribution registering a model through the entry-point group."""
    (tmp_path / "superdiff_toy_plugin.py").write_text(textwrap.dedent('''
        from superdiff_protein.frames.se3 import SE3Diffuser
        from models.frame_models import FrameScoreModel
        from tests_toy_predictor import ToyPredictor

        def load(device="cpu", dtype=None, **kw):
            return FrameScoreModel(ToyPredictor().to(device), SE3Diffuser.framediff_default(), name="toy-plugin")
    '''))
    (tmp_path / "tests_toy_predictor.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn
        from models.frame_models import FramePrediction

        class ToyPredictor(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.zeros(()))

            def forward(self, rotmats, trans, t, res_mask, self_cond=None):
                return FramePrediction(rotmats=rotmats, trans=trans * 0 + self.w)
    '''))
    dist = tmp_path / "superdiff_toy_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: superdiff-toy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\ntoy-plugin = superdiff_toy_plugin:load\n"
                                           f"broken-plugin = superdiff_no_such_module:load\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "toy-plugin" in available_models()
    m = load_model("toy-plugin")
    assert m.name == "toy-plugin" and m.kind == "generic"
    x = {"rot": torch.eye(3, dtype=torch.float64).expand(1, 4, 3, 3), "trans": torch.zeros(1, 4, 3, dtype=torch.float64)}
    out = m(x, torch.tensor([0.5], dtype=torch.float64), None, m.init_state(1, None))
    assert out.scores["rot"].abs().max() < 1e-3 and out.scores["trans"].shape == (1, 4, 3)
    with pytest.raises(UnknownModelError, match="failed to import"):
        load_model("broken-plugin")
    sys.modules.pop("superdiff_toy_plugin", None)
    sys.modules.pop("tests_toy_predictor", None)
