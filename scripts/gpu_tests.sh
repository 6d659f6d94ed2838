#!/usr/bin/env bash
# Run the GPU-marked tests (pytest -m gpu) on the device machine, official fixtures included.
#
#   bash scripts/gpu_tests.sh prepare     # here, once: ../shared/fixtures/official -> .gpu_fixtures (git-ignored,
#                                         # 6.4 MB; ../shared does not travel) and the Hydra wheels -> .whl
#   run(command="bash scripts/gpu_tests.sh run", carry=[".gpu_fixtures", ".whl"], timeout_s=420)
#
# `run` installs the carried wheels into /tmp/site when Hydra is missing (the GPU image has none), points
# SUPERDIFF_OFFICIAL_FIXTURES at .gpu_fixtures and writes the log to $OUT/gpu_tests.log (or ./gpu_tests.log).
# On a machine without CUDA every selected test skips cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
FILES=(${GPU_TEST_FILES:-tests/test_step_graph.py tests/test_compile.py tests/test_generate_cli.py tests/test_framediff_model.py})

prepare() {
  local src=${SUPERDIFF_OFFICIAL_FIXTURES:-../shared/fixtures/official}
  [ -d "$src" ] || { echo "error: no official fixtures at $src (set SUPERDIFF_OFFICIAL_FIXTURES)" >&2; exit 2; }
  rm -rf .gpu_fixtures.tmp && cp -r "$src" .gpu_fixtures.tmp && rm -rf .gpu_fixtures && mv .gpu_fixtures.tmp .gpu_fixtures
  ls .whl/hydra_core-*.whl >/dev/null 2>&1 || bash scripts/train_defaults.sh wheels
  du -sh .gpu_fixtures .whl
}

run_tests() {
  if ! $PY -c "import hydra, omegaconf" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  [ -d .gpu_fixtures ] && export SUPERDIFF_OFFICIAL_FIXTURES=$PWD/.gpu_fixtures
  local log=${OUT:-.}/gpu_tests.log
  set -o pipefail
  timeout "${GPU_TESTS_TIMEOUT:-380}" $PY -m pytest -m gpu -p no:cacheprovider -rA -q "${FILES[@]}" 2>&1 \
    | grep -v -E "^[WI][0-9]|DEBUG" | tee "$log"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run_tests ;;
  *) sed -n '2,10p' "$0"; exit 2 ;;
esac
