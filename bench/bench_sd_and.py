"""GPU benchmark: AND of two Stable Diffusion v1.x prompts through the shared core.

Real SD v1.x architecture sizes (UNet2DConditionModel 860M, AutoencoderKL 84M, CLIP ViT-L/14 text
encoder 123M) with RANDOM weights (real weights are not obtainable here; speed and memory do not depend
on the weight values). 512x512 images (64x64 latents), 1000 steps, batch 1 and 8, prompts "a cat" AND
"a dog", classifier-free guidance 7.5 with one shared unconditional branch: every step is ONE UNet call
on 3 x batch rows.

Configurations (``--runs``):
  ito         reverse SDE + Itô density estimator (the paper's 209 s/image run; no divergence)
  hutchinson  probability-flow ODE + Hutchinson divergence estimate (the paper's 1082 s/image run),
              one Rademacher probe: one VJP per prompt and step through the batched graph
  ito_corr    reverse SDE + Itô with the core's exact AND noise correction (one VJP per prompt and step)

Each (run, batch) cell is warmed up with a 3-step call, then timed ``--repeats`` times (default 5), each repeat
one full call of ``--steps`` steps. The JSON keeps every repeat: sampling seconds (to the last step, text
encoding included), decode seconds, ms per step, and seconds per image extrapolated to 1000 steps
(ms/step x 1000 + decode, over the batch). It is rewritten after every cell, so a cut run keeps what it did.
Prints a markdown table (median over repeats) and writes JSON.
Needs diffusers on the GPU machine (not installed there): carry the wheels of diffusers and of its
dependencies missing there -- importlib_metadata, zipp, lazy-importer (docs/images.md) -- e.g.
``pip install --no-deps wheels/*.whl``.

    python bench/bench_sd_and.py --batch-sizes 1 8 --steps 20 --repeats 5 --runs ito hutchinson ito_corr --out sd.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sd_v1_components(dtype: torch.dtype, device: str, tmpdir: str) -> dict:
    """SD v1.x-sized UNet / VAE / CLIP text encoder with random weights, SD's scheduler config."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.image.tiny import write_tiny_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8,
        norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=4, sample_size=512)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    # token ids only need to be valid: a tiny vocabulary padded to SD's 77 tokens
    tok = write_tiny_clip_tokenizer(Path(tmpdir) / "tok", max_length=77)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False)
    for m in (unet, vae, te):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    n = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print(f"parameters: unet {n(unet):.0f}M, vae {n(vae):.0f}M, text encoder {n(te):.0f}M", flush=True)
    return {"unet": unet, "vae": vae, "text_encoder": te, "tokenizer": tok, "scheduler": sched}


RUNS = {
    "ito": dict(sampling="sde", estimator="ito", and_correction=False),
    "hutchinson": dict(sampling="ode", estimator="hutchinson", and_correction=False),
    "ito_corr": dict(sampling="sde", estimator="ito", and_correction=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per (run, batch) cell")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--runs", nargs="+", default=["ito", "hutchinson"], choices=sorted(RUNS))
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--state-dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--max-batch", type=int, default=None, help="split the batched UNet call into chunks")
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--out", default="bench_sd_and.json")
    ap.add_argument("--tiny", action="store_true", help="tiny random components on CPU (smoke test of this script)")
    args = ap.parse_args()
    from models.image.pipeline import SuperDiffPipeline

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        sys.exit("bench_sd_and: needs a CUDA GPU (or --tiny for a CPU smoke run)")
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from models.image.tiny import tiny_sd_components
            c = tiny_sd_components(tmp)
            args.height = 16
        else:
            c = sd_v1_components(dtype, device, tmp)
        pipe = SuperDiffPipeline(c["unet"], c["scheduler"], vae=c["vae"], text_encoder=c["text_encoder"],
                                 tokenizer=c["tokenizer"], unet_names=["sd-v1-random"])
        rows = []
        for run in args.runs:
            for bs in args.batch_sizes:
                kw = dict(RUNS[run], rule="and", guidance_scale=7.5, height=args.height, width=args.height,
                          seeds=list(range(bs)), output_type="np", max_batch=args.max_batch,
                          state_dtype=getattr(torch, args.state_dtype), final_denoise=True)
                pipe(["a cat", "a dog"], num_inference_steps=3, **kw)           # warm-up (kernels, allocator)
                sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                reps = []
                for _ in range(args.repeats):
                    t_sample = {}
                    t0 = time.perf_counter()

                    def cb(step, total):
                        if step == total:
                            sync()
                            t_sample["s"] = time.perf_counter() - t0

                    out = pipe(["a cat", "a dog"], num_inference_steps=args.steps, callback=cb, **kw)
                    sync()
                    total = time.perf_counter() - t0
                    samp = t_sample.get("s", float("nan"))
                    ms_step = 1000 * samp / args.steps
                    reps.append({"seconds_total": total, "sampling_seconds": samp, "decode_and_final_seconds": total - samp,
                                 "ms_per_step": ms_step,
                                 "seconds_per_image_1000_steps": (ms_step + (total - samp)) / bs,
                                 "finite": bool(torch.isfinite(out.logq).all())})
                peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
                med = lambda k: statistics.median(r[k] for r in reps)
                row = {"run": run, "batch": bs, "steps": args.steps, "dtype": args.dtype, "repeats": args.repeats,
                       "seconds_total": med("seconds_total"), "seconds_per_image": med("seconds_total") / bs,
                       "sampling_seconds": med("sampling_seconds"), "decode_and_final_seconds": med("decode_and_final_seconds"),
                       "ms_per_step": {k: f([r["ms_per_step"] for r in reps]) for k, f in STATS.items()},
                       "seconds_per_image_1000_steps": {k: f([r["seconds_per_image_1000_steps"] for r in reps])
                                                        for k, f in STATS.items()},
                       "peak_gib": peak, "unet_rows_per_call": 3 * bs, "repeat_records": reps,
                       "final_kappa_mean": out.kappa[-1].mean(0).tolist(), "logq_final_mean": out.logq[-1].mean(0).tolist(),
                       "finite": all(r["finite"] for r in reps)}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "repeat_records"}), flush=True)
                _write(args, rows, torch.cuda.get_device_name() if cuda else "cpu (tiny smoke run)")
        dev = torch.cuda.get_device_name() if cuda else "cpu (tiny smoke run)"
    print(f"\nAND of two prompts, SD v1.x sizes (random weights), {args.height}x{args.height}, {args.steps} steps, "
          f"{args.dtype} weights, {dev}\n")
    print("| run | batch | ms / step | s / image at 1000 steps | decode s | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['batch']} | {r['ms_per_step']['median']:.1f} | "
              f"{r['seconds_per_image_1000_steps']['median']:.1f} | {r['decode_and_final_seconds']:.2f} | {r['peak_gib']:.1f} |")
    _write(args, rows, dev)


STATS = {"median": statistics.median, "min": min, "max": max}


def _write(args, rows: list[dict], dev: str) -> None:
    meta = {"device": dev, "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python3"] + sys.argv)}
    tmp = f"{args.out}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump({"device": dev, "meta": meta, "rows": rows, "args": vars(args)}, fh, indent=2)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
