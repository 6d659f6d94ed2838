"""A diffusers-style pipeline for superposing Stable Diffusion prompts / UNets and pixel DDPMs.

>>> pipe = SuperDiffPipeline.from_pretrained("path/to/stable-diffusion-v1-4", device="cuda")
>>> out = pipe(["a cat", "a dog"], rule="and", num_inference_steps=1000, guidance_scale=7.5, batch_size=4)
>>> out.images[0].save("cat_and_dog.png"); out.kappa.shape       # (steps, batch, models)

Models are the product ``UNets x prompts`` (unet-major). Every prompt of one UNet is a view of one
:class:`~models.image.adapters.PromptGroup` (one batched UNet call per step, shared unconditional
branch). Sampling is :func:`superdiff_protein.core.sampler.superpose` with a kappa rule of
:mod:`superdiff_protein.core.kappa`; nothing image-specific happens inside the sampler.

Rules: ``and`` (``bias``), ``or`` (``bias``, ``temperature``), ``average`` (the
paper's average-of-scores baseline; ``weights``), ``joint`` (the joint-prompt baseline: the prompts joined by
``joint_joiner`` into one prompt, a single model) and ``single`` (``single_index``). The keywords are
``generate_backbones``' words; the old ``lift=`` / ``index=`` still work for one release (``DeprecationWarning``).

Feynman–Kac rules (:mod:`superdiff_protein.core.fkc`; importance weights, optional SMC resampling in groups of
images, ``smc=``): ``product`` (``prod_i q_i^{w_i}``, ``weights``), ``anneal`` (``q^beta``; ``anneal_of``) and
``geometric`` (``q_1^{1-gamma} q_2^gamma``; with one prompt the models are ``[unconditional, prompt]``: classifier-
free guidance with ``gamma = w`` as an exact target). They combine the prompts' own conditional scores, so they
run without CFG (``guidance_scale`` defaults to 1 for them). ``docs/images.md``, "Feynman–Kac rules".

Densities under classifier-free guidance: ``density="unguided"`` (default) samples along the guided
drift and tracks each prompt's unguided conditional log-density; ``density="guided"`` tracks the guided
field (not a density; warns). See :mod:`models.image.adapters` and ``docs/images.md``.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from superdiff_protein.core.fkc import FKC_RULES, AnnealRule, GeometricRule, ImproperTargetWarning, ProductRule
from superdiff_protein.core.kappa import make_rule
from superdiff_protein.core.sampler import SampleResult, SamplerConfig, superpose
from superdiff_protein.core.smc import SMCConfig

from .adapters import (DENSITY_MODES, ImageModelError, PromptGroup, UNetScoreModel, encode_prompts,
                       latent_representation, pixel_representation, schedule_from_scheduler)

__all__ = ["SuperDiffPipeline", "SuperDiffOutput", "RULES", "ANNEAL_OF", "DEFAULT_GUIDANCE", "lift_to_bias",
           "check_fkc_options", "fkc_rule"]

RULES = ("and", "or", "average", "joint", "single") + FKC_RULES
#: what ``rule="anneal"`` raises to the power beta: ``auto`` (one model: it; several: the OR mixture),
#: ``single`` (model ``single_index``), ``product`` (``prod q_i^{w_i}``), ``or`` (the OR mixture, weights e^bias)
ANNEAL_OF = ("auto", "single", "product", "or")
#: classifier-free guidance of the SuperDiff rules when ``guidance_scale`` is not given (the FKC rules: 1)
DEFAULT_GUIDANCE = 7.5
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
    # Feynman–Kac rules only (else None): per image its log importance weight at the end (0 right after a
    # resampling), its t = 1 ancestor (batch index) and its group; per step and group ESS / K and whether the
    # group resampled; per group the estimate of log(Z_end / Z_start)
    log_weight: Tensor | None = None     # (B,)
    ancestor: Tensor | None = None       # (B,) long
    group: Tensor | None = None          # (B,) long
    ess: Tensor | None = None            # (S, G)
    resampled: Tensor | None = None      # (S, G) bool
    log_z: Tensor | None = None          # (G,)

    @property
    def importance_weights(self) -> Tensor | None:
        """(B,) self-normalised weights within each group (sum 1 per group); None without FKC weights."""
        if self.log_weight is None:
            return None
        lw, g = self.log_weight.double(), self.group
        out = torch.empty_like(lw)
        for k in torch.unique(g).tolist():
            sel = g == k
            out[sel] = torch.softmax(lw[sel], 0)
        return out

    def fkc_record(self) -> dict[str, Any]:
        """The weights as JSON-ready lists (empty for the SuperDiff rules): traces.json / summary.json."""
        if self.log_weight is None:
            return {}
        return {"log_weight": self.log_weight.tolist(), "importance_weight": self.importance_weights.tolist(),
                "ancestor": self.ancestor.tolist(), "group": self.group.tolist(), "log_z": self.log_z.tolist(),
                "ess": self.ess.tolist(), "resampled": self.resampled.tolist()}


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


def check_fkc_options(rule: str, batch_size: int, *, beta: float = 2.0, gamma: float = 0.5, weights=None,
                      anneal_of: str = "auto", smc: SMCConfig | Mapping[str, Any] | None = None,
                      guidance_scale: float | Sequence[float] | None = None) -> SMCConfig | None:
    """Check the Feynman–Kac options (before any model is loaded) and return the run's SMC configuration (None
    for the SuperDiff rules). The checks are the core's own: the rule constructors (``beta`` > 0, ``gamma``
    finite, ``weights`` finite with a positive sum) and :meth:`SMCConfig.validate`; here only what needs the
    number of images (``smc.group_size`` must divide it: each group holds whole images) and the guidance (the FKC
    rules combine the prompts' own conditional scores: ``guidance_scale`` unset or 1)."""
    r = str(rule).lower()
    if anneal_of not in ANNEAL_OF:
        raise ImageModelError(f"anneal_of must be one of {', '.join(ANNEAL_OF)}, got {anneal_of!r}")
    try:
        AnnealRule(beta=beta)
        with warnings.catch_warnings():          # the run's own rule warns (once) about gamma outside [0, 1]
            warnings.simplefilter("ignore", ImproperTargetWarning)
            GeometricRule(gamma=gamma)
        if weights is not None and r in ("product", "anneal"):
            ProductRule(weights=weights)
        if smc is not None and not isinstance(smc, SMCConfig):
            unknown = set(smc) - set(SMCConfig.__dataclass_fields__)
            if unknown:
                raise ImageModelError(f"smc: unknown option(s) {sorted(unknown)} (valid: "
                                      f"{', '.join(SMCConfig.__dataclass_fields__)})")
        cfg = smc if isinstance(smc, SMCConfig) or smc is None else SMCConfig(**dict(smc))
        if cfg is not None:
            cfg.validate()
    except (ValueError, TypeError) as e:
        raise ImageModelError(str(e)) from None
    if r not in FKC_RULES:
        if cfg is not None and cfg != SMCConfig():
            raise ImageModelError(f"smc options apply to the Feynman-Kac rules ({', '.join(FKC_RULES)}) only, "
                                  f"not rule={r}")
        return None
    gs = [] if guidance_scale is None else guidance_scale if isinstance(guidance_scale, (list, tuple)) else [guidance_scale]
    if any(float(w) != 1.0 for w in gs):
        raise ImageModelError(f"rule={r} combines the prompts' own conditional densities, without classifier-free "
                              "guidance: leave guidance_scale unset (or 1). Guidance as an exact target is "
                              "rule=geometric with one prompt and gamma=w (docs/images.md)")
    cfg = cfg or SMCConfig()
    if int(batch_size) % int(cfg.group_size):
        raise ImageModelError(f"smc.group_size={cfg.group_size} does not divide the number of images ({batch_size}): "
                              "every group holds group_size images (make batch_size a multiple of it)")
    return cfg


def fkc_rule(rule: str, num_models: int, *, beta: float = 2.0, gamma: float = 0.5, weights=None,
             anneal_of: str = "auto", single_index: int = 0, bias=None):
    """The Feynman–Kac rule (core/fkc.py) of ``rule`` = product | anneal | geometric for ``num_models`` models.
    ``anneal_of``: :data:`ANNEAL_OF`; ``bias`` (the image shorthand, :func:`lift_to_bias`) weighs the OR mixture
    of ``anneal_of="or"``."""
    r, m = str(rule).lower(), int(num_models)
    if weights is not None and len(list(weights)) != m:
        raise ImageModelError(f"weights has {len(list(weights))} values but there are {m} models")
    if r == "product":
        return ProductRule(weights=weights)
    if r == "geometric":
        if m != 2:
            raise ImageModelError(f"geometric needs exactly 2 models (q_1^(1-gamma) q_2^gamma), got {m}: give two "
                                  "prompts, or one prompt (then the models are [unconditional, prompt])")
        return GeometricRule(gamma=gamma)
    if r != "anneal":
        raise ImageModelError(f"{rule!r} is not a Feynman-Kac rule ({', '.join(FKC_RULES)})")
    of = ("single" if m == 1 else "or") if anneal_of == "auto" else anneal_of
    if of == "single":
        if not 0 <= int(single_index) < m:
            raise ImageModelError(f"single_index {single_index} out of range for {m} model(s)")
        return AnnealRule(beta=beta, index=int(single_index))
    if of == "product":
        return AnnealRule(beta=beta, weights=weights or [1.0] * m)
    return AnnealRule(beta=beta, of="or", bias=lift_to_bias(bias, m))


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
                 guidance_scale: float | Sequence[float] | None = None, bias: float | Sequence[float] | None = 0.0,
                 batch_size: int | None = None, generator=None, height: int | None = None, width: int | None = None, *,
                 seeds: Sequence[int] | None = None, negative_prompt: str = "", temperature: float = 1.0,
                 single_index: int = 0, sampling: str = "sde", estimator: str = "ito", num_probes: int = 1,
                 and_correction: bool = True, noise_scale: float = 1.0, min_t: float | None = None,
                 time_grid: str = "uniform", state_dtype: torch.dtype = torch.float64,
                 final_denoise: bool = True, output_type: str = "pil", max_batch: int | None = None,
                 joint_joiner: str = " and ", callback: Callable[[int, int], None] | None = None,
                 density: str = "unguided", weights: Sequence[float] | None = None, beta: float = 2.0,
                 gamma: float = 0.5, anneal_of: str = "auto", smc: SMCConfig | Mapping[str, Any] | None = None,
                 lift: Any = _UNSET, index: Any = _UNSET) -> SuperDiffOutput:
        """Sample ``batch_size`` images from the superposition (module docstring). ``and_correction``
        (the core's exact Itô correction for AND, one VJP per model and step) is on by default, as for
        proteins; ``and_correction=False`` is the paper's AND (the official image runs).
        ``bias``: the AND/OR bias ``l`` (a scalar with two models means ``l = [0, bias]``); ``single_index``:
        the model of ``rule="single"``; ``lift`` / ``index`` are their deprecated spellings (one release).
        ``estimator="hutchinson"`` with ``sampling="ode"`` gives divergence-based densities.
        ``density``: with classifier-free guidance, ``"unguided"`` (default) tracks each prompt's own
        conditional log-density along the guided path; ``"guided"`` tracks the guided field, which is not
        the score of any density (``GuidedDensityWarning``). ``guidance_scale``: default 7.5 for the SuperDiff
        rules, 1 (no guidance) for the Feynman–Kac rules, which refuse any other value.

        Feynman–Kac rules (``rule="product" | "anneal" | "geometric"``): ``weights`` (product / anneal of a
        product: the exponents; average: the fixed kappa), ``beta``, ``gamma``, ``anneal_of`` (:data:`ANNEAL_OF`)
        and ``smc`` (an :class:`SMCConfig` or a dict of its fields: ``group_size`` images per group, ``resample``,
        ``ess_threshold``, ``t_max``, ``t_min``; default: groups of 1, weights only). The output then carries
        ``log_weight``, ``ancestor``, ``group``, ``ess``, ``resampled`` and ``log_z``."""
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
        fkc = r in FKC_RULES
        smc_cfg = check_fkc_options(r, int(batch_size), beta=beta, gamma=gamma, weights=weights, anneal_of=anneal_of,
                                    smc=smc, guidance_scale=guidance_scale)
        if guidance_scale is None:
            guidance_scale = 1.0 if fkc else DEFAULT_GUIDANCE
        # CFG as a geometric average: one prompt of one SD UNet -> models [unconditional, prompt]
        uncond_first = fkc and r == "geometric" and self.conditional and len(self.unets) == 1 and \
            len(prompts or []) == 1
        if uncond_first:
            prompts = [negative_prompt or "", prompts[0]]
        if r == "joint":
            if not self.conditional:
                raise ImageModelError("the joint-prompt baseline needs a text-to-image pipeline")
            prompts = [joint_joiner.join(prompts or [])]
        models = self.build_models(prompts, guidance_scale, negative_prompt, max_batch, density)
        if uncond_first:
            models[0].name = f"(negative) {negative_prompt}" if negative_prompt else "(unconditional)"
        if fkc:
            kappa_rule = fkc_rule(r, len(models), beta=beta, gamma=gamma, weights=weights, anneal_of=anneal_of,
                                  single_index=single_index, bias=bias)
        else:
            if r == "average" and weights is not None and len(list(weights)) != len(models):
                raise ImageModelError(f"weights has {len(list(weights))} values but there are {len(models)} models")
            # the bias shorthand on the core rules: scalar -> [0, bias] (AND, OR); "joint" is one model (the joined prompt)
            bias = lift_to_bias(bias, len(models)) if r in ("and", "or") else None
            kappa_rule = make_rule("single" if r == "joint" else r, temperature=temperature, bias=bias,
                                   index=0 if r == "joint" else single_index,
                                   weights=weights if r == "average" else None)
        seeds = seeds_from(generator, int(batch_size), seeds)
        shape = self._state_shape(height, width)
        space = models[0].group.space if hasattr(models[0], "group") else models[0].space
        n = self.schedules[0][0].n
        cfg = SamplerConfig(num_steps=int(num_inference_steps), min_t=float(min_t if min_t is not None else 1.0 / n),
                            noise_scale=noise_scale, sampling=sampling, estimator=estimator, num_probes=num_probes,
                            dtype=state_dtype, device=self.device, time_grid=time_grid, and_correction=and_correction)
        try:
            res = superpose(space, models, kappa_rule, cfg, seeds, {"x": shape}, callback=callback, smc=smc_cfg)
            x = res.x["x"]
            if final_denoise:
                kappa = res.kappa_trace[-1, :, 0]
                if fkc:     # the sampler scaled the target's exponents b by c / c_s = (1 + eta^2) / (2 c_s)
                    kappa = kappa * (2.0 * cfg.score_coeff / (1.0 + cfg.eta ** 2))
                x = self._tweedie(models, x, res, kappa)
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
        out = SuperDiffOutput(images=imgs, kappa=res.kappa_trace[:, :, 0].cpu(), logq=res.logq_trace[:, :, 0].cpu(),
                              t=res.t.cpu(), model_names=[m.name for m in models], rule=kappa_rule.describe(),
                              seeds=seeds, latents=res.x["x"], result=res, density=density)
        if res.log_weight is not None:
            out.log_weight, out.ancestor, out.group = res.log_weight.cpu(), res.ancestor.cpu(), res.group.cpu()
            out.ess, out.resampled, out.log_z = res.ess_trace.cpu(), res.resampled.cpu(), res.log_z.cpu()
            out.rule = {**out.rule, "smc": {k: getattr(smc_cfg, k) for k in smc_cfg.__dataclass_fields__}}
        return out

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
    def _tweedie(self, models, x: Tensor, res: SampleResult, kappa: Tensor) -> Tensor:
        """E[x_0 | x_t] at the last time with the last step's weights ``kappa`` (B, M) (FKC rules: the target's
        exponents b, whose score is sum b_i s_i): (x + sigma^2 sum kappa_i s_i) / alpha."""
        t = res.t[-1].expand(x.shape[0]).to(x.device)
        kappa = kappa.to(device=x.device, dtype=x.dtype)                    # (B, M)
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
            "model_names": out.model_names, "rule": out.rule, "seeds": out.seeds, "density": out.density,
            **out.fkc_record()}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)
