"""CIFAR-10 archive reading (real python-pickle format), Lightning training of a few steps, OR of two models."""
import io
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from models.image.adapters import ImageModelError  # noqa: E402
from models.image.cifar import CIFAR_CLASSES, TrainConfig, read_cifar_archive, train_ddpm, write_cifar_archive  # noqa: E402
from models.image.pipeline import SuperDiffPipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(max_steps=3, batch_size=4, block_out_channels=[8, 16], layers_per_block=1, attention_levels=[1],
            norm_num_groups=4, num_workers=0, accelerator="cpu", progress=False, warmup_steps=1, ema_decay=0.9)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    d = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (80, 3, 32, 32), dtype=np.uint8)
    labels = np.arange(80) % 10
    test = rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8)
    path = write_cifar_archive(d / "cifar-10-python.tar.gz", imgs, labels, test, np.arange(20) % 10)
    return path, imgs, labels, test


def test_read_archive_and_class_subsets(archive, tmp_path):
    path, imgs, labels, test = archive
    with tarfile.open(path) as tf:     # the real layout: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
        names = sorted(os.path.basename(n) for n in tf.getnames())
    assert names == ["batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                     "test_batch"]
    x, y = read_cifar_archive(path)
    assert x.dtype == torch.uint8 and x.shape == (80, 3, 32, 32)
    assert np.array_equal(x.numpy(), imgs) and np.array_equal(y.numpy(), labels)
    for classes in ([0, 1, 2, 3, 4], ["dog", "truck"], ["3"]):
        xs, ys = read_cifar_archive(path, classes)
        ids = [CIFAR_CLASSES.index(c) if isinstance(c, str) and not c.isdigit() else int(c) for c in classes]
        keep = np.isin(labels, ids)
        assert np.array_equal(xs.numpy(), imgs[keep]) and set(ys.tolist()) == set(ids)
    xt, _ = read_cifar_archive(path, split="test")
    assert np.array_equal(xt.numpy(), test)
    # the extracted directory works too
    ex = tmp_path / "ex"
    with tarfile.open(path) as tf:
        tf.extractall(ex, filter="data")
    assert torch.equal(read_cifar_archive(ex, [1])[0], read_cifar_archive(path, [1])[0])


def test_bad_archives_refused(archive, tmp_path):
    path = archive[0]
    with pytest.raises(ImageModelError, match="not found"):
        read_cifar_archive(tmp_path / "nope.tar.gz")
    with pytest.raises(ImageModelError, match="unknown CIFAR-10 class"):
        read_cifar_archive(path, ["unicorn"])
    with pytest.raises(ImageModelError, match="out of range"):
        read_cifar_archive(path, [10])
    # a pickle that would run code is refused, not executed
    evil = tmp_path / "evil.tar.gz"

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with tarfile.open(evil, "w:gz") as tf:
        for n in [f"data_batch_{i}" for i in range(1, 6)]:
            data = pickle.dumps({b"data": Boom(), b"labels": []})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{n}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ImageModelError, match="refused and nothing ran"):
        read_cifar_archive(evil)
    assert not (tmp_path / "pwned").exists()
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar")
    with pytest.raises(ImageModelError, match="tar"):
        read_cifar_archive(junk)


def test_train_two_halves_and_or_superposition(archive, tmp_path):
    path = archive[0]
    outs = []
    for name, classes in (("a", [0, 1, 2, 3, 4]), ("b", [5, 6, 7, 8, 9])):
        cfg = TrainConfig(archive=str(path), output=str(tmp_path / name), classes=classes, **TINY)
        outs.append(train_ddpm(cfg))
    before = {k: v.clone() for k, v in __import__("models.image.cifar", fromlist=["x"]).build_unet(
        TrainConfig(**TINY)).state_dict().items()}
    for o in outs:
        assert (o / "unet" / "config.json").is_file() and (o / "scheduler" / "scheduler_config.json").is_file()
        assert (o / "model_index.json").is_file() and not list(tmp_path.glob("*.tmp*"))
    pipe = SuperDiffPipeline.from_pretrained([str(o) for o in outs])
    after = pipe.unets[0].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)        # training changed the weights
    out = pipe(None, rule="or", num_inference_steps=4, seeds=[0, 1], output_type="np")
    assert out.images[0].shape == (32, 32, 3) and out.kappa.shape == (4, 2, 2)
    assert torch.isfinite(out.logq).all()
    # retraining into an existing output directory replaces it
    cfg = TrainConfig(archive=str(path), output=str(outs[0]), classes=[0], **dict(TINY, max_steps=1))
    train_ddpm(cfg)
    assert '"classes": [\n    0\n  ]' in (outs[0] / "superdiff_train.json").read_text()


def test_train_image_model_cli(archive, tmp_path, capsys):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-c", "from superdiff_protein.cli.images import train_main; train_main()",
           f"archive={archive[0]}", f"output={tmp_path / 'm'}", "classes=[cat,dog]", "max_steps=2", "batch_size=4",
           "block_out_channels=[8,16]", "layers_per_block=1", "norm_num_groups=4", "num_workers=0",
           "accelerator=cpu", "progress=false", "ema_decay=0"]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "m" / "unet" / "config.json").is_file()
    # bad input: the CLI wrapper turns it into one error line and exit code 2 (no traceback)
    from superdiff_protein.cli.images import _guarded, run_train

    for kw in ({"archive": str(tmp_path / "none.tar.gz")}, {"classes": ["unicorn"]}, {"prediction_type": "sample"}):
        cfg = TrainConfig(**dict(dict(archive=str(archive[0]), output=str(tmp_path / "x"), **TINY), **kw))
        assert _guarded("train_image_model", lambda: run_train(cfg)) == 2
        err = capsys.readouterr().err
        assert err.startswith("train_image_model: error:") and "Traceback" not in err
