#!/usr/bin/env bash
# COCO box mAP on one GPU: the served detector (torch target, per precision) beside torchvision with the
# same checkpoint (fp32, and fp16 autocast for a served fp16), through `fasterrcnn evaluate`, on the
# generated-scene dataset (benchmarks.coco_scenes) with a checkpoint trained on those scenes.
# Usage, from the repository root on the GPU machine (binaries as benchmarks/device_env.sh says):
#   OUT=/some/dir bash benchmarks/accuracy_map_gpu.sh
# Knobs (environment): PRECISIONS (fp32,fp16), IMAGES (100 held-out scenes), FORMAT (jpeg | png),
# WEIGHTS (a checkpoint instead of training one), TRAIN_STEPS (480), TRAIN_SECONDS (150), WORK.
# Writes to $OUT: map_<served>_vs_<reference>.json (evaluate --json) and map.md (the table).
set -uo pipefail
# shellcheck source=benchmarks/device_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh" accuracy_map
WORK="${WORK:-/tmp/fasterrcnn_map}"
PRECISIONS="${PRECISIONS:-fp32,fp16}"
IMAGES="${IMAGES:-100}"
FORMAT="${FORMAT:-jpeg}"
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PY" -c 'import torch, torchvision, pycocotools, numpy; print("torch", torch.__version__, "torchvision", torchvision.__version__, "numpy", numpy.__version__)' | tee -a "$OUT/gpu.txt"
rc=0
weights="${WEIGHTS:-$WORK/synthetic.pt}"
if [ ! -f "$weights" ]; then
  timeout $((${TRAIN_SECONDS:-150} + 90)) "$PY" -m benchmarks.train_synthetic --out "$weights" \
    --steps "${TRAIN_STEPS:-480}" --seconds "${TRAIN_SECONDS:-150}" --check-images 0 || exit 1
fi
"$PY" -m benchmarks.coco_scenes --out "$WORK/scenes" --images "$IMAGES" --format "$FORMAT" || exit 1
echo "| served | torchvision | served AP | torchvision AP | served AP50 | torchvision AP50 | images |" > "$OUT/map.md"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: |" >> "$OUT/map.md"
for precision in ${PRECISIONS//,/ }; do
  repo="$WORK/repo_$precision"
  "$PY" -m fasterrcnn export --weights "$weights" --class-names "$WORK/scenes/class_names.txt" --target torch \
    --device gpu --precision "$precision" --repository "$repo" || { rc=1; continue; }
  # serve what was exported (its provenance records every option); SIGTERM drains and stops it
  "$PY" -m fasterrcnn serve --repository "$repo" > "$OUT/serve_$precision.log" 2>&1 &
  server=$!
  if ! "$PY" -c 'import sys; from fasterrcnn.server import wait_ready; sys.exit(0 if wait_ready("127.0.0.1:8001", lambda: False, 400) else 1)'; then
    echo "the $precision server was not ready"; kill -TERM "$server"; wait "$server"; rc=1; continue
  fi
  references=fp32
  [ "$precision" = fp16 ] && references="fp32 fp16"
  for reference in $references; do
    out="$OUT/map_${precision}_vs_${reference}.json"
    "$PY" -m fasterrcnn evaluate --annotations "$WORK/scenes/instances.json" --images "$WORK/scenes/images" \
      --repository "$repo" --results "$WORK/detections_${precision}.json" --reference --reference-device cuda \
      --reference-precision "$reference" --json --no-progress > "$out" || rc=1
    "$PY" - "$out" "$precision" "$reference" >> "$OUT/map.md" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s, t = r["served"], r["reference"]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {s['AP']:.4f} | {t['AP']:.4f} | {s['AP50']:.4f} | {t['AP50']:.4f} | {r['images']} |")
PY
  done
  kill -TERM "$server"
  wait "$server"
done
cat "$OUT/map.md"
exit $rc
