"""Image metrics: FID, Inception Score and CLIP score, with weights from a local path or cache only.

FID / IS
    Features come from torch-fidelity's TF-compatible InceptionV3 (``pool3`` 2048-d features for FID,
    unbiased 1008-way logits for IS), so numbers are comparable with torch-fidelity / the paper. Its
    package ``__init__`` imports torchvision, which must never be installed here, so the package is
    installed with ``pip install --no-deps torch-fidelity==0.4.0`` and only its InceptionV3 module
    (which imports no torchvision) is loaded, under a temporary stand-in for the package
    (:func:`_fidelity_inception_class`). The metric maths (mean/covariance, Frechet distance, split
    KL for IS) is ours, written to match torch-fidelity's definitions.
    Weights: ``weights_path`` argument, else ``$SUPERDIFF_INCEPTION_WEIGHTS``, else the torch hub
    cache (``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``, the file
    torch-fidelity downloads). Nothing is downloaded; without weights a clear error says where to put them.
    The weights file is first read by the allow-listed loader (``superdiff_protein.runs.safe_load``: no code runs).

CLIP score
    ``100 * max(cos(E_img, E_txt), 0)`` averaged over (image, prompt) pairs (Hessel et al. 2021, as in
    torchmetrics), with a transformers ``CLIPModel`` + ``CLIPTokenizer`` from a local directory or the
    HF cache (``local_files_only``). Image preprocessing (shortest side to ``image_size`` bicubic,
    centre crop, CLIP mean/std) is done here with PIL, so no torchvision-backed image processor is needed.

Any feature extractor with the call convention ``extractor(uint8 (B, 3, H, W)) -> {"2048": (B, D),
"logits_unbiased": (B, K)}`` can be passed (the tests use tiny random networks).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import types
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ImageMetricsError",
    "load_images",
    "frechet_distance",
    "feature_statistics",
    "inception_score_from_logits",
    "InceptionFeatures",
    "find_inception_weights",
    "compute_features",
    "compute_fid",
    "compute_inception_score",
    "ClipScorer",
]

INCEPTION_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
Extractor = Callable[[Tensor], Mapping[str, Tensor]]


class ImageMetricsError(RuntimeError):
    """Missing weights / packages or bad image input (message says what to do)."""


# ------------------------------------------------------------------------------------------ images
def load_images(source) -> Tensor:
    """uint8 (N, 3, H, W) from a directory of PNG/JPEG files (sorted), a list of PIL images / arrays
    (H, W, 3), or a tensor (returned as uint8)."""
    from PIL import Image

    if isinstance(source, Tensor):
        if source.dtype != torch.uint8 or source.dim() != 4 or source.shape[1] != 3:
            raise ImageMetricsError(f"expected a uint8 tensor (N, 3, H, W), got {source.dtype} {tuple(source.shape)}")
        return source
    if isinstance(source, (str, os.PathLike)):
        d = Path(source)
        if not d.is_dir():
            raise ImageMetricsError(f"image directory not found: {d}")
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg") and not p.name.startswith("."))
        if not files:
            raise ImageMetricsError(f"no .png/.jpg images in {d}")
        source = [Image.open(p) for p in files]
    arrs = []
    for im in source:
        a = np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
        if a.ndim != 3 or a.shape[2] != 3:
            raise ImageMetricsError(f"images must be RGB (H, W, 3), got shape {a.shape}")
        arrs.append(torch.from_numpy(np.array(a, dtype=np.uint8, copy=True)).permute(2, 0, 1))
    if not arrs:
        raise ImageMetricsError("no images given")
    if len({tuple(a.shape) for a in arrs}) != 1:
        raise ImageMetricsError("all images must have the same size")
    return torch.stack(arrs)


# ------------------------------------------------------------------------------------------ maths
def feature_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, float64."""
    f = np.asarray(features.detach().cpu() if isinstance(features, Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ImageMetricsError(f"need at least 2 feature vectors (N, D), got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})``; the trace of the matrix square root
    is the sum of square roots of the eigenvalues of ``S1 S2`` (real, >= 0 for PSD S1, S2; tiny
    negative / imaginary round-off is discarded)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ImageMetricsError(f"statistics shapes differ: {mu1.shape}, {s1.shape} vs {mu2.shape}, {s2.shape}")
    ev = np.linalg.eigvals(s1 @ s2).astype(np.complex128)
    tr_covmean = float(np.sqrt(ev).real.sum())
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def inception_score_from_logits(logits: Tensor, splits: int = 10, shuffle: bool = True,
                                seed: int = 2020) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split; returns (mean, std) over splits (torch-fidelity's
    definition: rows shuffled with ``RandomState(seed)``, float64)."""
    if logits.dim() != 2 or logits.shape[0] < splits:
        raise ImageMetricsError(f"need (N, K) logits with N >= splits={splits}, got {tuple(logits.shape)}")
    x = logits.detach().cpu().double()
    if shuffle:
        x = x[torch.from_numpy(np.random.RandomState(seed).permutation(x.shape[0]))]
    p, logp = x.softmax(1), x.log_softmax(1)
    n = x.shape[0]
    scores = []
    for i in range(splits):
        sl = slice(i * n // splits, (i + 1) * n // splits)
        pc, lpc = p[sl], logp[sl]
        q = pc.mean(0, keepdim=True)
        scores.append(float((pc * (lpc - q.log())).sum(1).mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------------------------------ inception
def _fidelity_inception_class():
    """torch-fidelity's ``FeatureExtractorInceptionV3`` without running the package ``__init__`` (which
    imports torchvision): a temporary stand-in package module points at the installed directory."""
    existing = sys.modules.get("torch_fidelity.feature_extractor_inceptionv3")
    if existing is not None:
        return existing.FeatureExtractorInceptionV3
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        raise ImageMetricsError("FID/IS need torch-fidelity's InceptionV3: pip install --no-deps torch-fidelity==0.4.0 "
                                "(never without --no-deps: it would pull torchvision)")
    created = "torch_fidelity" not in sys.modules
    if created:
        stub = types.ModuleType("torch_fidelity")
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = stub
    try:
        mod = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    except ImportError as e:
        raise ImageMetricsError(f"cannot import torch-fidelity's InceptionV3 module: {e}") from e
    finally:
        if created:
            sys.modules.pop("torch_fidelity", None)
    return mod.FeatureExtractorInceptionV3


def find_inception_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """Resolve the InceptionV3 weights file (argument, ``$SUPERDIFF_INCEPTION_WEIGHTS``, torch hub cache)."""
    cands: list[Path] = []
    if weights_path:
        p = Path(weights_path)
        if not p.is_file():
            raise ImageMetricsError(f"InceptionV3 weights file not found: {p}")
        return p
    env = os.environ.get("SUPERDIFF_INCEPTION_WEIGHTS")
    if env:
        cands.append(Path(env))
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    cands += [hub / n for n in INCEPTION_FILES]
    for c in cands:
        if c.is_file():
            return c
    raise ImageMetricsError(
        "InceptionV3 weights for FID/IS not found (nothing is downloaded). Put torch-fidelity's "
        f"'{INCEPTION_FILES[0]}' at one of: " + ", ".join(str(c) for c in cands) +
        " or pass weights_path / set SUPERDIFF_INCEPTION_WEIGHTS.")


class InceptionFeatures(torch.nn.Module):
    """torch-fidelity's TF-compatible InceptionV3 as an extractor: uint8 (B, 3, H, W) ->
    ``{"2048": (B, 2048), "logits_unbiased": (B, 1008)}`` (float32)."""

    def __init__(self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        path = find_inception_weights(weights_path)
        from superdiff_protein.runs.safe_load import CheckpointError, safe_load

        try:
            sd = safe_load(path, "cpu")
        except CheckpointError as e:
            raise ImageMetricsError(f"InceptionV3 weights: {e}") from e
        if not isinstance(sd, Mapping) or "fc.weight" not in sd or tuple(sd["fc.weight"].shape) != (1008, 2048):
            raise ImageMetricsError(f"{path}: not torch-fidelity's InceptionV3 weights (expected fc.weight (1008, 2048))")
        cls = _fidelity_inception_class()
        try:   # the constructor re-reads the (now verified: plain tensors only) file and loads it strictly
            self.net = cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path))
        except RuntimeError as e:
            raise ImageMetricsError(f"{path}: InceptionV3 state dict does not match the network: {e}") from e
        self.net.to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        f, logits = self.net(images.to(self.device))
        return {"2048": f, "logits_unbiased": logits}


@torch.no_grad()
def compute_features(images, extractor: Extractor, keys: Sequence[str], batch_size: int = 64) -> dict[str, Tensor]:
    """Run the extractor over images (any :func:`load_images` source) in batches."""
    x = load_images(images)
    outs: dict[str, list[Tensor]] = {k: [] for k in keys}
    for i in range(0, x.shape[0], int(batch_size)):
        o = extractor(x[i:i + int(batch_size)])
        for k in keys:
            if k not in o:
                raise ImageMetricsError(f"feature extractor returned no {k!r} features (has {sorted(o)})")
            outs[k].append(o[k].detach().float().cpu())
    return {k: torch.cat(v) for k, v in outs.items()}


def compute_fid(images_a, images_b, extractor: Extractor | None = None, weights_path=None, batch_size: int = 64,
                device: str | torch.device = "cpu", feature_key: str = "2048") -> float:
    """FID between two image sets (directories, lists, uint8 tensors). ``images_b`` may also be a
    precomputed ``(mu, sigma)`` pair (e.g. CIFAR-10 train statistics)."""
    ext = extractor or InceptionFeatures(weights_path, device)
    mu1, s1 = feature_statistics(compute_features(images_a, ext, [feature_key], batch_size)[feature_key])
    if isinstance(images_b, tuple) and len(images_b) == 2 and isinstance(images_b[0], np.ndarray):
        mu2, s2 = images_b
    else:
        mu2, s2 = feature_statistics(compute_features(images_b, ext, [feature_key], batch_size)[feature_key])
    return frechet_distance(mu1, s1, mu2, s2)


def compute_inception_score(images, extractor: Extractor | None = None, weights_path=None, splits: int = 10,
                            batch_size: int = 64, device: str | torch.device = "cpu") -> tuple[float, float]:
    """Inception Score (mean, std over splits)."""
    ext = extractor or InceptionFeatures(weights_path, device)
    logits = compute_features(images, ext, ["logits_unbiased"], batch_size)["logits_unbiased"]
    return inception_score_from_logits(logits, splits=splits)


# ------------------------------------------------------------------------------------------ CLIP
class ClipScorer:
    """CLIP score with a transformers CLIP model from a local directory or the HF cache (no download)."""

    def __init__(self, model_path: str | os.PathLike, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPTokenizer

        from superdiff_protein.runs.safe_load import CheckpointError, pretrained_load_kwargs

        try:
            vetted = pretrained_load_kwargs(model_path)
        except CheckpointError as e:
            raise ImageMetricsError(f"CLIP weights: {e}") from e
        try:
            self.model = CLIPModel.from_pretrained(str(model_path), local_files_only=True, **vetted).to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(str(model_path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ImageMetricsError(
                f"CLIP model not available at {model_path!r} (local directory with config.json, weights and "
                f"tokenizer files, or a hub id already in the local cache; nothing is downloaded): {e}") from e
        self.device = torch.device(device)
        self.size = int(self.model.config.vision_config.image_size)
        mean, std = CLIP_MEAN, CLIP_STD
        pp = Path(str(model_path)) / "preprocessor_config.json"
        if pp.is_file():
            cfg = json.loads(pp.read_text())
            mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
        self.mean = torch.tensor(mean).reshape(1, 3, 1, 1)
        self.std = torch.tensor(std).reshape(1, 3, 1, 1)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> normalised (B, 3, S, S): shortest side to S (bicubic), centre crop."""
        from PIL import Image

        out = []
        for a in images.permute(0, 2, 3, 1).cpu().numpy():
            im = Image.fromarray(a)
            w, h = im.size
            sc = self.size / min(w, h)
            im = im.resize((max(self.size, round(w * sc)), max(self.size, round(h * sc))), Image.BICUBIC)
            w, h = im.size
            l, t = (w - self.size) // 2, (h - self.size) // 2
            im = im.crop((l, t, l + self.size, t + self.size))
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
        return (torch.stack(out) - self.mean) / self.std

    @torch.no_grad()
    def scores(self, images, prompts: Sequence[str] | str, batch_size: int = 32) -> Tensor:
        """Per-image CLIP scores (N,); one prompt for all images or one per image."""
        x = load_images(images)
        prompts = [prompts] * x.shape[0] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != x.shape[0]:
            raise ImageMetricsError(f"{len(prompts)} prompts for {x.shape[0]} images")
        res = []
        for i in range(0, x.shape[0], batch_size):
            px = self.preprocess(x[i:i + batch_size]).to(self.device)
            ids = self.tokenizer(prompts[i:i + batch_size], padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt").to(self.device)
            ie = self.model.get_image_features(pixel_values=px)
            te = self.model.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
            ie = getattr(ie, "pooler_output", ie)
            te = getattr(te, "pooler_output", te)
            cos = torch.nn.functional.cosine_similarity(ie.float(), te.float(), dim=-1)
            res.append((100.0 * cos.clamp(min=0)).cpu())
        return torch.cat(res)

    def __call__(self, images, prompts, batch_size: int = 32) -> float:
        """Mean CLIP score."""
        return float(self.scores(images, prompts, batch_size).mean())
