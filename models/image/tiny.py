"""Tiny random Stable-Diffusion / DDPM components (tests, smoke runs, CLI demos without weights).

Real SD / CIFAR / CLIP weights cannot be downloaded here, so every code path is exercised with these
randomly initialised miniatures of the real architectures (same classes, tiny widths).
"""
from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch

__all__ = ["write_tiny_clip_tokenizer", "tiny_sd_components", "tiny_ddpm_components", "save_components"]

TINY_WORDS = ["a", "cat", "dog", "photo", "of", "and", "red", "blue", "car", "tree"]


def write_tiny_clip_tokenizer(directory: str | os.PathLike, max_length: int = 16):
    """Write vocab.json / merges.txt of a tiny byte-level BPE CLIP vocabulary and load it with
    ``CLIPTokenizer.from_pretrained``: letters, letters with the end-of-word marker, and whole-word
    merges for :data:`TINY_WORDS`."""
    from transformers import CLIPTokenizer

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>"] + list(string.ascii_lowercase) + \
            [c + "</w>" for c in string.ascii_lowercase]:
        vocab.setdefault(tok, len(vocab))
    merges = []
    for w in TINY_WORDS:
        if len(w) < 2:
            continue
        cur = w[0]
        for i, c in enumerate(w[1:], 1):
            nxt = c + ("</w>" if i == len(w) - 1 else "")
            merges.append(f"{cur} {nxt}")
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer.from_pretrained(str(d), model_max_length=max_length)


def tiny_sd_components(tmpdir: str | os.PathLike, seed: int = 0, prediction_type: str = "epsilon",
                       sample_size: int = 8, cross_dim: int = 16) -> dict:
    """Tiny UNet2DConditionModel (4 latent channels, ``sample_size`` latents), AutoencoderKL (x2
    down-sampling), CLIPTextModel + CLIPTokenizer and an SD-style DDPMScheduler (scaled_linear)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = write_tiny_clip_tokenizer(Path(tmpdir) / "tiny_tokenizer")
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=cross_dim, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
                                attention_head_dim=2, norm_num_groups=4).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=2 * sample_size).eval()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type=prediction_type, clip_sample=False)
    return {"unet": unet, "vae": vae, "text_encoder": te, "tokenizer": tok, "scheduler": sched}


def tiny_ddpm_components(seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 8,
                         num_train_timesteps: int = 1000) -> dict:
    """Tiny pixel UNet2DModel (3 channels) and a linear-beta DDPMScheduler (CIFAR-style DDPM)."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4).eval()
    sched = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear", prediction_type=prediction_type)
    return {"unet": unet, "scheduler": sched}


def save_components(directory: str | os.PathLike, components: dict) -> Path:
    """Save components in the diffusers model-directory layout (``model_index.json`` + subfolders)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline" if "text_encoder" in components else "DDPMPipeline",
             "_diffusers_version": __import__("diffusers").__version__}
    for name, comp in components.items():
        lib = "transformers" if type(comp).__module__.startswith("transformers") else "diffusers"
        comp.save_pretrained(str(d / name))
        index[name] = [lib, type(comp).__name__]
    (d / "model_index.json").write_text(json.dumps(index, indent=2))
    return d
