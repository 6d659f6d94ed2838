"""No code from a checkpoint or data file ever runs (issue 12 part 1; threat model in docs/security.md).

Each payload, when unpickled by a normal unpickler, creates a marker file.  It is planted in every place
a torch file holds a pickle (zip ``data.pkl``; the legacy format's magic-number, protocol, system-info,
object and storage-key pickles), in every pickle protocol, and as a bare pickle; then every entry point
that reads such a file is given it.  Each must refuse with an error and the marker must never appear.
A control test checks that the payload does run under plain ``pickle.loads`` (so the tests can fail).
"""
from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from superdiff_protein.runs.safe_load import (
    ALLOWED_GLOBAL_NAMES,
    CheckpointError,
    UnsafeCheckpointError,
    pretrained_load_kwargs,
    safe_load,
    safe_loads,
)

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = list(range(2, pickle.HIGHEST_PROTOCOL + 1))  # torch.save needs >= 2
MAGIC = 0x1950A86A20F9469CFC6C


class Payload:
    """Unpickling this runs ``how`` and leaves ``marker`` behind."""

    def __init__(self, marker: Path, how: str = "makedirs"):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "makedirs":
            return (os.makedirs, (self.marker,))
        if self.how == "exec":
            return (exec, (f"open({self.marker!r}, 'w').close()",))
        return (os.system, (f"touch '{self.marker}'",))


def _container(payload=None) -> dict:
    conf = OmegaConf.create({"model": {"node_embed_size": 4}})
    out = {"model": {"w": torch.ones(2)}, "conf": conf, "epoch": 0, "step": 0}
    if payload is not None:
        out["extra"] = [{"deep": payload}]
    return out


def _pickle_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each consecutive pickle at the head of a legacy torch file (five of them)."""
    spans, pos = [], 0
    for _ in range(5):
        end = None
        for op, _arg, at in pickletools.genops(io.BytesIO(data[pos:])):
            if op.name == "STOP":
                end = pos + at + 1
                break
        spans.append((pos, end))
        pos = end
    return spans


def _legacy_with(payload_bytes: bytes, slot: int, protocol: int) -> bytes:
    clean = io.BytesIO()
    torch.save(_container(), clean, pickle_protocol=protocol, _use_new_zipfile_serialization=False)
    data = clean.getvalue()
    a, b = _pickle_spans(data)[slot]
    return data[:a] + payload_bytes + data[b:]


def planted_files(tmp: Path, marker: Path) -> dict[str, bytes]:
    """Every file shape the tests plant a payload in, by name."""
    files: dict[str, bytes] = {}
    for proto in PROTOCOLS:
        for how in ("makedirs", "exec", "system"):
            buf = io.BytesIO()
            torch.save(_container(Payload(marker, how)), buf, pickle_protocol=proto)
            files[f"zip-p{proto}-{how}"] = buf.getvalue()
        buf = io.BytesIO()
        torch.save(_container(Payload(marker)), buf, pickle_protocol=proto, _use_new_zipfile_serialization=False)
        files[f"legacy-object-p{proto}"] = buf.getvalue()
        evil = pickle.dumps(Payload(marker), protocol=proto)
        for slot, name in ((0, "magic"), (1, "version"), (2, "sysinfo"), (4, "keys")):
            files[f"legacy-{name}-p{proto}"] = _legacy_with(evil, slot, proto)
    for proto in range(0, pickle.HIGHEST_PROTOCOL + 1):
        files[f"raw-pickle-p{proto}"] = pickle.dumps(Payload(marker), protocol=proto)
    # protocol-0 INST opcode: the import happens inside the opcode itself
    files["raw-inst-opcode"] = b"(S'" + str(marker).encode() + b"'\nios\nmakedirs\n."
    return files


def test_payloads_do_run_under_plain_pickle(tmp_path):
    """Control: the planted pickles are live (a plain unpickler runs them), so the refusals below mean something."""
    marker = tmp_path / "m"
    for proto in (0, 2, 5):
        pickle.loads(pickle.dumps(Payload(marker), protocol=proto))
        assert marker.exists()
        os.rmdir(marker)
    pickle.loads(planted_files(tmp_path, marker)["raw-inst-opcode"])
    assert marker.exists()


def test_every_format_and_protocol_refused(tmp_path):
    marker = tmp_path / "pwned"
    files = planted_files(tmp_path, marker)
    # per torch protocol: 3 zip payloads + legacy object pickle + 4 legacy header slots; bare pickles of every protocol
    assert len(files) == len(PROTOCOLS) * 8 + (pickle.HIGHEST_PROTOCOL + 1) + 1
    for name, data in files.items():
        f = tmp_path / f"{name}.pt"
        f.write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            safe_load(f)
        msg = str(e.value)
        assert "\n" not in msg and str(f) in msg, (name, msg)
        with pytest.raises(CheckpointError):
            safe_load(f, materialize=False)
        assert not marker.exists(), f"payload ran: {name}"
    # the message says what was refused and why
    with pytest.raises(UnsafeCheckpointError, match="refused and nothing ran.*docs/security.md"):
        safe_loads(files["zip-p2-system"])


def test_torchscript_and_module_pickles_refused(tmp_path):
    f = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(f))
    with pytest.raises(UnsafeCheckpointError, match="TorchScript"):
        safe_load(f)
    g = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), g)  # a whole module: needs its class, refused
    with pytest.raises(UnsafeCheckpointError):
        safe_load(g)


def test_clean_files_round_trip_exactly(tmp_path):
    """Every dtype, views sharing storage, parameters, nested containers, OmegaConf, both formats, all protocols."""
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    obj = {"f64": base, "view": base[1:, 2:], "t": base.t(), "f16": base.half(), "bf16": base.bfloat16(),
           "bool": base > 3, "i64": base.long(), "i8": base.to(torch.int8), "c64": torch.complex(base, base).cfloat(),
           "param": torch.nn.Parameter(torch.ones(3)), "empty": torch.empty(0, 3), "scalar": torch.tensor(2.5),
           "misc": [1, 2.5, "x", b"by", None, (1, 2), {3}], "size": torch.Size([2, 3]), "dtype": torch.float16,
           "conf": OmegaConf.create({"a": {"b": 1, "c": "${a.b}"}})}
    for zipped in (True, False):
        for proto in PROTOCOLS:
            buf = io.BytesIO()
            torch.save(obj, buf, pickle_protocol=proto, _use_new_zipfile_serialization=zipped)
            out = safe_loads(buf.getvalue())
            ref = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
            for k, v in ref.items():
                if isinstance(v, torch.Tensor):
                    assert out[k].dtype == v.dtype and out[k].shape == v.shape and out[k].stride() == v.stride()
                    assert torch.equal(out[k], v), k
                elif k == "conf":
                    assert OmegaConf.to_container(out[k], resolve=True) == {"a": {"b": 1, "c": 1}}
                else:
                    assert out[k] == v, k
            assert isinstance(out["param"], torch.nn.Parameter)
            if zipped:  # views share their storage, as torch.load gives
                assert out["view"].untyped_storage().data_ptr() == out["f64"].untyped_storage().data_ptr()


def test_truncated_empty_and_odd_files(tmp_path):
    good = io.BytesIO()
    torch.save(_container(), good, _use_new_zipfile_serialization=False)
    data = good.getvalue()
    for n in (0, 1, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(CheckpointError) as e:
            safe_loads(data[:n])
        assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="directory"):
        safe_load(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        safe_load(tmp_path / "missing.pt")


def test_allow_list_has_nothing_that_runs_code():
    risky = ("os.", "posix.", "subprocess.", "sys.", "builtins.eval", "builtins.exec", "builtins.getattr",
             "builtins.__import__", "builtins.open", "builtins.compile", "importlib.", "pickle.", "io.",
             "shutil.", "functools.", "operator.", "torch.load", "torch.jit", "numpy.load")
    bad = [n for n in ALLOWED_GLOBAL_NAMES if n.startswith(risky)]
    assert not bad, bad


# --------------------------------------------------------------------------------- every entry point
def _entry_points(tmp: Path):
    from eval.image_metrics import ImageMetricsError, InceptionFeatures
    from eval.mpnn import load_proteinmpnn
    from models.frame_models import FrameScoreModel
    from models.framediff.adapter import FrameDiffAdapter
    from models.framediff.checkpointing import export_from_lightning_checkpoint
    from models.proteus.adapter import ProteusAdapter
    from superdiff_protein.frames import checkpoints as C
    from superdiff_protein.frames.data import load_dataset_file
    from models.exact_frames import load_exact_frame_set
    from superdiff_protein.frames.registry import load_model

    return {
        "load_checkpoint_file": C.load_checkpoint_file,
        "load_framediff_checkpoint": C.load_framediff_checkpoint,
        "load_proteus_checkpoint": C.load_proteus_checkpoint,
        "load_model(path)": load_model,
        "load_model(framediff:)": lambda p: load_model(f"framediff:{p}"),
        "load_model(proteus:)": lambda p: load_model(f"proteus:{p}"),
        "FrameDiffAdapter": FrameDiffAdapter.from_checkpoint,
        "ProteusAdapter": ProteusAdapter.from_checkpoint,
        "FrameScoreModel": FrameScoreModel.from_checkpoint,
        "dataset file": load_dataset_file,
        "exact frame set": load_exact_frame_set,
        "ProteinMPNN weights": lambda p: load_proteinmpnn(weights=str(p)),
        "InceptionV3 weights": lambda p: InceptionFeatures(weights_path=p),
        "export_from_lightning_checkpoint": lambda p: export_from_lightning_checkpoint(p, tmp / "out.pth"),
    }


def test_every_library_entry_point_refuses_every_planted_file(tmp_path):
    marker = tmp_path / "pwned"
    files = planted_files(tmp_path, marker)
    entries = _entry_points(tmp_path)
    for fname, data in files.items():
        f = tmp_path / f"{fname}.pth"
        f.write_bytes(data)
        for ename, fn in entries.items():
            with pytest.raises(Exception) as e:
                fn(f)
            assert not isinstance(e.value, (AssertionError, NameError)), (ename, fname, e.value)
            assert not marker.exists(), f"payload ran through {ename} with {fname}"


def _hf_dir(root: Path, sub: str, weights_name: str, data: bytes) -> Path:
    d = root / sub if sub else root
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text("{}")
    (d / weights_name).write_bytes(data)
    return root


def test_pretrained_folders_are_vetted(tmp_path):
    """diffusers / transformers folders: pickle weights are parsed by the allow-listed loader first."""
    from eval.fold import load_esmfold
    from eval.image_metrics import ClipScorer
    from models.image.pipeline import SuperDiffPipeline

    marker = tmp_path / "pwned"
    evil = planted_files(tmp_path, marker)["zip-p2-makedirs"]
    sd = _hf_dir(tmp_path / "sd", "unet", "diffusion_pytorch_model.bin", evil)
    (sd / "scheduler").mkdir()
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                                     "scheduler": ["diffusers", "DDPMScheduler"]}))
    with pytest.raises(Exception, match="refused"):
        SuperDiffPipeline.from_pretrained(str(sd))
    esm = _hf_dir(tmp_path / "esm", "", "pytorch_model.bin", evil)
    with pytest.raises(Exception, match="refused"):
        load_esmfold(str(esm))
    clip = _hf_dir(tmp_path / "clip", "", "pytorch_model.bin", evil)
    with pytest.raises(Exception, match="refused"):
        ClipScorer(clip)
    assert not marker.exists()
    # safetensors present: only safetensors is read
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "model.safetensors").write_bytes(b"")
    (tmp_path / "st" / "pytorch_model.bin").write_bytes(evil)
    assert pretrained_load_kwargs(tmp_path / "st") == {"use_safetensors": True}
    assert pretrained_load_kwargs("some-org/some-hub-id") == {"use_safetensors": True}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300,
                          cwd=str(cwd), env=env)


def _write_helix_pdb(path: Path, n: int = 12) -> None:
    """An ideal-ish helical CA trace with N/C/O placed around it (enough for ProteinMPNN to run)."""
    import numpy as np

    from eval.io import write_backbone_pdb

    i = np.arange(n)[:, None]
    ca = np.concatenate([2.3 * np.cos(i * 1.745), 2.3 * np.sin(i * 1.745), 1.5 * i], axis=1)
    coords = np.stack([ca + [0.9, 0.9, -0.6], ca, ca + [-0.9, 0.9, 0.6], ca + [-1.4, 1.9, 0.9]], axis=1)
    write_backbone_pdb(path, coords, "G" * n)


@pytest.mark.parametrize("kind", ["legacy-magic-p2", "zip-p5-system"])
def test_command_lines_refuse_and_exit_2(tmp_path, kind):
    """generate_backbones models=, evaluate_backbones mpnn.weights=, train_frame_model data.path= and resume."""
    marker = tmp_path / "pwned"
    trojan = tmp_path / "trojan.pt"
    trojan.write_bytes(planted_files(tmp_path, marker)[kind])
    runs = {
        "generate models=": ("superdiff_protein.cli.generate", f"models=[{trojan},default-strand]", "lengths=[20]",
                             "samples_per_length=1", "num_steps=2", f"out_dir={tmp_path / 'gen'}", "plots=false",
                             "progress=false"),
        "train data.path=": ("superdiff_protein.cli.train", "model=tiny", f"data.path={trojan}",
                             f"out_dir={tmp_path / 'train'}", "max_steps=1", "trainer.accelerator=cpu"),
    }
    samples = tmp_path / "samples"
    samples.mkdir()
    _write_helix_pdb(samples / "a.pdb")
    runs["evaluate mpnn.weights="] = ("superdiff_protein.cli.evaluate", f"samples_dir={samples}", f"mpnn.weights={trojan}", "esmfold=null",
                                      "novelty.refold=false", "diversity.enabled=false", "plots=false",
                                      "progress=false", f"out_dir={tmp_path / 'ev'}")
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    (resume_dir / "last.ckpt").write_bytes(trojan.read_bytes())
    runs["train resume"] = ("superdiff_protein.cli.train", "model=tiny", f"data.path={trojan}", f"out_dir={resume_dir}",
                            "resume=true", "max_steps=1", "trainer.accelerator=cpu")
    for name, args in runs.items():
        r = _cli(*args, cwd=tmp_path)
        assert not marker.exists(), f"payload ran through {name}"
        assert r.returncode == 2, (name, r.returncode, r.stderr[-2000:])
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        assert "refused" in lines[0] or "not a readable" in lines[0], (name, lines[0])
