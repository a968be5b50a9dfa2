# Sourced by the benchmarks/*_h100.sh scripts: the repository root as the working folder, $OUT made
# (default ./out/$1), unbuffered Python, the device bundle (tritonserver, perf_analyzer, wheels), $PY.
# Usage inside a script: source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh" <default out folder name>
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT="${OUT:-$PWD/out/$1}"
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
# shellcheck disable=SC1091
source .device/setup.sh || { echo "no .device/setup.sh: run bash ../shared/tools/device-bundle.sh first"; exit 2; }
PY="${PYTHON:-python3}"
