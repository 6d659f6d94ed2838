#!/usr/bin/env bash
# Feynman–Kac rules on the embedded default models, for the model card (models/checkpoints/README.md,
# "Feynman–Kac rules (issue 15)"). Reduced CPU protocol: one length, 16 samples per setting, 100 steps, seed 0.
#
#   bash scripts/fkc_model_card.sh gen core       # the core settings (two lanes of one thread each)
#   bash scripts/fkc_model_card.sh gen extra      # the optional ones (other betas, K = 16, strand, helix K = 1)
#   bash scripts/fkc_model_card.sh gen NAME...    # named settings of either list
#   bash scripts/fkc_model_card.sh eval           # evaluate + tables: python scripts/fkc_model_card.py
#
# Every run resumes (generate_backbones keeps finished samples / groups), so the script can be rerun.
# OUT (default runs/fkc_card), LENGTH (default 100), N (default 16) override the protocol.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-runs/fkc_card}
LENGTH=${LENGTH:-100}
N=${N:-16}
mkdir -p "$OUT/samples" "$OUT/logs"

# name | overrides (on top of the common ones below)
CORE=(
  "helix|rule=single single_index=0"
  "strand|rule=single single_index=1"
  "or|rule=or"
  "and|rule=and"
  "or_ns05|rule=or noise_scale=0.5 estimator=hutchinson"
  "product_k1|rule=product smc.group_size=1"
  "product_k4|rule=product smc.group_size=4"
  "anneal2_or_k4|rule=anneal anneal_of=or beta=2 smc.group_size=4"
  "anneal2_helix_k4|models=[default-helix] rule=anneal beta=2 smc.group_size=4"
)
EXTRA=(   # in order of priority (two lanes take every other entry)
  "anneal2_or_k16|rule=anneal anneal_of=or beta=2 smc.group_size=16"
  "anneal1.5_or_k4|rule=anneal anneal_of=or beta=1.5 smc.group_size=4"
  "anneal3_or_k4|rule=anneal anneal_of=or beta=3 smc.group_size=4"
  "helix_ns05|rule=single single_index=0 noise_scale=0.5"
  "anneal2_strand_k4|models=[default-strand] rule=anneal beta=2 smc.group_size=4"
  "product_k16|rule=product smc.group_size=16"
  "anneal2_helix_k1|models=[default-helix] rule=anneal beta=2 smc.group_size=1"
  "anneal2_or_k1|rule=anneal anneal_of=or beta=2 smc.group_size=1"
)

gen_one() {  # name overrides...
  local name=$1; shift
  local d="$OUT/samples/$name"
  local t0=$(date +%s)
  echo "[fkc_card] $(date -u +%H:%M:%S) start $name: $*" >&2
  OMP_NUM_THREADS=1 python -m superdiff_protein.cli.generate "$@" lengths=[$LENGTH] samples_per_length=$N \
      batch_size=$N num_steps=100 time_grid=uniform min_t=0.01 seed=0 device=cpu progress=false out_dir="$d" >"$OUT/logs/$name.log" 2>&1
  echo -e "$name\t$(( $(date +%s) - t0 ))\t$*" >>"$OUT/times.tsv"
  echo "[fkc_card] $(date -u +%H:%M:%S) done $name ($(( $(date +%s) - t0 )) s)" >&2
}

lane() {  # every other entry of the list, starting at $1
  local start=$1; shift
  local items=("$@")
  for ((k = start; k < ${#items[@]}; k += 2)); do
    local name=${items[k]%%|*} over=${items[k]#*|}
    # shellcheck disable=SC2086
    gen_one "$name" $over
  done
}

case "${1:-}" in
  gen)
    case "${2:-core}" in
      core) LIST=("${CORE[@]}") ;;
      extra) LIST=("${EXTRA[@]}") ;;
      *) LIST=()  # named settings, e.g. gen anneal2_helix_k1 helix_ns05
         for want in "${@:2}"; do
           for e in "${CORE[@]}" "${EXTRA[@]}"; do [[ ${e%%|*} == "$want" ]] && LIST+=("$e"); done
         done
         [[ ${#LIST[@]} -gt 0 ]] || { echo "gen core|extra|NAME...: no such setting" >&2; exit 2; } ;;
    esac
    lane 0 "${LIST[@]}" & p0=$!
    lane 1 "${LIST[@]}" & p1=$!
    wait $p0; wait $p1 ;;
  eval)
    shift
    python scripts/fkc_model_card.py --out "$OUT" --length "$LENGTH" "$@" ;;
  *) echo "usage: $0 gen core|extra|NAME... | eval [args]" >&2; exit 2 ;;
esac
