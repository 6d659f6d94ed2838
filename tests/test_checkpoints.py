"""Safe checkpoint loading (superdiff_protein.frames.checkpoints)."""
from __future__ import annotations

import collections
import os
import pickle

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import official_fixtures_dir, official_params
from superdiff_protein.frames.checkpoints import (
    CheckpointError,
    load_checkpoint_file,
    load_framediff_checkpoint,
    load_proteus_checkpoint,
    load_state_dict_checked,
    strip_module_prefix,
)

OFFICIAL = sorted(official_fixtures_dir().glob("*.pth"))


class _Evil:
    """Pickles to a call of os.makedirs(path): must never run on a safe load."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


@pytest.mark.parametrize("path", official_params(OFFICIAL, "official *.pth checkpoints", ids=lambda p: p.name))
def test_official_containers_load_safely(path):
    obj = load_checkpoint_file(path)
    assert isinstance(obj, dict) and "model" in obj and "conf" in obj
    loader = load_proteus_checkpoint if path.name.startswith("proteus") else load_framediff_checkpoint
    ck = loader(path)
    assert ck.state_dict and all(isinstance(v, torch.Tensor) for v in ck.state_dict.values())
    assert "node_embed_size" in ck.model_conf
    assert not any("module." in k for k in ck.state_dict)
    # interpolations of the stored OmegaConf config are resolved
    assert not any(isinstance(v, str) and v.startswith("${") for v in ck.model_conf.get("ipa", {}).values())


def _container(sd, protocol=2, **extra):
    conf = OmegaConf.create({"model": {"node_embed_size": 4, "ipa": {"c_s": "${model.node_embed_size}"}}})
    return {"model": sd, "conf": conf, "optimizer": {"state": {}, "param_groups": []}, "epoch": 1, "step": 2, **extra}


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_module_prefix_and_omegaconf_both_protocols(tmp_path, protocol):
    lin = nn.Linear(3, 2)
    sd = collections.OrderedDict(("module." + k, v) for k, v in lin.state_dict().items())
    f = tmp_path / "ck.pth"
    torch.save(_container(sd), f, pickle_protocol=protocol)
    ck = load_framediff_checkpoint(f)
    assert list(ck.state_dict) == ["weight", "bias"]
    assert ck.model_conf["ipa"]["c_s"] == 4
    assert ck.raw == {"epoch": 1, "step": 2}
    fresh = nn.Linear(3, 2)
    load_state_dict_checked(fresh, ck.state_dict)
    torch.testing.assert_close(fresh.weight, lin.weight)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_code_in_checkpoint_is_refused_and_not_run(tmp_path, protocol):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pth"
    torch.save(_container({"w": torch.ones(1)}, payload=_Evil(str(marker))), f, pickle_protocol=protocol)
    with pytest.raises(CheckpointError):
        load_framediff_checkpoint(f)
    assert not marker.exists()
    with pytest.raises(TypeError):  # there is no trust switch any more
        load_checkpoint_file(f, trust_checkpoint=True)
    assert not marker.exists()


def test_unknown_class_refused(tmp_path):
    import fractions

    f = tmp_path / "frac.pth"
    torch.save({"model": {}, "conf": {"model": {}}, "x": fractions.Fraction(1, 3)}, f, pickle_protocol=5)
    with pytest.raises(CheckpointError, match="fractions.Fraction"):
        load_checkpoint_file(f)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_file(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError):
        load_checkpoint_file(bad)
    good = tmp_path / "good.pth"
    torch.save(_container({"w": torch.ones(3)}), good)
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint_file(trunc)


def test_container_format_errors(tmp_path):
    f = tmp_path / "sd_only.pth"
    torch.save({"weight": torch.ones(2)}, f)
    with pytest.raises(CheckpointError, match="container lacks"):
        load_framediff_checkpoint(f)
    g = tmp_path / "list.pth"
    torch.save([torch.ones(1)], g)
    with pytest.raises(CheckpointError, match="container"):
        load_proteus_checkpoint(g)


def test_key_mismatch_names_keys():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    sd = dict(model.state_dict())
    sd.pop("1.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["0.weight"] = torch.zeros(5, 3)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_checked(model, sd)
    msg = str(e.value)
    assert "1.bias" in msg and "extra.weight" in msg and "0.weight" in msg and "(5, 3)" in msg
    before = model[0].weight.clone()
    with pytest.raises(CheckpointError):
        load_state_dict_checked(model, sd, strict=False)  # missing keys are an error even non-strict
    torch.testing.assert_close(model[0].weight, before)  # nothing was loaded


def test_non_strict_reports_unexpected():
    model = nn.Linear(3, 2)
    sd = dict(model.state_dict())
    sd["aux_head.weight"] = torch.zeros(1)
    rep = load_state_dict_checked(model, sd, strict=False)
    assert rep == {"missing": [], "unexpected": ["aux_head.weight"]}
    with pytest.raises(CheckpointError, match="aux_head.weight"):
        load_state_dict_checked(model, sd, strict=True)


def test_strip_module_prefix():
    assert list(strip_module_prefix({"module.a.module.b": 1, "c": 2})) == ["a.b", "c"]
