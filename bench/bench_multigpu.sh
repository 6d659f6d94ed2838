#!/usr/bin/env bash
# Two GPUs vs one: the same seeds must give the same PDBs, and throughput should nearly double.
#   bash bench/bench_multigpu.sh [SAMPLES] [STEPS] [REPEATS]    (on a machine with >= 2 GPUs; writes $OUT/multigpu.json)
# Each repeat runs the one-GPU job, then the torchrun job with the same arguments, into fresh folders.
# Recorded per repeat: wall time of each (process and CUDA start included), the generator's own timer
# (its "... in X s" line; one per rank under torchrun), and how many PDBs are byte-identical to the one-GPU run.
# The generator needs hydra-core/omegaconf/antlr4, which the GPU image lacks: wheels in $WHEELS (default .whl,
# carried) are installed first unless hydra already imports. biotite is not needed: generation only writes PDBs.
# With compile=auto (the default, as users run it) each process compiles its networks inside the timer; the
# per-device compile seconds are read from the logs ("compile: ... on cuda:K in X s") and recorded per repeat.
# Env: LENGTH (100), DEVICE (cuda; cpu with gloo for a smoke run), COMPILE (auto | true | false), BATCH (16),
#      EXTRA (more generate_backbones options, e.g. "compile_mode=step-graph rng=counter"), WHEELS, SKIP_INSTALL=1,
#      WARM=1 (first run one untimed one-GPU job, so that every timed repeat finds a warm compile cache),
#      MAX_SECONDS (start no repeat that would likely end past it; the JSON then says how many ran).
set -euo pipefail
cd "$(dirname "$0")/.."
SAMPLES=${1:-128}
STEPS=${2:-100}
REPEATS=${3:-5}
OUTDIR=${OUT:-/tmp/multigpu_out}
WHEELS=${WHEELS:-.whl}
WORK=${WORK:-/tmp/multigpu_work}
rm -rf "$WORK"; mkdir -p "$OUTDIR" /tmp/site "$WORK"
if [ -z "${SKIP_INSTALL:-}" ] && ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHEELS"/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | tee "$WORK/gpus.txt" || true
python3 bench/make_random_checkpoints.py "$WORK/ck" --count 2
ARGS="models=[$WORK/ck/random_framediff_0.pth,$WORK/ck/random_framediff_1.pth] rule=or lengths=[${LENGTH:-100}] \
samples_per_length=$SAMPLES batch_size=${BATCH:-16} num_steps=$STEPS seed=0 device=${DEVICE:-cuda} precision=float32 \
plots=false progress=false compile=${COMPILE:-auto} ${EXTRA:-}"
if [ -n "${WARM:-}" ]; then   # fill the compile cache with this job's shapes; not timed, not recorded
  CUDA_VISIBLE_DEVICES=0 python3 -m superdiff_protein.cli.generate $ARGS out_dir="$WORK/warm" > "$WORK/warm.log" 2>&1
fi
start=$SECONDS; last=0
for r in $(seq 1 "$REPEATS"); do
  if [ -n "${MAX_SECONDS:-}" ] && [ $((SECONDS - start + last * 12 / 10)) -gt "$MAX_SECONDS" ]; then
    echo "stopping before repeat $r: MAX_SECONDS=$MAX_SECONDS"; break
  fi
  rs=$SECONDS
  rm -rf "$WORK/one_$r" "$WORK/two_$r"
  t0=$(date +%s.%N)
  CUDA_VISIBLE_DEVICES=0 python3 -m superdiff_protein.cli.generate $ARGS out_dir="$WORK/one_$r" > "$WORK/one_$r.log" 2>&1
  t1=$(date +%s.%N)
  torchrun --standalone --nproc_per_node=2 -m superdiff_protein.cli.generate $ARGS out_dir="$WORK/two_$r" > "$WORK/two_$r.log" 2>&1
  t2=$(date +%s.%N)
  echo "$r $t0 $t1 $t2" >> "$WORK/times.txt"
  last=$((SECONDS - rs))
  echo "repeat $r: one GPU $(python3 -c "print(round($t1-$t0,1))") s, two GPUs $(python3 -c "print(round($t2-$t1,1))") s"
done
python3 - "$WORK" "$OUTDIR/multigpu.json" "$SAMPLES" "$STEPS" "${LENGTH:-100}" "$*" "${BATCH:-16}" "${COMPILE:-auto} ${EXTRA:-}" "${WARM:-}" <<'PY'
import hashlib, json, re, statistics, sys
from datetime import datetime, timezone
from pathlib import Path
import torch
work, out = Path(sys.argv[1]), Path(sys.argv[2])
timer = re.compile(r"generate_backbones: (\d+) sample\(s\) generated.* in ([\d.]+) s")
# compile warm-ups inside the timer, per device ("compile: <model> ready for batch x length B x L on cuda:K in X s")
warm = re.compile(r"compile: \S+ ready for batch x length [\d x]+ on (\S+) in ([\d.]+) s")
def warmups(log):
    per = {}
    for dev, s in warm.findall(log.read_text()):
        per[dev] = round(per.get(dev, 0.0) + float(s), 2)
    return per
pdbs = lambda d: {p.relative_to(d): p.read_bytes() for p in d.rglob("sample_*.pdb")}
ref = pdbs(work / "one_1")
reps = []
for line in (work / "times.txt").read_text().split("\n"):
    if not line.strip():
        continue
    r, t0, t1, t2 = line.split()
    t0, t1, t2 = map(float, (t0, t1, t2))
    one, two = work / f"one_{r}", work / f"two_{r}"
    a, b = pdbs(one), pdbs(two)
    tim = lambda d: [(int(n), float(s)) for n, s in timer.findall((work / f"{d}.log").read_text())]
    rows = lambda d: len((d / "samples.csv").read_text().splitlines()) - 1
    t_one, t_two = tim(f"one_{r}"), tim(f"two_{r}")
    reps.append(dict(repeat=int(r), pdbs_one_gpu=len(a), pdbs_two_gpus=len(b),
                     identical_pdbs=sum(1 for k in a if b.get(k) == a[k]),
                     identical_to_repeat_1=sum(1 for k in a if ref.get(k) == a[k]),
                     sha256_one_gpu_pdbs=hashlib.sha256(b"".join(str(k).encode() + a[k] for k in sorted(a))).hexdigest(),
                     csv_rows=[rows(one), rows(two)], wall_s_one_gpu=round(t1 - t0, 2), wall_s_two_gpus=round(t2 - t1, 2),
                     sampler_s_one_gpu=[s for _, s in t_one], sampler_s_two_gpus_per_rank=[s for _, s in t_two],
                     samples_per_rank=[n for n, _ in t_two],
                     compile_s_one_gpu=warmups(work / f"one_{r}.log"), compile_s_two_gpus=warmups(work / f"two_{r}.log")))
def stat(xs):
    return dict(median=round(statistics.median(xs), 2), min=round(min(xs), 2), max=round(max(xs), 2), all=xs)
summary = dict(
    wall_s_one_gpu=stat([r["wall_s_one_gpu"] for r in reps]),
    wall_s_two_gpus=stat([r["wall_s_two_gpus"] for r in reps]),
    wall_speedup=stat([round(r["wall_s_one_gpu"] / r["wall_s_two_gpus"], 3) for r in reps]),
    sampler_s_one_gpu=stat([r["sampler_s_one_gpu"][0] for r in reps]),
    sampler_s_two_gpus_slowest_rank=stat([max(r["sampler_s_two_gpus_per_rank"]) for r in reps]),
    sampler_speedup=stat([round(r["sampler_s_one_gpu"][0] / max(r["sampler_s_two_gpus_per_rank"]), 3) for r in reps]),
    # compile warm-up inside the timer: one GPU's total, and the slowest device's under torchrun
    compile_s_one_gpu=stat([sum(r["compile_s_one_gpu"].values()) for r in reps]),
    compile_s_two_gpus_slowest_device=stat([max(r["compile_s_two_gpus"].values(), default=0.0) for r in reps]))
gpus = (work / "gpus.txt").read_text().strip().splitlines() if (work / "gpus.txt").exists() else []
res = dict(meta=dict(device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", gpus=gpus,
                     gpu_count=torch.cuda.device_count(), torch=torch.__version__,
                     date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     command=f"bash bench/bench_multigpu.sh {sys.argv[6]}".strip()),
           samples=int(sys.argv[3]), steps=int(sys.argv[4]), length=int(sys.argv[5]), batch_size=int(sys.argv[7]),
           compile=sys.argv[8].strip(), warm_cache_job=bool(sys.argv[9]), models=2,
           rule="or", precision="float32", repeats=len(reps), summary=summary, records=reps)
print(json.dumps(summary))
out.write_text(json.dumps(res, indent=1))
PY
