"""diffusers image models as score models of the superposition core.

Forward process
    diffusers' DDPM-family schedulers define ``x_i = sqrt(abar_i) x_0 + sqrt(1 - abar_i) eps`` for the
    integer timestep ``i = 0..N-1`` (``abar = alphas_cumprod``). The core sees this as the continuous
    VP-SDE of :class:`~superdiff_protein.core.spaces.DiscreteVPSchedule`, where timestep ``i`` sits at
    ``t = (i + 1) / N`` and ``log abar`` is linear in between. The network is therefore called at the
    (fractional) timestep ``t N - 1`` -- the exact inverse of ``DiscreteVPSchedule.timestep_to_t``;
    diffusers' sinusoidal timestep embeddings accept fractional timesteps.

Network output -> score, with ``alpha = sqrt(abar(t))``, ``sigma = sqrt(1 - abar(t))``:
    * ``epsilon``:      ``eps = out``
    * ``v_prediction``: ``v = alpha eps - sigma x_0``  =>  ``eps = alpha v + sigma x_t``
    * ``sample``:       ``x_0 = out``                  =>  ``eps = (x_t - alpha x_0) / sigma``
    and ``score = -eps / sigma``.

Flow-matching schedulers (``x_t = (1 - t) x_0 + t eps``) are not variance preserving; they are refused
with :class:`ImageModelError` rather than silently mis-sampled (the paper's code fails with NaN kappa at
sigma = 1 on them).

Stable Diffusion prompts
    :class:`PromptGroup` turns one ``UNet2DConditionModel`` and P prompt embeddings into P core models
    (``group.views``). Each prompt's score is classifier-free guided against ONE shared unconditional
    branch, and all P + 1 branches are evaluated in one batched UNet call per step: the first view
    called at a given ``(x, t)`` evaluates the whole group and caches the result; the other views read
    the cache. When the sampler needs Jacobian-vector products (Hutchinson estimator, AND noise
    correction), the group evaluates once with a graph and each view routes its VJPs into that graph
    through :class:`_RouteGrad`, so the core's per-model autograd calls stay exact.

Guided densities
    A guided field ``s_u + w (s_c - s_u)`` (``w != 1``) is not the score of any forward-process
    marginal, and the Itô estimator's ``|s|^2`` term is not linear in ``s``, so log-densities tracked
    with it are not the log of any density. By default (``density="unguided"``) every view drives the
    sampler with its guided score but hands the core its **unguided conditional** score ``s_c`` as
    ``ModelOutput.density_scores``: the tracked quantity is ``log q_t(x_t | prompt)`` of the model's own
    conditional marginal along the guided path (Theorem 1 holds along any path), as in the paper's
    official Stable Diffusion code. ``density="guided"`` (the old behaviour) tracks the guided field
    and warns (:class:`GuidedDensityWarning`).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from superdiff_protein.errors import UserError
from superdiff_protein.core.protocol import ModelOutput
from superdiff_protein.core.spaces import DiscreteVPSchedule, EuclideanVPSpace, ProductSpace

__all__ = [
    "ImageModelError",
    "ImageSpace",
    "image_space",
    "schedule_from_scheduler",
    "t_to_timestep",
    "model_output_to_eps",
    "UNetScoreModel",
    "PromptGroup",
    "PromptView",
    "encode_prompts",
    "GuidedDensityWarning",
    "DENSITY_MODES",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# what the log-densities of classifier-free-guided prompts are tracked with (module docstring)
DENSITY_MODES = ("unguided", "guided")


class GuidedDensityWarning(UserWarning):
    """Log-densities tracked with classifier-free-guided scores are not log-densities of any model."""


class ImageModelError(ValueError, UserError):
    """Bad image model / scheduler / prompt input (clear message, no raw traceback in CLIs; exit code 2)."""


# --------------------------------------------------------------------------------------------- space
class ImageSpace(EuclideanVPSpace):
    """R^{C x H x W} under a VP-SDE; the signature also names the representation (pixels in [-1, 1] or
    the latents of a given VAE), so models living in different latent spaces are never superposed."""

    def __init__(self, schedule: DiscreteVPSchedule, representation: Mapping[str, Any] | None = None,
                 name: str = "x"):
        super().__init__(schedule, event_ndim=3, site_ndim=0, center=False, name=name)
        self.representation = dict(representation or {"kind": "pixel", "range": [-1.0, 1.0]})

    def signature(self) -> dict:
        sig = super().signature()
        sig["representation"] = self.representation
        return sig


def image_space(schedule: DiscreteVPSchedule, representation: Mapping[str, Any] | None = None) -> ProductSpace:
    """The one-component product space ``{"x": ImageSpace}`` used by every image model."""
    return ProductSpace({"x": ImageSpace(schedule, representation)})


def pixel_representation(channels: int) -> dict:
    return {"kind": "pixel", "channels": int(channels), "range": [-1.0, 1.0]}


def latent_representation(vae) -> dict:
    """Latent-space descriptor of an ``AutoencoderKL`` (channels, scaling factor, a weight fingerprint)."""
    cfg = vae.config
    w = None
    for p in vae.parameters():   # a cheap fingerprint: first parameter's sum (equal VAEs -> equal value)
        w = round(float(p.detach().double().sum()), 6)
        break
    return {"kind": "vae_latent", "channels": int(cfg.latent_channels),
            "scaling_factor": float(getattr(cfg, "scaling_factor", 0.18215)), "vae_fingerprint": w}


# --------------------------------------------------------------------------------------------- schedule
def _scheduler_config(scheduler) -> tuple[dict, str]:
    if scheduler is None:
        raise ImageModelError("no scheduler given: the forward process is read from the diffusers scheduler config")
    if isinstance(scheduler, Mapping):
        cfg = dict(scheduler)
        return cfg, str(cfg.get("_class_name", ""))
    cfg = getattr(scheduler, "config", None)
    if cfg is None:
        raise ImageModelError(f"cannot read a scheduler config from {type(scheduler).__name__}")
    return dict(cfg), type(scheduler).__name__


def schedule_from_scheduler(scheduler) -> tuple[DiscreteVPSchedule, str]:
    """``(DiscreteVPSchedule, prediction_type)`` from a diffusers scheduler object or its config dict.

    ``alphas_cumprod`` is computed by diffusers' own ``DDPMScheduler`` from the config (``beta_schedule``,
    ``trained_betas``, ``rescale_betas_zero_snr``...), so it matches what the model was trained with.
    Flow-matching schedulers are refused.
    """
    cfg, cls_name = _scheduler_config(scheduler)
    pred = str(cfg.get("prediction_type", "epsilon") or "epsilon")
    if "flowmatch" in cls_name.lower() or "flow" in pred.lower() or "use_dynamic_shifting" in cfg:
        raise ImageModelError(
            f"scheduler {cls_name or '(config)'} with prediction_type={pred!r} is a flow-matching model "
            "(x_t = (1 - t) x_0 + t eps): it is not a variance-preserving diffusion and its score is not "
            "defined at t = 1, so it cannot be superposed by this core. Use a DDPM/DDIM/PNDM/Euler-family "
            "(epsilon, v_prediction or sample) model.")
    if pred not in PREDICTION_TYPES:
        raise ImageModelError(f"unsupported prediction_type {pred!r}; supported: {PREDICTION_TYPES}")
    ac = getattr(scheduler, "alphas_cumprod", None) if not isinstance(scheduler, Mapping) else None
    if ac is None:
        try:
            from diffusers import DDPMScheduler
        except ImportError as e:  # pragma: no cover - exercised only without diffusers
            raise ImageModelError("diffusers is needed for image models: pip install diffusers") from e
        keep = {k: v for k, v in cfg.items() if not k.startswith("_")}
        try:
            ac = DDPMScheduler.from_config(keep).alphas_cumprod
        except Exception as e:  # noqa: BLE001 - diffusers raises various types for bad configs
            raise ImageModelError(f"cannot build alphas_cumprod from scheduler config: {e}") from e
    ac = torch.as_tensor(ac, dtype=torch.float64)
    try:
        sched = DiscreteVPSchedule(ac.clamp(min=1e-12))
    except ValueError as e:
        raise ImageModelError(f"invalid alphas_cumprod from scheduler config: {e}") from e
    return sched, pred


def t_to_timestep(t: Tensor, schedule: DiscreteVPSchedule) -> Tensor:
    """Continuous ``t`` -> fractional diffusers timestep ``t N - 1`` (inverse of ``timestep_to_t``),
    clamped to ``[0, N - 1]`` (below ``t = 1/N`` the network is queried at its smallest timestep)."""
    return (t.to(torch.float64) * schedule.n - 1.0).clamp(0.0, schedule.n - 1.0)


def model_output_to_eps(out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """Network output -> predicted noise (module docstring); ``alpha``/``sigma`` broadcast against x."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return alpha * out + sigma * x
    if prediction_type == "sample":
        return (x - alpha * out) / sigma
    raise ImageModelError(f"unsupported prediction_type {prediction_type!r}; supported: {PREDICTION_TYPES}")


def _coeffs(schedule: DiscreteVPSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    shape = (-1,) + (1,) * (like.dim() - 1)
    a = schedule.alpha(t.to(torch.float64)).to(like.dtype).reshape(shape)
    s = schedule.sigma(t.to(torch.float64)).to(like.dtype).reshape(shape)
    return a, s


def _module_dtype(m) -> torch.dtype:
    d = getattr(m, "dtype", None)
    if isinstance(d, torch.dtype):
        return d
    for p in m.parameters():
        return p.dtype
    return torch.float32


def _unet_forward(unet, sample: Tensor, timesteps: Tensor, **kw) -> Tensor:
    out = unet(sample, timesteps, return_dict=False, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_state(x: Mapping[str, Tensor], mask) -> Tensor:
    if mask is not None:
        raise ImageModelError("image models take no residue mask (mask must be None)")
    if "x" not in x:
        raise ImageModelError(f"image models expect the state component 'x', got {sorted(x)}")
    xx = x["x"]
    if xx.dim() != 4:
        raise ImageModelError(f"image state must be (B, C, H, W), got shape {tuple(xx.shape)}")
    return xx


# --------------------------------------------------------------------------------------------- pixel UNet
class UNetScoreModel:
    """A diffusers ``UNet2DModel`` (CIFAR-style DDPM, pixels in [-1, 1]) as a core score model.

    Also accepts any module with the same call convention (``unet(sample, timestep, return_dict=False)``),
    e.g. the exact Gaussian stand-in of the tests. ``class_labels`` (optional, fixed) is passed through
    for class-conditional UNets.
    """

    def __init__(self, unet, scheduler=None, *, schedule: DiscreteVPSchedule | None = None,
                 prediction_type: str | None = None, name: str = "unet",
                 representation: Mapping[str, Any] | None = None, class_labels: int | None = None):
        if schedule is None:
            schedule, pred = schedule_from_scheduler(scheduler)
            prediction_type = prediction_type or pred
        prediction_type = prediction_type or "epsilon"
        if prediction_type not in PREDICTION_TYPES:
            raise ImageModelError(f"unsupported prediction_type {prediction_type!r}; supported: {PREDICTION_TYPES}")
        self.unet, self.schedule, self.prediction_type, self.name = unet, schedule, prediction_type, name
        ch = int(getattr(getattr(unet, "config", None), "in_channels", 3) or 3)
        self.space = image_space(schedule, representation or pixel_representation(ch))
        self.class_labels = class_labels
        self.num_unet_calls = 0

    def signature(self) -> dict:
        return self.space.signature()

    def init_state(self, batch: int, mask: Tensor | None):
        return None

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        """Predicted noise at (x, t) in x's dtype."""
        dt = _module_dtype(self.unet)
        kw = {}
        if self.class_labels is not None:
            kw["class_labels"] = torch.full((x.shape[0],), int(self.class_labels), dtype=torch.long, device=x.device)
        ts = t_to_timestep(t, self.schedule).to(device=x.device, dtype=torch.float32)
        out = _unet_forward(self.unet, x.to(dt), ts, **kw).to(x.dtype)
        self.num_unet_calls += 1
        a, s = _coeffs(self.schedule, t, x)
        return model_output_to_eps(out, x, a, s, self.prediction_type)

    def __call__(self, x, t, mask, state) -> ModelOutput:
        xx = _check_state(x, mask)
        _, s = _coeffs(self.schedule, t, xx)
        return ModelOutput({"x": -self.eps(xx, t) / s})


# --------------------------------------------------------------------------------------------- SD prompts
class _Cache:
    __slots__ = ("x", "t", "z", "scores", "dens", "graph")

    def __init__(self, x, t, z, scores, dens, graph):
        self.x, self.t, self.z, self.scores, self.dens, self.graph = x, t, z, scores, dens, graph


class _RouteGrad(torch.autograd.Function):
    """Returns a cached score (value) whose VJPs are taken through the cached batched graph.
    ``field``: ``"scores"`` (guided, the drift) or ``"dens"`` (unguided conditional, the density)."""

    @staticmethod
    def forward(ctx, x: Tensor, cache: _Cache, index: int, field: str = "scores") -> Tensor:  # type: ignore[override]
        ctx.cache, ctx.index, ctx.field = cache, index, field
        return getattr(cache, field)[index].detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        c = ctx.cache
        with torch.enable_grad():
            (gz,) = torch.autograd.grad(getattr(c, ctx.field)[ctx.index], c.z, grad, retain_graph=True)
        return gz, None, None, None


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], device=None) -> Tensor:
    """CLIP text embeddings (P, L, D) of the prompts, padded to the tokenizer's max length."""
    if tokenizer is None or text_encoder is None:
        raise ImageModelError("prompts need a tokenizer and a text encoder")
    prompts = [str(p) for p in prompts]
    device = device or next(text_encoder.parameters()).device
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        out = text_encoder(ids)
    return (out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state).detach()


class PromptGroup:
    """P classifier-free-guided prompt scores of one ``UNet2DConditionModel``, from one batched call.

    ``cond`` (P, L, D) prompt embeddings, ``uncond`` (1, L, D) the unconditional (or negative-prompt)
    embedding; ``guidance_scale`` a float or one per prompt. Guided noise of prompt i:
    ``eps_u + w_i (eps_i - eps_u)``; the unconditional branch is evaluated once and shared (and skipped
    when every ``w_i == 1``). ``max_batch`` splits the batched call into chunks (memory), which changes
    nothing numerically beyond floating-point reassociation.

    ``density``: ``"unguided"`` (default) -- the views drive the sampler with the guided scores and
    have the log-density of prompt i's own conditional marginal tracked (its unguided score, from the
    same batched call: no extra UNet evaluation); ``"guided"`` -- track the guided field itself, which is
    not the score of any marginal (warns :class:`GuidedDensityWarning` when some ``w_i != 1``).
    """

    def __init__(self, unet, cond: Tensor, uncond: Tensor | None, guidance_scale: float | Sequence[float],
                 scheduler=None, *, schedule: DiscreteVPSchedule | None = None, prediction_type: str | None = None,
                 representation: Mapping[str, Any] | None = None, names: Sequence[str] | None = None,
                 max_batch: int | None = None, density: str = "unguided"):
        if schedule is None:
            schedule, pred = schedule_from_scheduler(scheduler)
            prediction_type = prediction_type or pred
        self.prediction_type = prediction_type or "epsilon"
        if self.prediction_type not in PREDICTION_TYPES:
            raise ImageModelError(f"unsupported prediction_type {self.prediction_type!r}")
        if cond.dim() != 3 or cond.shape[0] < 1:
            raise ImageModelError(f"prompt embeddings must be (P, L, D) with P >= 1, got {tuple(cond.shape)}")
        P = cond.shape[0]
        w = [float(guidance_scale)] * P if isinstance(guidance_scale, (int, float)) else [float(v) for v in guidance_scale]
        if len(w) != P:
            raise ImageModelError(f"{len(w)} guidance scales for {P} prompts")
        self.use_uncond = any(abs(v - 1.0) > 0 for v in w)
        if self.use_uncond and uncond is None:
            raise ImageModelError("classifier-free guidance (guidance_scale != 1) needs an unconditional embedding")
        if density not in DENSITY_MODES:
            raise ImageModelError(f"density must be one of {DENSITY_MODES}, got {density!r}")
        self.density = density
        # density scores differ from the drift only under guidance, and only when tracking the conditionals
        self.split_density = self.use_uncond and density == "unguided"
        if self.use_uncond and density == "guided":
            warnings.warn(
                "density='guided': the log-densities are tracked with the classifier-free-guided scores "
                "s_u + w (s_c - s_u), which are not the score of any forward-process marginal; the Itô "
                "estimate is then not the log of any density (and OR / AND weigh models by it). "
                "density='unguided' (the default) tracks each prompt's conditional log q_t(x | prompt) along "
                "the guided path (docs/images.md).", GuidedDensityWarning, stacklevel=2)
        self.unet, self.schedule, self.cond, self.uncond, self.w = unet, schedule, cond, uncond, w
        self.max_batch = max_batch
        self.space = image_space(schedule, representation or {"kind": "pixel", "channels": int(unet.config.in_channels)})
        names = list(names) if names is not None else [f"prompt{i}" for i in range(P)]
        self.views = [PromptView(self, i, names[i]) for i in range(P)]
        self.num_unet_calls = 0
        self._cache: _Cache | None = None

    def signature(self) -> dict:
        return self.space.signature()

    def clear_cache(self) -> None:
        self._cache = None

    def guided_eps(self, x: Tensor, t: Tensor) -> Tensor:
        """Guided noise of every prompt, (P, B, C, H, W) in x's dtype, from one batched UNet call."""
        return self.branch_eps(x, t)[0]

    def branch_eps(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(guided, conditional)`` noise of every prompt, each (P, B, C, H, W) in x's dtype, from one
        batched UNet call (the two are the same tensor when no prompt is guided)."""
        B, P = x.shape[0], self.cond.shape[0]
        dt = _module_dtype(self.unet)
        embeds = ([self.uncond] if self.use_uncond else []) + [self.cond[i:i + 1] for i in range(P)]
        nb = len(embeds)
        ehs = torch.cat([e.to(device=x.device, dtype=dt).expand(B, -1, -1) for e in embeds], 0)
        sample = x.to(dt).repeat(nb, 1, 1, 1)
        ts = t_to_timestep(t, self.schedule).to(device=x.device, dtype=torch.float32).repeat(nb)
        n = sample.shape[0]
        step = n if not self.max_batch else int(self.max_batch)
        out = torch.cat([_unet_forward(self.unet, sample[i:i + step], ts[i:i + step], encoder_hidden_states=ehs[i:i + step])
                         for i in range(0, n, step)], 0)
        self.num_unet_calls += 1
        a, s = _coeffs(self.schedule, t, x)
        eps = model_output_to_eps(out.to(x.dtype).reshape(nb, *x.shape), x[None], a[None], s[None],
                                  self.prediction_type)
        if not self.use_uncond:
            return eps, eps
        eu, ec = eps[0], eps[1:]
        w = torch.tensor(self.w, dtype=x.dtype, device=x.device).reshape(P, *([1] * x.dim()))
        return eu[None] + w * (ec - eu[None]), ec

    def _get(self, x: Tensor, t: Tensor, graph: bool) -> _Cache:
        c = self._cache
        xd = x.detach()
        if c is not None and (c.graph or not graph) and c.x.shape == xd.shape and torch.equal(c.x, xd) \
                and torch.equal(c.t, t.detach()):
            return c
        self._cache = c = None          # free the previous step's graph before building this one (peak memory)
        _, s = _coeffs(self.schedule, t, xd)
        z = xd.clone().requires_grad_(True) if graph else None
        with torch.enable_grad() if graph else torch.no_grad():
            eg, ec = self.branch_eps(z if graph else xd, t)
            scores = -eg / s[None]
            dens = -ec / s[None] if self.split_density else None
        self._cache = _Cache(xd, t.detach().clone(), z, scores, dens, graph)
        return self._cache


class PromptView:
    """One prompt of a :class:`PromptGroup` as a core score model."""

    def __init__(self, group: PromptGroup, index: int, name: str):
        self.group, self.index, self.name = group, index, name

    def signature(self) -> dict:
        return self.group.signature()

    def init_state(self, batch: int, mask: Tensor | None):
        return None

    def __call__(self, x, t, mask, state) -> ModelOutput:
        """Guided score (the drift) as ``scores``; with ``density="unguided"`` and guidance, the prompt's
        unguided conditional score as ``density_scores`` (what the core tracks the log-density of)."""
        xx = _check_state(x, mask)
        graph = xx.requires_grad and torch.is_grad_enabled()
        c = self.group._get(xx, t, graph)
        if graph:
            s = _RouteGrad.apply(xx, c, self.index, "scores")
            d = _RouteGrad.apply(xx, c, self.index, "dens") if c.dens is not None else None
        else:
            s = c.scores[self.index].detach()
            d = c.dens[self.index].detach() if c.dens is not None else None
        return ModelOutput({"x": s}, density_scores=None if d is None else {"x": d})
