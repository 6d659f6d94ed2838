#!/usr/bin/env bash
# Train the two embedded default frame models (helix-rich and strand-rich halves of PDownB) on ONE GPU,
# both at once (two processes), in resumable chunks.  Recipe and rationale: docs/training.md.
#
#   bash scripts/train_defaults.sh chunk MINUTES    # on the GPU machine, repo root: train/resume both runs
#                                                   # for MINUTES wall-clock (<= 9), write results to $OUT
#   bash scripts/train_defaults.sh collect DIR      # here, after each chunk: DIR = the folder the chunk's
#                                                   # $OUT files came back to (files_at)
#   bash scripts/train_defaults.sh status           # steps / training minutes done so far
#   bash scripts/train_defaults.sh recipe [MINUTES] # print each run's base arguments (before EXTRA), start nothing
#   FINETUNE=1 bash scripts/train_defaults.sh chunk MINUTES   # the same, each run starting from its shipped
#                                                   # models/checkpoints/default_<subset>.pt (init_from=), or
#                                                   # from FINETUNE_FROM=<model.pth> when that is set
#   SUBSETS=all bash scripts/train_defaults.sh chunk MINUTES   # one run on every chain (data.subset=null):
#                                                   # the pre-training of a two-phase recipe (docs/training.md)
#   bash scripts/train_defaults.sh pack             # here: xz-compress data + resume state into .gpu_carry
#                                                   # (then carry=[".gpu_carry"]: .gpu_data exceeds the 64 MiB carry)
#   bash scripts/train_defaults.sh wheels           # here, once: hydra-core, omegaconf, antlr4 wheels into .whl
#                                                   # (train_frame_model needs Hydra; the GPU image has none)
#
# State between chunks lives in .gpu_data/runs/{helix,strand}/{last.ckpt,metrics.csv} (git-ignored; the first
# chunk carries .gpu_data, later ones the xz-compressed .gpu_carry from `pack`).  Full outputs of the last
# collected chunk: runs/defaults/{helix,strand}/ (model.pth = official FrameDiff container with the EMA
# weights, metrics.csv, config.yaml, loss_curve.png, train.log).
# Limits this is built for: a command <= 10 min, files back <= 8 x 16 MiB (last.ckpt is split in parts),
# carried tree <= 64 MiB (13 MB data + 2 x 22 MB resume state + 0.4 MB Hydra wheels: hence `pack`).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS_STATE=${RUNS_STATE:-.gpu_data/runs}
RUNS_OUT=${RUNS_OUT:-runs/defaults}
# SUBSETS="helix strand" (default) or "all" (one run on both halves), for every command
read -r -a SUBSETS <<<"${SUBSETS:-helix strand}"
PY=${PYTHON:-python3}

# The recipe (identical for both halves except data.subset).  Constant LR after warm-up + EMA: the step
# count a chunk reaches is set by the time budget.  Later phases (cosine decay, clash loss) come in through
# EXTRA (docs/training.md lists the exact values used for the shipped models).
recipe() {
  local subset=$1 minutes=$2 data_subset=$1
  # "all": every chain (data.subset=null); its state folder stays "all", where chunk/collect/pack look for it
  [ "$subset" = all ] && data_subset=null
  echo model=small seed=0 "data.path=.gpu_data/pdownb.pt" "data.subset=${data_subset}" \
       data.max_length=160 data.batch_size=64 data.num_workers=4 \
       max_steps=200000 "max_minutes=${minutes}" resume=true "out_dir=${RUNS_STATE}/${subset}" \
       experiment.learning_rate=0.0003 experiment.warmup_steps=300 experiment.ema_decay=0.999 \
       experiment.grad_clip=1.0 experiment.log_every=50 experiment.eval_every=500 experiment.eval_size=32 \
       experiment.ckpt_every_steps=2000 experiment.ckpt_every_minutes=3 \
       trainer.accelerator=gpu trainer.devices=1 trainer.precision=32-true trainer.tf32=true
}

chunk() {
  local minutes=${1:?usage: chunk MINUTES}
  : "${OUT:?OUT is not set (run this through the device tool)}"
  # a warm machine still has the newer state from the previous chunk: unpack only on a fresh one
  if [ -d .gpu_carry ] && [ ! -f .gpu_data/pdownb.pt ]; then unpack; fi
  export PYTHONUNBUFFERED=1
  # hydra-core and omegaconf (+ antlr4) are dependencies of train_frame_model but not on the GPU image: install the
  # carried pure-Python wheels (made here with `wheels`) into /tmp/site
  if ! $PY -c "import hydra, omegaconf" 2>/dev/null; then
    local w="" d
    for d in .gpu_data/whl .whl; do
      if ls "$d"/hydra_core-*.whl "$d"/omegaconf-*.whl "$d"/antlr4_python3_runtime-*.whl >/dev/null 2>&1; then w=$d; break; fi
    done
    if [ -z "$w" ]; then
      echo "error: hydra-core / omegaconf are not installed and no wheels were carried:" \
           "run 'bash scripts/train_defaults.sh wheels' here and carry .whl (or .gpu_data / .gpu_carry)" >&2
      return 2
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$w"/hydra_core-*.whl "$w"/omegaconf-*.whl "$w"/antlr4_python3_runtime-*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  local pids=() ngpu i=0
  # two GPUs or more: one run per GPU (one GPU: both runs share it)
  ngpu=$($PY -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
  for s in "${SUBSETS[@]}"; do
    mkdir -p "${RUNS_STATE}/${s}"
    # EXTRA="key=value ..." replaces recipe entries with the same key (smoke tests: EXTRA="model=tiny ...")
    local args=() kv
    for kv in $(recipe "$s" "$minutes"); do
      case " ${EXTRA:-} " in *" ${kv%%=*}="*) ;; *) args+=("$kv") ;; esac
    done
    # shellcheck disable=SC2206
    args+=(${EXTRA:-})
    # FINETUNE=1: start each run from its shipped checkpoint (ignored by a run that resumes from last.ckpt)
    if [ "${FINETUNE:-0}" = 1 ]; then args+=("init_from=${FINETUNE_FROM:-models/checkpoints/default_${s}.pt}"); fi
    if [ "$ngpu" -gt 1 ]; then export CUDA_VISIBLE_DEVICES=$((i % ngpu)); fi
    i=$((i + 1))
    $PY -m superdiff_protein.cli.train "${args[@]}" >"${RUNS_STATE}/${s}/train.log" 2>&1 &
    pids+=($!)
  done
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  for s in "${SUBSETS[@]}"; do
    echo "== ${s}"; tail -n 5 "${RUNS_STATE}/${s}/train.log" || true
    mkdir -p "${OUT}/${s}"
    if [ -f "${RUNS_STATE}/${s}/last.ckpt" ]; then
      split -b 15m -d "${RUNS_STATE}/${s}/last.ckpt" "${OUT}/${s}/last.ckpt.part-"
    fi
    tar -czf "${OUT}/${s}/meta.tar.gz" -C "${RUNS_STATE}/${s}" \
      $(cd "${RUNS_STATE}/${s}" && ls metrics.csv config.yaml train.log loss_curve.png 2>/dev/null)
  done
  return $rc
}

collect() {
  local src=${1:?usage: collect DIR (the folder the chunk files came back to)}
  for s in "${SUBSETS[@]}"; do
    [ -d "${src}/${s}" ] || { echo "no ${src}/${s}"; exit 1; }
    mkdir -p "${RUNS_STATE}/${s}" "${RUNS_OUT}/${s}"
    cat "${src}/${s}"/last.ckpt.part-* >"${RUNS_STATE}/${s}/.last.ckpt.tmp"
    mv "${RUNS_STATE}/${s}/.last.ckpt.tmp" "${RUNS_STATE}/${s}/last.ckpt"
    tar -xzf "${src}/${s}/meta.tar.gz" -C "${RUNS_OUT}/${s}"
    cp "${RUNS_OUT}/${s}/metrics.csv" "${RUNS_STATE}/${s}/metrics.csv"   # resumed runs append to it
    $PY -m superdiff_protein.cli.train export "${RUNS_STATE}/${s}/last.ckpt" "${RUNS_OUT}/${s}/model.pth"
    $PY -m superdiff_protein.cli.train plot "${RUNS_OUT}/${s}"
  done
  status
}

# Hydra's three pure-Python wheels for the GPU machine (0.4 MB; no internet there), into the git-ignored .whl:
# hydra-core and omegaconf as published, antlr4-python3-runtime 4.9.3 (an sdist only) built into a wheel here.
WHEELS_HYDRA=(hydra-core==1.3.8 omegaconf==2.3.1)
WHEEL_ANTLR=antlr4-python3-runtime==4.9.3
wheels() {
  mkdir -p .whl
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS_HYDRA[@]}"
  $PY -m pip wheel -q --no-deps -w .whl "$WHEEL_ANTLR"
  ls -l .whl/hydra_core-*.whl .whl/omegaconf-*.whl .whl/antlr4_python3_runtime-*.whl
}

# The carry limit is 64 MiB for the whole tree; the two resume states (2 x 22 MB) + data (13 MB) + the tracked
# files no longer fit uncompressed, so they travel xz-compressed in .gpu_carry and are unpacked on the device.
pack() {
  rm -rf .gpu_carry.tmp && mkdir -p .gpu_carry.tmp/whl
  cp .gpu_data/whl/*.whl .gpu_carry.tmp/whl/ 2>/dev/null || cp .whl/*.whl .gpu_carry.tmp/whl/ 2>/dev/null || true
  ls .gpu_carry.tmp/whl/hydra_core-*.whl >/dev/null 2>&1 || echo "warning: no Hydra wheels packed (run 'wheels' first)" >&2
  xz -6 -T2 -c .gpu_data/pdownb.pt >.gpu_carry.tmp/pdownb.pt.xz
  for s in "${SUBSETS[@]}"; do
    [ -f "${RUNS_STATE}/${s}/last.ckpt" ] || continue
    mkdir -p ".gpu_carry.tmp/runs/${s}"
    xz -6 -T2 -c "${RUNS_STATE}/${s}/last.ckpt" >".gpu_carry.tmp/runs/${s}/last.ckpt.xz"
    cp "${RUNS_STATE}/${s}/metrics.csv" ".gpu_carry.tmp/runs/${s}/" 2>/dev/null || true
  done
  rm -rf .gpu_carry && mv .gpu_carry.tmp .gpu_carry
  du -sh .gpu_carry
}

unpack() {
  mkdir -p .gpu_data/whl
  cp .gpu_carry/whl/*.whl .gpu_data/whl/ 2>/dev/null || true
  $PY -c '
import lzma, pathlib, shutil
for src in pathlib.Path(".gpu_carry").rglob("*.xz"):
    dst = pathlib.Path(".gpu_data") / src.relative_to(".gpu_carry").with_suffix("")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(src) as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo)
    print("unpacked", dst)
'
  local s
  for s in "${SUBSETS[@]}"; do
    if [ -f ".gpu_carry/runs/${s}/metrics.csv" ]; then cp ".gpu_carry/runs/${s}/metrics.csv" "${RUNS_STATE}/${s}/"; fi
  done
}

status() {
  for s in "${SUBSETS[@]}"; do
    local f="${RUNS_STATE}/${s}/last.ckpt"
    if [ -f "$f" ]; then
      $PY - "$f" "$s" <<'EOF'
import sys, torch
ck = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
print(f"{sys.argv[2]}: step {ck['global_step']}, training minutes {ck.get('superdiff_train_seconds', 0) / 60:.1f}")
EOF
    else
      echo "${s}: not started"
    fi
  done
}

case "${1:-}" in
  chunk) shift; chunk "$@" ;;
  collect) shift; collect "$@" ;;
  status) status ;;
  recipe) shift; for s in "${SUBSETS[@]}"; do echo "${s}: $(recipe "$s" "${1:-8}")"; done ;;   # dry run: the arguments
  pack) pack ;;
  wheels) wheels ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
