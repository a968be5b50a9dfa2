# Sourced by the benchmarks/*_h100.sh scripts: the repository root as the working folder (the
# scripts run `python -m benchmarks.<name>` from there), $OUT made (default ./out/$1), unbuffered
# Python, the tritonserver and perf_analyzer binaries, $PY.
# The binaries: TRITONSERVER_BIN (+ TRITON_BACKEND_DIR) and PERF_ANALYZER_BIN set by the caller, or a
# git-ignored .device/setup.sh that sets them (and puts missing Python wheels on PYTHONPATH).
# Usage inside a script: source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh" <default out folder name>
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT="${OUT:-$PWD/out/$1}"
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
if [ -f .device/setup.sh ]; then
  # shellcheck disable=SC1091
  source .device/setup.sh || { echo ".device/setup.sh failed"; exit 2; }
elif [ -z "${TRITONSERVER_BIN:-}" ] || [ -z "${PERF_ANALYZER_BIN:-}" ]; then
  echo "no .device/setup.sh, and TRITONSERVER_BIN / PERF_ANALYZER_BIN are not set: say where the binaries are"
  exit 2
fi
PY="${PYTHON:-python3}"
