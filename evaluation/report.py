"""What a benchmark run writes: CSV tables, the environment line, and the markdown summary."""
from __future__ import annotations

import csv
import hashlib
import platform
import time
from pathlib import Path

import numpy as np

from evaluation.parity import FP16, fp16_overall


def _cell(text: str) -> str:
    """``text`` inside a markdown table cell (``|`` escaped)."""
    return str(text).replace("|", "\\|")


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` as CSV, columns in order of first appearance; nothing written for no rows."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def environment(weights: Path | None = None, canvas: tuple[int, int] = (800, 1344)) -> str:
    """One line: card, versions, the weights (``weights``: a state_dict file, named with the start of
    its sha256; None: seeded random, seed 0), the canvas and the time."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        import cupy

        cupy_v = cupy.__version__
    except ImportError:
        cupy_v = "absent"
    if weights is None:
        weights_text = "seeded random weights (seed 0)"
    else:
        digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:12]
        weights_text = f"weights {Path(weights).name} (sha256 {digest}...)"
    return (f"{gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}, cupy {cupy_v}, numpy {np.__version__}, "
            f"Python {platform.python_version()}; {weights_text}, canvas {canvas[0]}x{canvas[1]}; "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


def fp16_line(model: str, rows: list[dict]) -> str:
    """The fp16 criterion over all of ``model``'s accuracy rows, as one sentence."""
    matched, reference, ok = fp16_overall(rows)
    return (f"{model}: {matched} of {reference} detections matched over all images "
            f"({matched / max(reference, 1):.1%}; criterion >= {FP16.min_matched:.0%}: "
            f"{'met' if ok else '**not met**'})")


def summary_markdown(env: str, perf_rows: list[dict], breakdown_rows: list[dict], acc_rows: list[dict]) -> str:
    """summary.md of ``benchmarks.perf``: the throughput/latency table, the per-step breakdown, the
    accuracy table, and the fp16 criterion over all detections of each fp16 model."""
    lines = ["# fasterrcnn on Triton: torch-target ensemble vs torchvision eager", "", env, "",
             "## Throughput and latency (perf_analyzer, gRPC, 1 image per request; input as above)", "",
             "| model | concurrency | images/s | p50 ms | p99 ms |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in perf_rows:
        lines.append(f"| {r['model']} | {r['concurrency']} | {r['infer_per_s']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} |")
    lines += ["", "## Per-step breakdown (Triton statistics over each model's whole sweep)", "",
              "| run | step | requests | avg batch | queue ms/req | compute in ms/req | infer ms/exec "
              "| compute out ms/req |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in breakdown_rows:
        lines.append(f"| {r['run']} | {r['model']} | {r['requests']} | {r['avg_batch']} | "
                     f"{r['queue_ms_per_request']} | {r['compute_input_ms_per_request']} | "
                     f"{r['compute_infer_ms_per_execution']} | {r['compute_output_ms_per_request']} |")
    lines += ["", "## Accuracy against torchvision eager fp32 on the GPU", "",
              "| model | image | torchvision dets | ours | matched | extra | criterion | pass |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in acc_rows:
        lines.append(f"| {r['model']} | {r['image']} | {r['reference']} | {r['ours']} | {r['matched']} | "
                     f"{r['extra']} | {_cell(r['criterion'])} | {'yes' if r['pass'] else '**no**'} |")
    for model in dict.fromkeys(r["model"] for r in acc_rows if r["model"].endswith("fp16")):
        lines.append("\n" + fp16_line(model, [r for r in acc_rows if r["model"] == model]))
    lines += ["", "Requests are sent 4 at a time, so Triton batches them.  Only the ensemble rows are pass/fail: "
              "fp32 per image, fp16 over all detections, and fp16 only with a trained checkpoint (--weights; with "
              "seeded random weights near-tied scores make it informational, see docs/benchmarks.md).  "
              "The baseline rows are informational: torchvision pads a batch to its largest image, so an image's "
              "detections depend on what it is batched with (README, \"Why an image's detections don't depend on "
              "its batch\")."]
    return "\n".join(lines) + "\n"
