"""FID / IS / CLIP-score code paths with tiny random feature extractors (no real weights here)."""
import importlib.util
import sys
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch

from eval.image_metrics import (ClipScorer, ImageMetricsError, InceptionFeatures, compute_features, compute_fid,
                                compute_inception_score, feature_statistics, find_inception_weights,
                                frechet_distance, inception_score_from_logits, load_images)


def _ref_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_against_sqrtm_and_closed_forms():
    rng = np.random.default_rng(0)
    for d in (1, 3, 16):
        a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
        s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        f = frechet_distance(mu1, s1, mu2, s2)
        assert f == pytest.approx(_ref_fid(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)
        assert f == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
        assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    # 1-D Gaussians: (m1 - m2)^2 + (sd1 - sd2)^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-1.0]), np.array([[9.0]])) == pytest.approx(5.0)
    with pytest.raises(ImageMetricsError):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_inception_score_limits():
    n, k = 100, 10
    assert inception_score_from_logits(torch.zeros(n, k))[0] == pytest.approx(1.0)
    onehot = torch.full((n, k), -50.0)
    onehot[torch.arange(n), torch.arange(n) % k] = 50.0
    mean, std = inception_score_from_logits(onehot, splits=1)
    assert mean == pytest.approx(k, rel=1e-6)
    # a per-sample computation of exp(E KL(p(y|x) || p(y)))
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(60, 7, generator=g, dtype=torch.float64) * 3
    p = lg.softmax(1)
    ref = float(torch.exp((p * (p.log() - p.mean(0).log())).sum(1).mean()))
    assert inception_score_from_logits(lg, splits=1, shuffle=False)[0] == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ImageMetricsError):
        inception_score_from_logits(torch.zeros(5, 3), splits=10)


class TinyExtractor(torch.nn.Module):
    """A random conv net with the extractor call convention."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)
        self.fc = torch.nn.Linear(6, 5)

    @torch.no_grad()
    def forward(self, x):
        f = self.conv(x.float() / 127.5 - 1).relu().mean((2, 3))
        return {"2048": f, "logits_unbiased": self.fc(f)}


def test_fid_is_with_tiny_extractor_and_image_sources(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (20, 3, 16, 16), generator=g, dtype=torch.uint8)
    b = (a.float() * 0.5).to(torch.uint8)
    ext = TinyExtractor()
    fa, fb = ext(a)["2048"], ext(b)["2048"]
    ref = frechet_distance(*feature_statistics(fa), *feature_statistics(fb))
    for i, im in enumerate(a.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(tmp_path / f"{i:03d}.png")
    assert compute_fid(a, b, ext, batch_size=7) == pytest.approx(ref, rel=1e-6)
    assert compute_fid(str(tmp_path), b, ext) == pytest.approx(ref, rel=1e-6)          # directory of PNGs
    assert abs(compute_fid(a, a, ext)) < 1e-6
    stats_b = feature_statistics(fb)
    assert compute_fid(a, stats_b, ext) == pytest.approx(ref, rel=1e-6)                  # precomputed statistics
    m, s = compute_inception_score(a, ext, splits=2)
    assert m >= 1.0 and s >= 0.0
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageMetricsError, match="no .png"):
        load_images(tmp_path / "empty")
    with pytest.raises(ImageMetricsError, match="returned no"):
        compute_features(a, lambda x: {"other": x}, ["2048"])


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None,
                    reason="torch-fidelity not installed (pip install --no-deps torch-fidelity==0.4.0)")
def test_inception_extractor_loads_local_weights_without_torchvision(tmp_path, monkeypatch):
    from eval.image_metrics import _fidelity_inception_class

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("SUPERDIFF_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(ImageMetricsError, match="not found"):
        find_inception_weights()
    with pytest.raises(ImageMetricsError, match="not found"):
        InceptionFeatures(tmp_path / "missing.pth")
    cls = _fidelity_inception_class()
    # random weights in torch-fidelity's file format (the real file cannot be downloaded here)
    with mock.patch("torch.load", return_value={}), mock.patch.object(cls, "load_state_dict", return_value=None):
        net = cls("x", ["2048"], feature_extractor_weights_path="unused")
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    wpath = hub / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), wpath)
    assert find_inception_weights() == wpath
    ext = InceptionFeatures()                  # found in the cache
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = ext(x)
    assert out["2048"].shape == (2, 2048) and out["logits_unbiased"].shape == (2, 1008)
    # bias-free logits: fc weight only
    assert torch.allclose(out["logits_unbiased"], out["2048"] @ net.fc.weight.T, atol=1e-3, rtol=1e-4)
    assert "torchvision" not in sys.modules
    # a file that is not InceptionV3 weights, and one that would run code, are refused
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ImageMetricsError, match="not torch-fidelity"):
        InceptionFeatures(tmp_path / "other.pth")

    class Boom:
        def __reduce__(self):
            return (print, ("side effect",))

    torch.save({"fc.weight": Boom()}, tmp_path / "evil.pth", _use_new_zipfile_serialization=True)
    with pytest.raises(ImageMetricsError, match="refused and nothing ran"):
        InceptionFeatures(tmp_path / "evil.pth")


def test_clip_score_with_tiny_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from models.image.tiny import write_tiny_clip_tokenizer

    d = tmp_path / "clip"
    tok = write_tiny_clip_tokenizer(d)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=8)
    CLIPModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    scorer = ClipScorer(d)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (3, 3, 40, 48), generator=g, dtype=torch.uint8)
    s = scorer.scores(imgs, ["a cat", "a dog", "a red car"])
    assert s.shape == (3,) and (s >= 0).all() and (s <= 100).all()
    # reference: the model's own embeddings of the same preprocessed inputs
    with torch.no_grad():
        px = scorer.preprocess(imgs)
        assert px.shape == (3, 3, 32, 32)
        ids = tok(["a cat", "a dog", "a red car"], padding="max_length", max_length=16, return_tensors="pt")
        ie = scorer.model.get_image_features(pixel_values=px)
        te = scorer.model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
        ie, te = getattr(ie, "pooler_output", ie), getattr(te, "pooler_output", te)
        ref = 100 * torch.nn.functional.cosine_similarity(ie, te, dim=-1).clamp(min=0)
    assert torch.allclose(s, ref, atol=1e-4)
    assert scorer(imgs, "a cat") == pytest.approx(float(scorer.scores(imgs, "a cat").mean()))
    with pytest.raises(ImageMetricsError, match="prompts for"):
        scorer.scores(imgs, ["a", "b"])
    with pytest.raises(ImageMetricsError, match="CLIP model not available"):
        ClipScorer(tmp_path / "no_clip")
