"""Markdown tables for docs/benchmarks.md from the raw JSON of the GPU benchmarks (no number typed by hand).

    python bench/render_tables.py bench/results/superposition_h200_fp32.json bench/results/superposition_h200_bf16.json \
        bench/results/scaling_h200_fp32.json bench/results/frame_forward_h200.json \
        bench/results/multigpu_h200x2_2026-11-30_[abc].json bench/results/esmfold_h200.json \
        bench/results/sd_and_h200.json

The kind of each file is read from its keys: ``bench_multigpu.sh`` (summary; several such files are pooled into
one table), ``bench_eval.py esmfold`` (esmfold), ``bench_fkc.py`` (overhead_pct), ``bench_sd_and.py`` (rows), ``bench_frame_forward.py`` (records), ``bench_superposition.py`` (the rest).

Each cell is ``median (min–max)`` over the file's repeats. The official loop's rate for ratios is read from
``bench/results/official/official_h200_*.json`` (a copy of ``../shared/bench/official``).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

OFFICIAL = Path(__file__).resolve().parent / "results" / "official"


def cell(s: dict, nd: int = 1) -> str:
    f = f"{{:,.{nd}f}}"
    return f"{f.format(s['median'])} ({f.format(s['min'])}–{f.format(s['max'])})"


def official_rates() -> list[float]:
    """Backbones/h of the official superposition loop, every H200 run (3600 / s per sample)."""
    out = []
    for p in sorted(OFFICIAL.glob("official_h200_*.json")):
        d = json.loads(p.read_text())
        for key, rec in d.items():
            if key.startswith("loop/superpose_fd_pr"):
                out += [3600 / x for x in rec["seconds_per_sample"]["all"]]
    return out


def superposition(d: dict) -> None:
    dev, rep = d.get("device", d.get("meta", {}).get("device", "?")), d.get("repeats", "?")
    print(f"\n<!-- {dev}, {d['precision']}, {rep} repeats, {d.get('meta', {}).get('date', '')} -->")
    if "ito_vs_hutchinson" in d:
        rows = {}
        for r in d["ito_vs_hutchinson"]:
            rows.setdefault(r["length"], {})[r["route"]] = r
        print(f"\n{dev}, {d['precision']}, batch 8, ms/step: median (min–max) of {rep} repeats\n")
        print("| length | Itô | Hutchinson ODE | Hutchinson SDE η=0.1 | speed-up (median ratios) | Itô peak MiB | Hutchinson peak MiB | memory saved |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for n, r in sorted(rows.items()):
            i, o, s = r["sde_ito"], r["ode_hutchinson"], r["sde_eta0.1_hutchinson"]
            lo, hi = sorted([o["ms_per_step"]["median"] / i["ms_per_step"]["median"],
                             s["ms_per_step"]["median"] / i["ms_per_step"]["median"]])
            print(f"| {n} | {cell(i['ms_per_step'])} | {cell(o['ms_per_step'])} | {cell(s['ms_per_step'])} | "
                  f"{lo:.1f}–{hi:.1f}× | {i['peak_mib']:,.0f} | {o['peak_mib']:,.0f} | "
                  f"{100 * (1 - i['peak_mib'] / o['peak_mib']):.1f} % |")
    if "overhead" in d:
        print(f"\n{dev}, {d['precision']}, OR of two FrameDiff networks; each repeat pairs an OR step with the forwards "
              f"just before it; median (min–max) of {rep} repeats\n")
        print("| length × batch | OR step ms | two forwards ms | overhead % | launch-bound* |")
        print("| --- | --- | --- | --- | --- |")
        for r in d["overhead"]:
            print(f"| {r['length']} × {r['batch']} | {cell(r['or_step_ms'])} | {cell(r['forwards_ms'])} | "
                  f"{cell(r['overhead_pct'])} | {'**yes**' if r['launch_bound'] else 'no'} |")
    if "throughput" in d:
        off = official_rates()
        print(f"\n{dev}, {d['precision']}, OR(FrameDiff, Proteus), length 100, per-step time × 500 steps; "
              f"median (min–max) of {rep} repeats\n")
        print("| batch | ms/step | backbones/h | forward limit /h | % of forward limit | peak MiB | launch-bound* |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        ok = [r for r in d["throughput"] if "error" not in r]
        one = min(ok, key=lambda r: r["batch"])["ms_per_step"]["median"] if ok else None
        for r in d["throughput"]:
            if "error" in r:
                print(f"| {r['batch']} | {r['error']} | | | | | |")
                continue
            pct = 100 * r["backbones_per_hour"]["median"] / r["forward_limit_backbones_per_hour"]["median"]
            print(f"| {r['batch']} | {cell(r['ms_per_step'])} | {cell(r['backbones_per_hour'], 0)} | "
                  f"{cell(r['forward_limit_backbones_per_hour'], 0)} | {pct:.1f} % | {r['peak_mib']:,.0f} | "
                  f"{'**yes**' if r['ms_per_step']['median'] < 1.5 * one else 'no'} |")
        if off:
            best = max(r["backbones_per_hour"]["median"] for r in d["throughput"] if "error" not in r)
            print(f"\nOfficial loop on H200 (other runs): {min(off):.0f}–{max(off):.0f} backbones/h "
                  f"(median {statistics.median(off):.0f}); indicative ratio of the best row: "
                  f"{best / max(off):.0f}–{best / min(off):.0f}×")
    if "scaling_length" in d:
        print(f"\n{dev}, {d['precision']}, FrameDiff alone, batch 8; median (min–max) of {rep} repeats\n")
        print("| length | ms/step | ms/step/sample | peak MiB |")
        print("| --- | --- | --- | --- |")
        for r in d["scaling_length"]:
            print(f"| {r['length']} | {cell(r['ms_per_step'])} | {cell(r['ms_per_step_per_sample'], 2)} | {r['peak_mib']:,.0f} |")
        print(f"\n{dev}, length 100, batch 8, OR (1 model: single)\n")
        print("| models | ms/step |")
        print("| --- | --- |")
        for r in d["scaling_models"]:
            print(f"| {r['models']} | {cell(r['ms_per_step'])} |")


def frame_forward(d: dict) -> None:
    meta = d["meta"]
    rep = d["records"][0].get("repeats", 1)
    print(f"\n{meta['device']}, {meta['date'][:10]}, ms per forward: median (min–max) of {rep} timings of 10 forwards\n")
    print("| model | batch × length | precision | pass 1 ms | pass 2 ms | peak MiB | max dev vs fp32 (Å, pass 2) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows: dict = {}
    for r in d["records"]:
        rows.setdefault((r["model"], r["batch"], r["length"], r["precision"]), {})[r["pass_"]] = r
    for (m, b, n, p), v in rows.items():
        c = lambda r: f"{r['ms_per_forward']} ({r.get('ms_min', r['ms_per_forward'])}–{r.get('ms_max', r['ms_per_forward'])})"
        print(f"| {m} | {b} × {n} | {p} | {c(v[1])} | {c(v[2])} | {max(v[1]['peak_mib'], v[2]['peak_mib']):,.0f} | "
              f"{v[2]['max_abs_dev_vs_fp32_angstrom']:.2g} |")


def _mm(xs: list[float]) -> dict:
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs))


def multigpu(ds: list[dict]) -> None:
    """bench_multigpu.sh: one GPU against torchrun on two, every repeat with fresh processes. Several files (calls
    of the script with the same arguments) are pooled: every statistic is over all their repeats."""
    d, m = ds[0], ds[0]["meta"]
    key = lambda x: (x["samples"], x["steps"], x["length"], x["batch_size"], x["precision"], x["meta"]["device"])
    assert all(key(x) == key(d) for x in ds), "multi-GPU files with different settings cannot be pooled"
    recs = [r for x in ds for r in x["records"]]
    one_s = [r["sampler_s_one_gpu"][0] for r in recs]
    two_s = [max(r["sampler_s_two_gpus_per_rank"]) for r in recs]
    sm = dict(sampler_s_one_gpu=_mm(one_s), sampler_s_two_gpus_slowest_rank=_mm(two_s),
              sampler_speedup=_mm([a / b for a, b in zip(one_s, two_s)]),
              wall_s_one_gpu=_mm([r["wall_s_one_gpu"] for r in recs]), wall_s_two_gpus=_mm([r["wall_s_two_gpus"] for r in recs]),
              wall_speedup=_mm([r["wall_s_one_gpu"] / r["wall_s_two_gpus"] for r in recs]))
    dates = sorted({x["meta"]["date"][:10] for x in ds})
    print(f"\n{len(m.get('gpus', [])) or m.get('gpu_count', '?')} × {m['device']}, {', '.join(dates)}, {d['samples']} samples × "
          f"{d['steps']} steps, length {d['length']}, batch {d['batch_size']}, {d['precision']}; median (min–max) of "
          f"{len(recs)} repeats ({' + '.join(str(len(x['records'])) for x in ds)} in {len(ds)} call(s) of the script)\n")
    print("| | one GPU | two GPUs | speed-up |")
    print("| --- | --- | --- | --- |")
    one = sorted({r["pdbs_one_gpu"] for r in recs})
    two = sorted({r["pdbs_two_gpus"] for r in recs})
    print(f"| PDBs written (every repeat) | {', '.join(map(str, one))} | {', '.join(map(str, two))} | |")
    same = min(r["identical_pdbs"] for r in recs)
    print(f"| byte-identical to the same repeat's one-GPU run (worst repeat) | — | **{same} / {one[0]}** | |")
    rep1 = min(r["identical_to_repeat_1"] for r in recs)
    hashes = {r["sha256_one_gpu_pdbs"] for r in recs if "sha256_one_gpu_pdbs" in r}
    across = f"; one PDB-set hash across the {sum('sha256_one_gpu_pdbs' in r for r in recs)} hashed repeats" \
        if len(hashes) == 1 else (f"; {len(hashes)} different PDB-set hashes" if hashes else "")
    print(f"| one-GPU PDBs byte-identical to the call's first repeat (worst repeat{across}) | {rep1} / {one[0]} | — | |")
    print(f"| sampling time, s (the generator's own timer; two GPUs: slowest rank) | {cell(sm['sampler_s_one_gpu'])} | "
          f"{cell(sm['sampler_s_two_gpus_slowest_rank'])} | {cell(sm['sampler_speedup'], 2)}× |")
    print(f"| wall time, s, including process and CUDA start | {cell(sm['wall_s_one_gpu'])} | {cell(sm['wall_s_two_gpus'])} | "
          f"{cell(sm['wall_speedup'], 2)}× |")
    fixed1 = _mm([r["wall_s_one_gpu"] - r["sampler_s_one_gpu"][0] for r in recs])
    fixed2 = _mm([r["wall_s_two_gpus"] - max(r["sampler_s_two_gpus_per_rank"]) for r in recs])
    print(f"\nWall time outside the generator's timer (process start and imports; for two GPUs also torchrun; the timer itself covers model loading and sampling), per repeat: "
          f"one GPU {cell(fixed1)} s, two GPUs {cell(fixed2)} s.")


def _chunking(recs: list[dict]) -> str:
    """The trunk chunking of an esmfold file. Records carry ``trunk_chunk_size`` (the model's) since session 7 of
    2026-11-30; before that ``chunk_size`` 0 left esmfold_v1's config default, 128 rows, in place."""
    eff = {r.get("trunk_chunk_size", "old") if r.get("chunk_size") == 0 else r.get("chunk_size") for r in recs}
    if eff == {None}:
        return "no trunk chunking"
    if eff == {"old"}:
        return "trunk chunking 128 (the config default: before session 7, `--chunk-sizes 0` did not turn it off)"
    return "trunk chunking " + ", ".join(str(e) for e in sorted(eff, key=str))


def esmfold(d: dict) -> None:
    """bench_eval.py esmfold: seqs/s per (length, batch[, precision]). Launch-bound*: the call costs < 1.5 × the
    batch-1 call. Files with precisions also get the error against the fp32 fold of the same sequences and the
    fp32 noise floor (the same sequences folded inside the batch and one at a time)."""
    m, recs = d["meta"], [r for r in d["esmfold"] if "error" not in r]
    rep = recs[0].get("repeats", "?") if recs else "?"
    prec = any("precision" in r for r in d["esmfold"])
    print(f"\n{m['device']}, {m['date'][:10]}, ESMFold (esmfold_v1 sizes, random weights), {_chunking(recs)}; "
          f"median (min–max) of {rep} timed batches\n")
    if prec:
        print("| length | batch | trunk precision | s / batch | seqs/s | peak GiB | CA vs fp32, Å: max (RMS) | "
              "pLDDT vs fp32, max | fp32 noise floor, CA Å: max (RMS) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    else:
        print("| length | batch | s / batch | seqs/s | peak GiB | launch-bound* |")
        print("| --- | --- | --- | --- | --- | --- |")
    one = {r["length"]: r["seconds_per_batch"]["median"] for r in recs if r["batch"] == 1}
    for r in d["esmfold"]:
        if "error" in r:
            print(f"| {r['length']} | {r['batch']} | {r.get('precision', '')} {r['error']} | | | |" + (" | | |" if prec else ""))
            continue
        if prec:
            v, nf = r.get("vs_fp32") or {}, r.get("noise_floor") or {}
            err = f"{v['ca_max_A']:.3g} ({v['ca_rms_A']:.2g})" if v else ""
            floor = f"{nf['ca_max_A']:.3g} ({nf['ca_rms_A']:.2g})" if nf else ""
            print(f"| {r['length']} | {r['batch']} | {r['precision']} | {cell(r['seconds_per_batch'], 2)} | "
                  f"{cell(r['seqs_per_s'], 2)} | {r['peak_gib']:.1f} | {err} | "
                  f"{v.get('plddt_max_abs', float('nan')):.2g} | {floor} |")
            continue
        t = r["seconds_per_batch"]["median"]
        lb = "?" if r["length"] not in one else ("**yes**" if t < 1.5 * one[r["length"]] else "no")
        print(f"| {r['length']} | {r['batch']} | {cell(r['seconds_per_batch'], 2)} | {cell(r['seqs_per_s'], 2)} | "
              f"{r['peak_gib']:.1f} | {lb} |")
    per_len: dict = {}
    for r in recs:
        per_len.setdefault(r["length"], {})[r["batch"]] = r["seqs_per_s"]["median"]
    gains = [f"{n}: {v[max(v)] / v[1]:.1f}× at batch {max(v)}" for n, v in sorted(per_len.items()) if 1 in v and len(v) > 1]
    if gains and not prec:
        print(f"\nSequences per second against batch 1 (median ratios), by length: {'; '.join(gains)}.")


def sd_and(d: dict) -> None:
    """bench_sd_and.py: ms per step and s/image extrapolated to 1000 steps. Launch-bound*: the step costs
    < 1.5 × the same run's batch-1 step."""
    m, rows = d.get("meta", {}), d["rows"]
    rep = rows[0].get("repeats", 1) if rows else "?"
    a = d.get("args", {})
    print(f"\n{d['device']}, {m.get('date', '')[:10]}, AND of two prompts, SD v1.x sizes (random weights), "
          f"{a.get('height', 512)}×{a.get('height', 512)}, {a.get('dtype', 'float16')}, CFG 7.5; {rows[0]['steps'] if rows else '?'} "
          f"steps per call; median (min–max) of {rep} calls\n")
    print("| run | batch | ms / step | s / image at 1000 steps (extrapolated) | peak GiB | launch-bound* |")
    print("| --- | --- | --- | --- | --- | --- |")
    names = {"ito": "SDE + Itô", "hutchinson": "ODE + Hutchinson (1 probe)", "ito_corr": "SDE + Itô + AND correction"}
    one = {r["run"]: r["ms_per_step"]["median"] for r in rows if r["batch"] == 1}
    for r in rows:
        t = r["ms_per_step"]["median"]
        lb = "?" if r["run"] not in one else ("**yes**" if t < 1.5 * one[r["run"]] else "no")
        print(f"| {names.get(r['run'], r['run'])} | {r['batch']} | {cell(r['ms_per_step'])} | "
              f"{cell(r['seconds_per_image_1000_steps'])} | {r['peak_gib']:.2f} | {lb} |")
    by = {(r["run"], r["batch"]): r for r in rows}
    lines = []
    for b in sorted({r["batch"] for r in rows}):
        i, h, c = by.get(("ito", b)), by.get(("hutchinson", b)), by.get(("ito_corr", b))
        if i and h:
            lines.append(f"batch {b}: Hutchinson / Itô = {h['ms_per_step']['median'] / i['ms_per_step']['median']:.2f}× "
                         f"per step, Itô peak memory {100 * (1 - i['peak_gib'] / h['peak_gib']):.0f} % lower")
        if i and c:
            lines.append(f"batch {b}: Itô + AND correction / Itô = {c['ms_per_step']['median'] / i['ms_per_step']['median']:.2f}× per step")
    if lines:
        print("\nMedian ratios: " + "; ".join(lines) + ".")


def compile_table(ds: list[dict], names: list[str]) -> None:
    """bench_compile.py: eager vs compiled vs compiled + CUDA graphs, per precision and batch.

    Several files (calls of one machine) are pooled: a cell comes from the last file that timed it, and the
    ``call`` column names the file. Workers with joined modes (``default+step-graph``) give one row per mode."""
    cells, comp = {}, {}
    for k, d in enumerate(ds):
        for w in d["workers"]:
            modes = w.get("mode", "").split("+")
            for c in w.get("compile_s", []):
                for m in modes:
                    comp.setdefault((w["precision"], m, c["batch"]), {}).setdefault(k, []).append(f"{c['seconds']:.0f}")
            for r in w.get("rows", []):
                if "error" not in r:
                    cells[(w["precision"], r.get("mode", modes[0]), r["batch"])] = (k, r)
    d0 = ds[-1]
    meta, rep = d0["meta"], d0["repeats"]
    print(f"\n{meta['device']}, {meta['date'][:10]}, torch {meta['torch']}, OR(FrameDiff, Proteus) at paper size, "
          f"length {d0['length']}, per-step time x 500 steps; median (min–max) of {rep} repeats of "
          f"{d0['timed_steps']} timed steps; calls: " + ", ".join(f"{chr(97 + k)} = {n}" for k, n in enumerate(names))
          + "\n")
    print("| precision | mode | batch | ms/step | backbones/h | whole 500-step run, s (batch 1) | % of forward limit | "
          "% of compute limit | compile s (FrameDiff, Proteus; cold) | max dev vs eager, Å (FrameDiff, Proteus) | call |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    order = {"eager": 0, "default": 1, "reduce-overhead": 2, "eager-graph": 3, "step-graph": 4}
    for key in sorted(set(cells) | set(comp), key=lambda t: (t[0], order.get(t[1], 9), t[2])):
        prec, mode, b = key
        head = f"| {prec} | {mode} | {b} |"
        cold = next(iter(comp.get(key, {}).values()), [])       # the first call's compile: the cold one
        if key not in cells:
            print(f"{head} not timed | | | | | {', '.join(cold)} | | |")
            continue
        k, r = cells[key]
        dev = r.get("deviation", {})
        devs = ", ".join(f"{dev[n]['compiled_vs_eager_trans_A']:.2g}" for n in ("framediff", "proteus")
                         if "compiled_vs_eager_trans_A" in dev.get(n, {})) or "–"
        full = cell(r["full_500_step_run_s"], 2) if r.get("full_500_step_run_s") else ""
        print(f"{head} {cell(r['ms_per_step'])} | {cell(r['backbones_per_hour'], 0)} | {full} | "
              f"{r['pct_of_forward_limit']:.0f} % | {r['pct_of_compute_limit']:.1f} % | "
              f"{', '.join(cold) or '–'} | {devs} | {chr(97 + k)} |")
    off = official_rates()
    if off and cells:
        best = max(r["backbones_per_hour"]["median"] for _, r in cells.values())
        print(f"\nOfficial loop on H200 (other runs): {min(off):.0f}–{max(off):.0f} backbones/h; indicative ratio "
              f"of the best row: {best / max(off):.0f}–{best / min(off):.0f}×")


def fkc_overhead(d: dict) -> None:
    """bench_fkc.py: ms per step of OR and the FKC product settings, and the overhead against OR."""
    print(f"\n{d['device']}, {d['date']}, {d['batch']} × {d['length']}, {d['precision']}, groups of "
          f"{d['group_size']}: ms per step and overhead against the OR step of the same repeat, median (min–max) "
          f"of {d['repeats']} repeats\n")
    print("| setting | ms per step | overhead vs OR (%) |\n| --- | --- | --- |")
    for k, v in d["ms_per_step"].items():
        ov = d["overhead_pct"].get(k)
        print(f"| {k} | {cell(v, 2)} | {cell(ov, 1) if ov else '—'} |")


def main(paths: list[str]) -> int:
    data = {p: json.loads(Path(p).read_text()) for p in paths}
    pooled = [p for p, d in data.items() if "summary" in d]          # multi-GPU calls: one table for all of them
    compiled = [p for p, d in data.items() if "workers" in d]        # bench_compile calls: one table too
    for p, d in data.items():
        if p in pooled:
            if p == pooled[0]:
                print(f"\n<!-- from {', '.join(pooled)} -->")
                multigpu([data[q] for q in pooled])
            continue
        if p in compiled:
            if p == compiled[0]:
                print(f"\n<!-- from {', '.join(compiled)} -->")
                compile_table([data[q] for q in compiled], [Path(q).name for q in compiled])
            continue
        print(f"\n<!-- from {p} -->")
        if "overhead_pct" in d:
            fkc_overhead(d)
        elif "esmfold" in d:
            esmfold(d)
        elif "rows" in d:
            sd_and(d)
        elif "records" in d:
            frame_forward(d)
        else:
            superposition(d)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
