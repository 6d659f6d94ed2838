"""A diffusers-style pipeline for superposing Stable Diffusion prompts / UNets and pixel DDPMs.

>>> pipe = SuperDiffPipeline.from_pretrained("path/to/stable-diffusion-v1-4", device="cuda")
>>> out = pipe(["a cat", "a dog"], rule="and", num_inference_steps=1000, guidance_scale=7.5, batch_size=4)
>>> out.images[0].save("cat_and_dog.png"); out.kappa.shape       # (steps, batch, models)

Models are the product ``UNets x prompts`` (unet-major). Every prompt of one UNet is a view of one
:class:`~models.image.adapters.PromptGroup` (one batched UNet call per step, shared unconditional
branch). Sampling is :func:`superdiff_protein.core.sampler.superpose` with a kappa rule of
:mod:`superdiff_protein.core.kappa`; nothing image-specific happens inside the sampler.

Rules: ``and`` (``bias``), ``or`` (``bias``, ``temperature``), ``average`` (the
paper's average-of-scores baseline), ``joint`` (the joint-prompt baseline: the prompts joined by
``joint_joiner`` into one prompt, a single model) and ``single`` (``single_index``). The keywords are
``generate_backbones``' words; the old ``lift=`` / ``index=`` still work for one release (``DeprecationWarning``).

Densities under classifier-free guidance: ``density="unguided"`` (default) samples along the guided
drift and tracks each prompt's unguided conditional log-density; ``density="guided"`` tracks the guided
field (not a density; warns). See :mod:`models.image.adapters` and ``docs/images.md``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from superdiff_protein.core.kappa import make_rule
from superdiff_protein.core.sampler import SampleResult, SamplerConfig, superpose

from .adapters import (DENSITY_MODES, ImageModelError, PromptGroup, UNetScoreModel, encode_prompts,
                       latent_representation, pixel_representation, schedule_from_scheduler)

__all__ = ["SuperDiffPipeline", "SuperDiffOutput", "RULES", "lift_to_bias"]

RULES = ("and", "or", "average", "joint", "single")
_UNSET = object()


def _renamed_kwarg(old: str, old_val: Any, new: str, new_val: Any, default: Any) -> Any:
    """``new_val``, or ``old_val`` (with a ``DeprecationWarning``) when the deprecated keyword ``old`` is given;
    both at once is an error."""
    if old_val is _UNSET:
        return new_val
    if new_val is not default and new_val != default:
        raise ImageModelError(f"{old}= and {new}= name the same argument ({old} is deprecated); give {new}= only")
    import warnings

    warnings.warn(f"{old}= is deprecated and will be removed in the next release; use {new}= (same meaning)",
                  DeprecationWarning, stacklevel=3)
    return old_val


@dataclass
class SuperDiffOutput:
    """Images and traces. ``kappa`` (S, B, M), ``logq`` (S + 1, B, M) log-density estimates per model
    (of the latent / pixel state, relative to Lebesgue measure), ``t`` (S + 1,) the time grid."""

    images: list                     # PIL images (output_type="pil") or uint8 arrays (H, W, C)
    kappa: Tensor
    logq: Tensor
    t: Tensor
    model_names: list[str]
    rule: dict
    seeds: list[int]
    latents: Tensor | None = None    # final state x at t = min_t
    result: SampleResult | None = field(default=None, repr=False)
    density: str = "unguided"        # what the log-densities of guided prompts track (DENSITY_MODES)


def lift_to_bias(lift, m: int) -> list[float] | None:
    """The image bias shorthand -> the core rules' bias ``l``: a scalar for two models means ``l = [0, lift]``
    (AND drives ``log q_2 - log q_1`` to ``lift``; OR adds it to model 2's logit); a list gives ``l`` directly.
    (The pipeline's and CLI's keyword is ``bias``; the function keeps its name for callers.)"""
    if lift is None:
        return None
    if isinstance(lift, (int, float)):
        if float(lift) == 0.0:
            return None
        if m != 2:
            raise ImageModelError(f"a scalar bias needs exactly two models (got {m}); pass one value per model")
        return [0.0, float(lift)]
    vals = [float(v) for v in lift]
    if len(vals) != m:
        raise ImageModelError(f"bias has {len(vals)} values but there are {m} models")
    return vals


def seeds_from(generator, batch_size: int, seeds: Sequence[int] | None) -> list[int]:
    """Per-image seeds: explicit ``seeds``, else drawn from a torch generator (or one per image), else random."""
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if len(seeds) != batch_size:
            raise ImageModelError(f"{len(seeds)} seeds for batch_size {batch_size}")
        return seeds
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ImageModelError(f"{len(generator)} generators for batch_size {batch_size}")
        return [int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=g.device)) for g in generator]
    if generator is not None:
        return [int(v) for v in torch.randint(0, 2**31 - 1, (batch_size,), generator=generator, device=generator.device)]
    return [int(v) for v in torch.randint(0, 2**31 - 1, (batch_size,))]


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class SuperDiffPipeline:
    """Superposition of Stable Diffusion prompts / UNets, or of pixel-space DDPM UNets.

    Components: ``unets`` (one or a list; all ``UNet2DConditionModel`` with ``vae``, ``text_encoder``,
    ``tokenizer`` for SD, or all ``UNet2DModel`` for pixels), ``schedulers`` (one per UNet, or one
    shared; only their configs are read).
    """

    def __init__(self, unets, schedulers, vae=None, text_encoder=None, tokenizer=None,
                 unet_names: Sequence[str] | None = None):
        self.unets = list(unets) if isinstance(unets, (list, tuple)) else [unets]
        scheds = list(schedulers) if isinstance(schedulers, (list, tuple)) else [schedulers] * len(self.unets)
        if len(scheds) != len(self.unets):
            raise ImageModelError(f"{len(scheds)} schedulers for {len(self.unets)} UNets")
        self.schedulers = scheds
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.conditional = text_encoder is not None
        if self.conditional and (vae is None or tokenizer is None):
            raise ImageModelError("a text-conditional pipeline needs vae, text_encoder and tokenizer")
        self.unet_names = list(unet_names) if unet_names else [f"unet{i}" for i in range(len(self.unets))]
        self.schedules = [schedule_from_scheduler(s) for s in scheds]

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, paths: str | Sequence[str], torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, **kwargs) -> "SuperDiffPipeline":
        """Load from local diffusers model directories or hub ids (``model_index.json`` layout:
        ``unet/``, ``scheduler/`` and for SD ``vae/``, ``text_encoder/``, ``tokenizer/``). Several paths
        give several UNets (superposition of models); VAE / text encoder / tokenizer come from the first."""
        try:
            import diffusers
            from diffusers import DiffusionPipeline
        except ImportError as e:  # pragma: no cover
            raise ImageModelError("diffusers is needed: pip install diffusers") from e
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise ImageModelError("from_pretrained needs at least one model path or hub id")
        unets, scheds, names = [], [], []
        vae = te = tok = None
        for j, p in enumerate(paths):
            p = str(p)
            try:
                index = DiffusionPipeline.load_config(p, **kwargs)
            except Exception as e:  # noqa: BLE001
                raise ImageModelError(f"cannot read model_index.json of {p!r} (a local diffusers model directory "
                                      f"or a cached hub id): {e}") from e
            if "transformer" in index and "unet" not in index:
                raise ImageModelError(f"{p!r} is a transformer (DiT / flow-matching) pipeline; only UNet diffusion "
                                      "models with VP schedulers (SD 1.x/2.x, DDPM) can be superposed here")
            for need in ("unet", "scheduler"):
                if need not in index:
                    raise ImageModelError(f"{p!r}: model_index.json lists no {need!r} component")
            unet_cls = getattr(diffusers, index["unet"][1])
            from superdiff_protein.runs.safe_load import CheckpointError, pretrained_load_kwargs

            try:
                vetted = {sub: pretrained_load_kwargs(p, sub) for sub in ("unet", "text_encoder", "vae")}
            except CheckpointError as e:
                raise ImageModelError(f"model {p!r}: {e}") from e
            try:
                unet = unet_cls.from_pretrained(p, subfolder="unet", torch_dtype=torch_dtype, **vetted["unet"], **kwargs)
                scheds.append(diffusers.DDPMScheduler.load_config(p, subfolder="scheduler", **kwargs))
                if j == 0 and "text_encoder" in index and index["text_encoder"][0] is not None:
                    import transformers
                    te = getattr(transformers, index["text_encoder"][1]).from_pretrained(
                        p, subfolder="text_encoder", torch_dtype=torch_dtype, **vetted["text_encoder"], **kwargs)
                    tok = getattr(transformers, index["tokenizer"][1]).from_pretrained(p, subfolder="tokenizer", **kwargs)
                    vae = getattr(diffusers, index["vae"][1]).from_pretrained(
                        p, subfolder="vae", torch_dtype=torch_dtype, **vetted["vae"], **kwargs)
            except ImageModelError:
                raise
            except Exception as e:  # noqa: BLE001
                raise ImageModelError(f"cannot load the model at {p!r}: {e}") from e
            unets.append(unet)
            names.append(os.path.basename(os.path.normpath(p)) or f"unet{j}")
        if len(set(names)) != len(names):
            names = [f"{n}#{i}" for i, n in enumerate(names)]
        pipe = cls(unets, scheds, vae=vae, text_encoder=te, tokenizer=tok, unet_names=names)
        if device is not None:
            pipe.to(device)
        return pipe

    def to(self, device) -> "SuperDiffPipeline":
        for m in self.unets + [self.vae, self.text_encoder]:
            if m is not None:
                m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unets[0].parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    # ----------------------------------------------------------------------------- models
    def build_models(self, prompts: Sequence[str] | None, guidance_scale: float | Sequence[float] = 7.5,
                     negative_prompt: str = "", max_batch: int | None = None, density: str = "unguided") -> list:
        """The core models: views of one PromptGroup per UNet (SD) or one UNetScoreModel per UNet.
        ``density``: ``unguided`` (track each prompt's conditional density) or ``guided`` (warns)."""
        models = []
        if self.conditional:
            if not prompts:
                raise ImageModelError("this is a text-to-image pipeline: give at least one prompt")
            dev = self.device
            cond = encode_prompts(self.tokenizer, self.text_encoder, list(prompts), dev)
            uncond = encode_prompts(self.tokenizer, self.text_encoder, [negative_prompt or ""], dev)
            rep = latent_representation(self.vae)
            for j, unet in enumerate(self.unets):
                sched, pred = self.schedules[j]
                g = PromptGroup(unet, cond, uncond, guidance_scale, schedule=sched, prediction_type=pred,
                                representation=rep, max_batch=max_batch, density=density,
                                names=[f"{self.unet_names[j]}:{p}" if len(self.unets) > 1 else str(p) for p in prompts])
                models += g.views
        else:
            if prompts:
                raise ImageModelError("these are unconditional pixel models: prompts are not accepted")
            for j, unet in enumerate(self.unets):
                sched, pred = self.schedules[j]
                models.append(UNetScoreModel(unet, schedule=sched, prediction_type=pred, name=self.unet_names[j],
                                             representation=pixel_representation(unet.config.in_channels)))
        return models

    # ----------------------------------------------------------------------------- sampling
    def __call__(self, prompts: str | Sequence[str] | None = None, rule: str = "and", num_inference_steps: int = 50,
                 guidance_scale: float | Sequence[float] = 7.5, bias: float | Sequence[float] | None = 0.0,
                 batch_size: int | None = None, generator=None, height: int | None = None, width: int | None = None, *,
                 seeds: Sequence[int] | None = None, negative_prompt: str = "", temperature: float = 1.0,
                 single_index: int = 0, sampling: str = "sde", estimator: str = "ito", num_probes: int = 1,
                 and_correction: bool = True, noise_scale: float = 1.0, min_t: float | None = None,
                 time_grid: str = "uniform", state_dtype: torch.dtype = torch.float64,
                 final_denoise: bool = True, output_type: str = "pil", max_batch: int | None = None,
                 joint_joiner: str = " and ", callback: Callable[[int, int], None] | None = None,
                 density: str = "unguided", lift: Any = _UNSET, index: Any = _UNSET) -> SuperDiffOutput:
        """Sample ``batch_size`` images from the superposition (module docstring). ``and_correction``
        (the core's exact Itô correction for AND, one VJP per model and step) is on by default, as for
        proteins; ``and_correction=False`` is the paper's AND (the official image runs).
        ``bias``: the AND/OR bias ``l`` (a scalar with two models means ``l = [0, bias]``); ``single_index``:
        the model of ``rule="single"``; ``lift`` / ``index`` are their deprecated spellings (one release).
        ``estimator="hutchinson"`` with ``sampling="ode"`` gives divergence-based densities.
        ``density``: with classifier-free guidance, ``"unguided"`` (default) tracks each prompt's own
        conditional log-density along the guided path; ``"guided"`` tracks the guided field, which is not
        the score of any density (``GuidedDensityWarning``)."""
        bias = _renamed_kwarg("lift", lift, "bias", bias, 0.0)
        single_index = _renamed_kwarg("index", index, "single_index", single_index, 0)
        if isinstance(prompts, str):
            prompts = [prompts]
        if density not in DENSITY_MODES:
            raise ImageModelError(f"density must be one of {DENSITY_MODES}, got {density!r}")
        r = str(rule).lower()
        if r not in RULES:
            raise ImageModelError(f"unknown rule {rule!r}; choose one of {RULES}")
        if batch_size is None:      # default: one image per seed, else 1
            batch_size = len(seeds) if seeds is not None else 1
        if int(batch_size) < 1:
            raise ImageModelError(f"batch_size must be >= 1, got {batch_size}")
        if r == "joint":
            if not self.conditional:
                raise ImageModelError("the joint-prompt baseline needs a text-to-image pipeline")
            prompts = [joint_joiner.join(prompts or [])]
        models = self.build_models(prompts, guidance_scale, negative_prompt, max_batch, density)
        # the bias shorthand on the core rules: scalar -> [0, bias] (AND, OR); "joint" is one model (the joined prompt)
        bias = lift_to_bias(bias, len(models)) if r in ("and", "or") else None
        kappa_rule = make_rule("single" if r == "joint" else r, temperature=temperature, bias=bias,
                               index=0 if r == "joint" else single_index)
        seeds = seeds_from(generator, int(batch_size), seeds)
        shape = self._state_shape(height, width)
        space = models[0].group.space if hasattr(models[0], "group") else models[0].space
        n = self.schedules[0][0].n
        cfg = SamplerConfig(num_steps=int(num_inference_steps), min_t=float(min_t if min_t is not None else 1.0 / n),
                            noise_scale=noise_scale, sampling=sampling, estimator=estimator, num_probes=num_probes,
                            dtype=state_dtype, device=self.device, time_grid=time_grid, and_correction=and_correction)
        try:
            res = superpose(space, models, kappa_rule, cfg, seeds, {"x": shape}, callback=callback)
            x = res.x["x"]
            if final_denoise:
                x = self._tweedie(models, x, res, cfg)
        finally:
            for m in models:
                if hasattr(m, "group"):
                    m.group.clear_cache()
        images = self.decode(x)
        u8 = to_uint8(images)
        if output_type == "pil":
            from PIL import Image
            imgs = [Image.fromarray(a) for a in u8]
        elif output_type in ("np", "numpy"):
            imgs = list(u8)
        else:
            raise ImageModelError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        return SuperDiffOutput(images=imgs, kappa=res.kappa_trace[:, :, 0].cpu(), logq=res.logq_trace[:, :, 0].cpu(),
                               t=res.t.cpu(), model_names=[m.name for m in models], rule=kappa_rule.describe(),
                               seeds=seeds, latents=res.x["x"], result=res, density=density)

    def _state_shape(self, height, width) -> tuple[int, int, int]:
        u = self.unets[0].config
        f = self.vae_scale_factor
        ss = u.sample_size if isinstance(u.sample_size, int) else u.sample_size[0]
        h = int(height) if height else ss * f
        w = int(width) if width else ss * f
        if h % f or w % f:
            raise ImageModelError(f"height and width must be multiples of {f} (the VAE's downsampling), got {h}x{w}")
        return (int(u.in_channels), h // f, w // f)

    @torch.no_grad()
    def _tweedie(self, models, x: Tensor, res: SampleResult, cfg: SamplerConfig) -> Tensor:
        """E[x_0 | x_t] at the last time with the last step's kappa: (x + sigma^2 sum kappa_i s_i) / alpha."""
        t = res.t[-1].expand(x.shape[0]).to(x.device)
        kappa = res.kappa_trace[-1, :, 0].to(x.dtype)                       # (B, M)
        mix = torch.zeros_like(x)
        for i, m in enumerate(models):
            mix = mix + kappa[:, i].reshape(-1, 1, 1, 1) * m({"x": x}, t, None, None).scores["x"].to(x.dtype)
        sched = self.schedules[0][0]
        a = sched.alpha(t.double()).to(x.dtype).reshape(-1, 1, 1, 1)
        s2 = sched.sigma(t.double()).to(x.dtype).reshape(-1, 1, 1, 1) ** 2
        return (x + s2 * mix) / a

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """State -> images in [-1, 1] (VAE decode of ``x / scaling_factor`` for latents)."""
        if self.vae is None:
            return x.float()
        sf = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        dt = next(self.vae.parameters()).dtype
        out = self.vae.decode((x / sf).to(dt), return_dict=False)[0]
        return out.float()

    def describe(self) -> dict[str, Any]:
        return {"unets": self.unet_names, "conditional": self.conditional,
                "schedules": [s.signature() for s, _ in self.schedules],
                "prediction_types": [p for _, p in self.schedules]}


def save_traces(out: SuperDiffOutput, path: str) -> None:
    """Kappa / log-density traces as JSON (atomic write)."""
    data = {"t": out.t.tolist(), "kappa": out.kappa.tolist(), "logq": out.logq.tolist(),
            "model_names": out.model_names, "rule": out.rule, "seeds": out.seeds, "density": out.density}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)
