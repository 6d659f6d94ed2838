"""Hydra CLIs of the image path: ``generate_images`` and ``train_image_model`` (docs/images.md).

    generate_images model_path=path/to/sd-v1-4 'prompts=[a cat, a dog]' rule=and batch_size=4 out_dir=out
    generate_images 'model_path=[runs/cifar_a, runs/cifar_b]' rule=or num_inference_steps=1000 out_dir=out
    generate_images model_path=path/to/sd-v1-4 'prompts=[a cat, a dog]' rule=product smc.group_size=4 batch_size=8 out_dir=out
    generate_images model_path=path/to/sd-v1-4 'prompts=[a cat]' rule=geometric gamma=7.5 out_dir=out   # CFG, exact target
    train_image_model archive=cifar-10-python.tar.gz 'classes=[0,1,2,3,4]' output=runs/cifar_a
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .common import UserError, check_out_dir, guard, resolve_device, run_hydra

_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class ImageCLIError(RuntimeError, UserError):
    """Bad CLI input (printed as one line, exit code 2)."""


def _count(cfg: Any, key: str, lo: int = 1, none_ok: bool = False) -> None:
    v = getattr(cfg, key)
    if v is None and none_ok:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ImageCLIError(f"{key} must be an integer >= {lo}{' or null' if none_ok else ''}, got {v!r}")


def _finite(cfg: Any, key: str, lo: float | None = None, lo_open: bool = False, none_ok: bool = False) -> None:
    v = getattr(cfg, key)
    if v is None and none_ok:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if not ok:
        bound = "" if lo is None else f" {'>' if lo_open else '>='} {lo:g}"
        raise ImageCLIError(f"{key} must be a finite number{bound}, got {v!r}")


@dataclass
class GenerateConfig:
    model_path: Any = "???"            # local diffusers model dir / hub id, or a list (superposition of models)
    prompts: Any = None                # list of prompts (SD); null for unconditional pixel models
    rule: str = "and"                  # and | or | average | joint | single | product | anneal | geometric
    num_inference_steps: int = 50
    guidance_scale: Any = None         # null: 7.5 (SuperDiff rules), 1 (product | anneal | geometric)
    bias: Any = 0.0                    # AND/OR bias l: scalar (two models: l = [0, bias]) or one value per model
    temperature: float = 1.0           # OR temperature
    single_index: int = 0              # single: which model
    batch_size: int = 4
    seed: int = 0                      # image i gets seed + i unless seeds is given
    seeds: Any = None
    height: Any = None
    width: Any = None
    negative_prompt: str = ""
    sampling: str = "sde"              # sde | ode
    estimator: str = "ito"             # ito | hutchinson
    num_probes: int = 1
    and_correction: bool = True        # the corrected AND (as generate_backbones); false = the paper's AND
    density: str = "unguided"          # guided prompts: track the unguided conditional (default) | guided (warns)
    noise_scale: float = 1.0
    time_grid: str = "uniform"
    device: str = "auto"               # auto | cpu | cuda | cuda:1 ...
    dtype: str = "float32"             # weights: float32 | float16 | bfloat16
    max_batch: Any = None              # split the batched UNet call into chunks of this many rows
    out_dir: str = "???"
    grid_cols: int = 0                 # 0: ~sqrt(batch)
    local_files_only: bool = True      # hub ids only from the local cache (no network here)
    weights: Any = None                # average: fixed kappa; product / anneal_of=product: exponents (null: all 1)
    beta: float = 2.0                  # anneal: q^beta
    anneal_of: str = "auto"            # anneal: auto | single | product | or (models.image.pipeline.ANNEAL_OF)
    gamma: float = 0.5                 # geometric: q_1^(1-gamma) q_2^gamma
    smc: Any = field(default_factory=dict)  # FKC particle groups: fields of core/smc.py SMCConfig (its defaults, checks)


def _atomic_save_png(img, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    img.save(tmp)
    os.replace(tmp, path)


def _grid(images, cols: int):
    from PIL import Image

    n = len(images)
    cols = cols or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / cols))
    w, h = images[0].size
    g = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        g.paste(im, ((i % cols) * w, (i // cols) * h))
    return g


def _plot_traces(out, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = out.t.numpy()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for i, name in enumerate(out.model_names):
        for b in range(out.kappa.shape[1]):
            ax[0].plot(t[:-1], out.kappa[:, b, i].numpy(), color=f"C{i}", alpha=0.6, lw=1,
                       label=name if b == 0 else None)
            ax[1].plot(t, out.logq[:, b, i].numpy(), color=f"C{i}", alpha=0.6, lw=1, label=name if b == 0 else None)
    ax[0].set(xlabel="t", ylabel="kappa", title=f"kappa ({out.rule.get('rule')})")
    ax[1].set(xlabel="t", ylabel="log q (estimate)", title="log-density estimates")
    for a in ax:
        a.invert_xaxis()
        a.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run_generate(cfg: GenerateConfig) -> dict:
    """Load, sample, write ``img_XXX.png``, ``grid.png``, ``traces.json``, ``traces.png``, ``summary.json``."""
    import torch

    from models.image.adapters import ImageModelError
    from models.image.pipeline import SuperDiffPipeline, check_fkc_options, save_traces

    for k in ("model_path", "out_dir"):
        if getattr(cfg, k) in (None, "???", ""):
            raise ImageCLIError(f"{k} is required")
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if cfg.dtype not in dtypes:
        raise ImageCLIError(f"dtype must be one of {sorted(dtypes)}, got {cfg.dtype!r}")
    # everything that can be refused is checked before the model is loaded and anything is written
    check_out_dir(cfg.out_dir, "out_dir", ImageCLIError)
    device = str(resolve_device(cfg.device, "device", ImageCLIError))
    _count(cfg, "num_inference_steps")
    _count(cfg, "batch_size")
    _count(cfg, "num_probes")
    _count(cfg, "grid_cols", lo=0)
    _count(cfg, "max_batch", none_ok=True)
    for k in ("guidance_scale", "temperature", "noise_scale"):
        _finite(cfg, k, lo=0.0, lo_open=(k == "temperature"), none_ok=(k == "guidance_scale"))
    if cfg.seeds is not None and (isinstance(cfg.seeds, (str, bool)) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in cfg.seeds)):
        raise ImageCLIError(f"seeds must be a list of integers >= 0, got {cfg.seeds!r}")
    seeds = list(cfg.seeds) if cfg.seeds is not None else [int(cfg.seed) + i for i in range(int(cfg.batch_size))]
    weights = None if cfg.weights is None else (list(cfg.weights) if isinstance(cfg.weights, (list, tuple))
                                                else [cfg.weights])
    try:                 # the Feynman-Kac options: the pipeline's (the core's) checks, before anything is loaded
        check_fkc_options(cfg.rule, len(seeds), beta=cfg.beta, gamma=cfg.gamma, weights=weights,
                          anneal_of=cfg.anneal_of, smc=cfg.smc or None, guidance_scale=cfg.guidance_scale)
    except ImageModelError as e:
        raise ImageCLIError(str(e)) from None
    models = [cfg.model_path] if isinstance(cfg.model_path, str) else list(cfg.model_path)
    if not models:
        raise ImageCLIError("model_path: the list is empty; give a model directory or hub id")
    for m in models:
        if str(m).startswith(("/", ".", "~")) and not Path(str(m)).expanduser().exists():
            raise ImageCLIError(f"model_path {str(m)!r} does not exist (a local diffusers model directory, or a "
                                "hub id in the local Hugging Face cache)")
    kw = {"local_files_only": True} if cfg.local_files_only else {}
    pipe = SuperDiffPipeline.from_pretrained(models, torch_dtype=dtypes[cfg.dtype], device=device, **kw)
    prompts = None if cfg.prompts is None else ([cfg.prompts] if isinstance(cfg.prompts, str) else list(cfg.prompts))
    out = pipe(prompts, rule=cfg.rule, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
               bias=cfg.bias if not isinstance(cfg.bias, (list, tuple)) else list(cfg.bias), batch_size=len(seeds),
               height=cfg.height, width=cfg.width, seeds=seeds, negative_prompt=cfg.negative_prompt,
               temperature=cfg.temperature, single_index=cfg.single_index, sampling=cfg.sampling,
               estimator=cfg.estimator,
               num_probes=cfg.num_probes, and_correction=cfg.and_correction, noise_scale=cfg.noise_scale,
               time_grid=cfg.time_grid, max_batch=cfg.max_batch, density=cfg.density, weights=weights, beta=cfg.beta,
               gamma=cfg.gamma, anneal_of=cfg.anneal_of, smc=cfg.smc or None)
    od = Path(cfg.out_dir).expanduser()
    od.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (img, s) in enumerate(zip(out.images, out.seeds)):
        p = od / f"img_{i:03d}_seed{s}.png"
        _atomic_save_png(img, p)
        files.append(p.name)
    _atomic_save_png(_grid(out.images, cfg.grid_cols), od / "grid.png")
    save_traces(out, str(od / "traces.json"))
    _plot_traces(out, od / "traces.png")
    summary = {"config": asdict(cfg), "images": files, "model_names": out.model_names, "rule": out.rule,
               "final_logq": out.logq[-1].tolist(), "final_kappa": out.kappa[-1].tolist(), "pipeline": pipe.describe()}
    if out.log_weight is not None:      # FKC rules: per image (in file order) its weight, ancestor and group
        rec = out.fkc_record()
        summary["fkc"] = {k: rec[k] for k in ("log_weight", "importance_weight", "ancestor", "group", "log_z")}
    tmp = od / f".summary.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, od / "summary.json")
    return summary


def _to_dataclass(cls, cfg, name: str):
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        opts = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        from .common import hydra_error_line

        raise ImageCLIError(hydra_error_line(e)) from e
    opts = {k: v for k, v in opts.items() if k != "hydra"}
    unknown = set(opts) - {f.name for f in fields(cls)}
    if unknown:
        raise ImageCLIError(f"unknown config key(s) {sorted(unknown)}")
    return cls(**opts)


def _as_user_errors(fn):
    """``fn()``; sampling failures and the ``ValueError`` / ``OSError`` that diffusers raises for unusable models
    and paths are bad input here (exit code 2)."""
    from superdiff_protein.core.sampler import SamplingError

    try:
        return fn()
    except UserError:
        raise
    except (SamplingError, ValueError, OSError) as e:
        raise ImageCLIError(f"{type(e).__name__}: {e}") from e


def _guarded(name: str, fn) -> int:
    """Run ``fn`` under the exit-code contract (``superdiff_protein.cli.common.guard``); returns the exit code."""
    return guard(name, lambda: _as_user_errors(fn))


# old spellings of generate_images' options, accepted (with one warning line each) for one release
DEPRECATED_GENERATE_KEYS = {"lift": "bias", "output_dir": "out_dir", "index": "single_index"}


def _hydra_main(name: str, node, body, list_keys=(), argv=None, renamed=None) -> None:
    sys.exit(run_hydra(name, name, lambda cfg: _as_user_errors(lambda: body(_to_dataclass(node, cfg, name))),
                       argv=argv, node=node, list_keys=list_keys, renamed=renamed))


def generate_main(argv=None) -> None:
    """Console entry point ``generate_images`` (``argv``: the overrides; default ``sys.argv[1:]``)."""
    def body(cfg: GenerateConfig) -> None:
        s = run_generate(cfg)
        print(f"generate_images: wrote {len(s['images'])} images, grid.png, traces.json/png to {cfg.out_dir}")
    _hydra_main("generate_images", GenerateConfig, body, list_keys=("model_path", "seeds", "bias", "weights"), argv=argv,
                renamed=DEPRECATED_GENERATE_KEYS)


def run_train(cfg) -> Path:
    """Body of ``train_image_model`` (a :class:`models.image.cifar.TrainConfig`)."""
    from models.image.cifar import train_ddpm

    for k in ("archive", "output"):
        if getattr(cfg, k) in (None, "???", ""):
            raise ImageCLIError(f"{k} is required")
    check_out_dir(cfg.output, "output", ImageCLIError)
    from models.image.cifar import _class_ids

    _class_ids(cfg.classes)                      # unknown class names / indices, before the archive is read
    if not Path(str(cfg.archive)).expanduser().exists():
        raise ImageCLIError(f"archive {str(cfg.archive)!r} not found (download cifar-10-python.tar.gz and pass its "
                            "path, or its extracted directory)")
    for k in ("max_steps", "batch_size", "num_train_timesteps", "log_every_n_steps"):
        _count(cfg, k)
    _count(cfg, "num_workers", lo=0)
    _finite(cfg, "lr", lo=0.0, lo_open=True)
    _finite(cfg, "ema_decay", lo=0.0)
    if cfg.ema_decay >= 1:
        raise ImageCLIError(f"ema_decay must lie in [0, 1) (0 disables EMA), got {cfg.ema_decay!r}")
    if str(cfg.accelerator).lower() in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ImageCLIError(f"accelerator={cfg.accelerator}: no CUDA GPU is available; use accelerator=auto or cpu")
    out = train_ddpm(cfg)
    print(f"train_image_model: saved the model to {out}")
    return out


def train_main(argv=None) -> None:
    """Console entry point ``train_image_model`` (``argv``: the overrides; default ``sys.argv[1:]``)."""
    from models.image.cifar import TrainConfig

    _hydra_main("train_image_model", TrainConfig, run_train, list_keys=("classes",), argv=argv)


if __name__ == "__main__":
    generate_main()
