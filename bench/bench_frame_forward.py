"""Forward-pass time and peak memory of the paper-size FrameDiff and Proteus networks (random weights).

Answers: does each paper architecture run a batch of 16 x length 300 under float32, tf32 and bf16
autocast, how long does one forward take (pass 1 and the self-conditioned pass 2), how much memory
does it need, and how far do tf32/bf16 outputs move from float32?

    python bench/bench_frame_forward.py --proteus-keys .gpu_data/proteus_paper_keys.json --out results.json

Writes a JSON with one record per (model, batch, length, precision, pass) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import ast
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from superdiff_protein.frames.geometry import rotmat_to_quat, so3_exp  # noqa: E402


def random_frames(b, n, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    rot = so3_exp(torch.randn(b, n, 3, generator=g) * 1.5)
    trans = torch.randn(b, n, 3, generator=g) * 10.0
    return rot.to(device), trans.to(device)


def build(model: str, proteus_keys: Path | None):
    if model == "framediff":
        from models.framediff import FrameDiffConfig, FrameDiffScoreNetwork
        return FrameDiffScoreNetwork(FrameDiffConfig())
    from models.proteus import ProteusNetwork
    d = json.loads(Path(proteus_keys).read_text())
    conf = d["model_config"]
    conf = ast.literal_eval(conf) if isinstance(conf, str) else conf
    return ProteusNetwork(conf)


def forward(model, net, quats, trans, t, mask, state):
    if model == "framediff":
        out = net(quats, trans, t, mask, sc_ca=state)
        return out, out["trans"]
    out = net(quats, trans, t, mask, template_atoms=state)
    return out, out["backbone_atoms"]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps, warmup=3):
    for _ in range(warmup):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    _sync()
    return (time.perf_counter() - t0) / reps * 1000, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["framediff", "proteus"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--lengths", nargs="+", type=int, default=[100, 300])
    p.add_argument("--precisions", nargs="+", default=["fp32", "tf32", "bf16"])
    p.add_argument("--reps", type=int, default=10, help="forwards averaged in one timing")
    p.add_argument("--repeats", type=int, default=5, help="independent timings per row (median, spread)")
    p.add_argument("--proteus-keys", type=Path, default=Path("../shared/fixtures/official/proteus_paper_keys.json"))
    p.add_argument("--device", default="cuda", help="cuda, or cpu (fp32 only; no memory figures)")
    p.add_argument("--out", type=Path, default=Path("bench_frame_forward.json"))
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench_frame_forward: needs a CUDA device (or --device cpu)", file=sys.stderr)
        return 2
    if a.device == "cpu" and a.precisions != ["fp32"]:
        print("bench_frame_forward: --device cpu takes --precisions fp32 only", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    records = []
    for model in a.models:
        net = build(model, a.proteus_keys)
        # OpenFold-style "final" layers are zero-initialised, which makes a random network's output ignore
        # most of the trunk; give them small random values so precision deviations are meaningful
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for prm in net.parameters():
                if prm.dim() >= 2 and not prm.any():
                    prm.copy_(torch.randn(prm.shape, generator=g) * 0.02)
        net = net.to(dev).eval()
        n_params = sum(p.numel() for p in net.parameters())
        for b in a.batches:
            for n in a.lengths:
                rot, trans = random_frames(b, n, dev)
                quats = rotmat_to_quat(rot)
                mask = torch.ones(b, n, device=dev)
                t = torch.full((b,), 0.5, device=dev)
                ref = {}
                for prec in a.precisions:
                    torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
                    torch.backends.cudnn.allow_tf32 = prec == "tf32"
                    ac = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=prec == "bf16")
                    state = None
                    for pass_ in (1, 2):
                        if cuda:
                            torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated() if cuda else 0
                        times = []
                        with torch.no_grad(), ac:
                            for _ in range(a.repeats):
                                ms, (out, key) = timed(lambda: forward(model, net, quats, trans, t, mask, state), a.reps)
                                times.append(ms)
                        times.sort()
                        ms = statistics.median(times)
                        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
                        key = key.float()
                        if prec == "fp32":
                            ref[pass_] = key
                            dev_ = 0.0
                        else:
                            dev_ = float((key - ref[pass_]).abs().max())
                        rec = dict(model=model, params=n_params, batch=b, length=n, precision=prec, pass_=pass_,
                                   ms_per_forward=round(ms, 2), ms_min=round(times[0], 2), ms_max=round(times[-1], 2),
                                   repeats=a.repeats, peak_mib=round(peak, 1), finite=bool(torch.isfinite(key).all()),
                                   max_abs_dev_vs_fp32_angstrom=dev_)
                        records.append(rec)
                        print(json.dumps(rec), flush=True)
                        state = out["trans"] if model == "framediff" else out["backbone_atoms"]
        del net
        if cuda:
            torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or 'unknown'}, "
                f"{torch.get_num_threads()} threads)", torch=torch.__version__, python=platform.python_version(),
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=" ".join(sys.argv))
    a.out.write_text(json.dumps(dict(meta=meta, records=records), indent=1))
    print(f"\n{meta['device']}, median of {a.repeats} timings of {a.reps} forwards (min–max)\n")
    print("| model | batch | length | precision | pass | ms/forward | peak MiB | max dev vs fp32 (Å) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in records:
        print(f"| {r['model']} | {r['batch']} | {r['length']} | {r['precision']} | {r['pass_']} | "
              f"{r['ms_per_forward']} ({r['ms_min']}–{r['ms_max']}) | "
              f"{r['peak_mib']} | {r['max_abs_dev_vs_fp32_angstrom']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
