#!/usr/bin/env bash
# Two GPUs vs one: the same seeds must give the same PDBs, and throughput should nearly double.
#   bash bench/bench_multigpu.sh [SAMPLES] [STEPS]      (on a machine with >= 2 GPUs; writes $OUT/multigpu.json)
# The GPU image lacks biotite/hydra/omegaconf: the slim copies in .gpu_bio/ (carried) are installed first.
set -euo pipefail
cd "$(dirname "$0")/.."
SAMPLES=${1:-128}
STEPS=${2:-100}
OUTDIR=${OUT:-/tmp/multigpu_out}
mkdir -p "$OUTDIR" /tmp/site
[ -n "${SKIP_INSTALL:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu_bio/*.whl
[ -n "${SKIP_INSTALL:-}" ] || tar xzf .gpu_bio/biotite_slim.tgz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONUNBUFFERED=1
nvidia-smi 2>/dev/null || true; : nvidia-smi --query-gpu=name --format=csv,noheader
python3 bench/make_random_checkpoints.py /tmp/ck --count 2
ARGS="models=[/tmp/ck/random_framediff_0.pth,/tmp/ck/random_framediff_1.pth] rule=or lengths=[${LENGTH:-100}] \
samples_per_length=$SAMPLES batch_size=16 num_steps=$STEPS seed=0 device=${DEVICE:-cuda} precision=float32 plots=false progress=false"
t0=$(date +%s.%N)
CUDA_VISIBLE_DEVICES=0 python3 -m superdiff_protein.cli.generate $ARGS out_dir=/tmp/one 2>&1 | tail -2
t1=$(date +%s.%N)
torchrun --standalone --nproc_per_node=2 -m superdiff_protein.cli.generate $ARGS out_dir=/tmp/two 2>&1 | tail -3
t2=$(date +%s.%N)
python3 - "$t0" "$t1" "$t2" "$OUTDIR/multigpu.json" "$SAMPLES" "$STEPS" <<'PY'
import json, sys
from pathlib import Path
t0, t1, t2 = map(float, sys.argv[1:4])
one, two = Path("/tmp/one"), Path("/tmp/two")
a = {p.relative_to(one): p.read_bytes() for p in one.rglob("sample_*.pdb")}
b = {p.relative_to(two): p.read_bytes() for p in two.rglob("sample_*.pdb")}
same = sum(1 for k in a if b.get(k) == a[k])
rows = lambda d: len((d / "samples.csv").read_text().splitlines()) - 1
res = dict(samples=int(sys.argv[5]), steps=int(sys.argv[6]), pdbs_one_gpu=len(a), pdbs_two_gpus=len(b),
           identical_pdbs=same, csv_rows=[rows(one), rows(two)], seconds_one_gpu=round(t1 - t0, 1),
           seconds_two_gpus=round(t2 - t1, 1), speedup=round((t1 - t0) / (t2 - t1), 2))
print(json.dumps(res))
Path(sys.argv[4]).write_text(json.dumps(res, indent=1))
PY
