#!/usr/bin/env bash
# One round of fine-tuning on the models' own sampled states, several runs at once on one GPU
# (docs/training.md, "Training on the model's own states"). On the GPU machine, in the repo root:
#
#   OUT=... bash scripts/self_state_round.sh RUN [RUN ...]
#   RUN = name:half:init:key=value,key=value     e.g.  hr1:helix:models/checkpoints/default_helix.pt:experiment.self_state_weight=1
#
# For every distinct init it first writes a refined self-state pool (scripts/collect_self_states.py --refine, the
# pools in parallel), then trains all runs in parallel from their init on their half (the recipe of
# scripts/train_defaults.sh plus the fine-tune settings below and the run's own key=values), exports each run's
# EMA weights and packs $OUT/<name>.tar.gz (model.pth, metrics.csv, train.log, config.yaml) and $OUT/pools.log.
# One file per run: a device call returns at most 8 files.
# Environment: MINUTES (training wall-clock, default 6), MAX_STEPS (cosine schedule length, 700), PER_LENGTH (32),
# LENGTHS (of the sampled chains, 50 60 ... 160), DEVICE (of the collection, cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?OUT is not set (run this through the device tool)}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
MINUTES=${MINUTES:-6}
MAX_STEPS=${MAX_STEPS:-700}
PER_LENGTH=${PER_LENGTH:-32}
LENGTHS=${LENGTHS:-50 60 70 80 90 100 110 120 130 140 150 160}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-runs/self_state_round}
mkdir -p "$WORK/pools"

if ! $PY -c "import hydra, omegaconf" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# the fine-tune settings shared by every run (session 18's, docs/training.md); a run's key=values replace them
FT="experiment.lr_schedule=cosine experiment.warmup_steps=50 experiment.min_lr_ratio=0.1 max_steps=${MAX_STEPS}
experiment.learning_rate=0.0001 experiment.bond_loss_weight=4.0 data.num_workers=3 experiment.self_state_batch=32"
declare -A DATA=([helix]=.gpu_data/pdownb_hcap.pt [strand]=.gpu_data/pdownb.pt)
declare -A CLASH=([helix]=1.0 [strand]=4.0)

pool_of() { echo "$WORK/pools/$(echo "$1" | md5sum | cut -c1-12).pt"; }

# 1. one refined pool per distinct init, in parallel
declare -A SEEN=()
pids=()
for spec in "$@"; do
  IFS=: read -r name half init extra <<<"$spec"
  [ -f "$init" ] || { echo "error: $name: no init checkpoint $init" >&2; exit 2; }
  [ -n "${DATA[$half]:-}" ] || { echo "error: $name: half must be helix or strand, got $half" >&2; exit 2; }
  p=$(pool_of "$init")
  if [ -z "${SEEN[$p]:-}" ] && [ ! -f "$p" ]; then
    SEEN[$p]=1
    $PY scripts/collect_self_states.py "$init" "$p" --lengths $LENGTHS \
      --per-length "$PER_LENGTH" --keep 8 --refine --device "$DEVICE" >"$p.log" 2>&1 &
    pids+=($!)
  fi
done
for p in "${pids[@]}"; do wait "$p"; done
for f in "$WORK"/pools/*.log; do echo "== $f"; grep -v "it/s\]$\|batch/s\]$" "$f" | tr '\r' '\n' | grep -v "%|" ; done \
  | tee "$OUT/pools.log"

# 2. the runs, in parallel
pids=()
for spec in "$@"; do
  IFS=: read -r name half init extra <<<"$spec"
  dir="$WORK/$name"; rm -rf "$dir"; mkdir -p "$dir"
  mine="$FT experiment.clash_loss_weight=${CLASH[$half]} data.path=${DATA[$half]} init_from=$init"
  mine="$mine experiment.self_state_path=$(pool_of "$init") out_dir=$dir max_minutes=$MINUTES resume=false"
  mine="$mine ${extra//,/ }"
  args=()
  for kv in $(SUBSETS=$half bash scripts/train_defaults.sh recipe "$MINUTES" | cut -d' ' -f2-) $mine; do
    args=("${args[@]/#${kv%%=*}=*/}")    # a later key=value replaces an earlier one
    args+=("$kv")
  done
  $PY -m superdiff_protein.cli.train $(printf '%s ' "${args[@]}") >"$dir/train.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done

# 3. export and pack, one file per run
for spec in "$@"; do
  IFS=: read -r name _ <<<"$spec"
  dir="$WORK/$name"
  echo "== $name"; tail -n 3 "$dir/train.log" || true
  if [ -f "$dir/last.ckpt" ]; then
    $PY -m superdiff_protein.cli.train export "$dir/last.ckpt" "$dir/model.pth" >/dev/null
  fi
  tar -czf "$OUT/$name.tar.gz" -C "$dir" $(cd "$dir" && ls model.pth metrics.csv train.log config.yaml 2>/dev/null)
done
exit $rc
