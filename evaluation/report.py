"""What a benchmark run writes: CSV tables, the environment line, and the markdown summary."""
from __future__ import annotations

import csv
import hashlib
import platform
import time
from pathlib import Path

import numpy as np

from evaluation.parity import FP16, FP16_IMAGE_MIN, fp16_overall, worst_image


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


def gpu_name() -> str:
    """The name of CUDA device 0 as torch reports it ("NVIDIA H200", say), or "no GPU"."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def environment(weights: Path | None = None) -> str:
    """One line: card, versions, the weights (``weights``: a state_dict file, named with the start of
    its sha256; None: seeded random, seed 0) and the time."""
    import torch

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
    return (f"{gpu_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}, cupy {cupy_v}, "
            f"numpy {np.__version__}, Python {platform.python_version()}; {weights_text}; "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


def fp16_line(model: str, rows: list[dict]) -> str:
    """The fp16 criterion over all of ``model``'s accuracy rows, as one sentence."""
    matched, reference, ok = fp16_overall(rows)
    worst = worst_image(rows)
    worst_text = f", worst image {worst[0]} {worst[1]:.0%}" if worst else ""
    return (f"{model}: {matched} of {reference} detections matched over all images "
            f"({matched / max(reference, 1):.2%}{worst_text}; criterion >= {FP16.min_matched:.0%} and no image "
            f"< {FP16_IMAGE_MIN:.0%}: {'met' if ok else '**not met**'})")


def _number(v: float) -> str:
    """Four significant digits, whole numbers from 1000 on (no exponent)."""
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    align = ["---" if i == 0 or not isinstance(rows[0][i], (int, float)) else "---:" for i in range(len(header))] \
        if rows else ["---"] * len(header)
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    if not rows:
        out.append("| " + " | ".join(["none"] + [""] * (len(header) - 1)) + " |")
    for r in rows:
        out.append("| " + " | ".join(_number(v) if isinstance(v, float) else _cell(v) for v in r) + " |")
    return out


def perf_section(perf_rows: list[dict], eager_rows: list[dict], kinds: dict[str, str]) -> list[str]:
    """Best of each served run, every perf_analyzer row, and torchvision eager alone."""
    lines = ["## Throughput and latency", "",
             "Served: perf_analyzer over gRPC, one image per request, each run's best images/s over its "
             "concurrencies. Inputs: " + "; ".join(f"`{k}` = {v}" for k, v in kinds.items()) + ".", ""]
    runs = list(dict.fromkeys(r["run"] for r in perf_rows))
    best = []
    for run in runs:
        rows = [r for r in perf_rows if r["run"] == run]
        top = max(rows, key=lambda r: r["infer_per_s"])
        one = [r["p99_ms"] for r in rows if r["concurrency"] == 1]
        best.append([run, top["input"], top["infer_per_s"], top["concurrency"], one[0] if one else "-"])
    lines += _table(["run", "input", "best images/s", "at concurrency", "p99 ms at concurrency 1"], best)
    lines += ["", "torchvision eager alone (no server; only `model(images)` timed, images already on the GPU):", ""]
    lines += _table(["precision", "batch", "cuDNN autotuner", "memory cap GiB", "ms per image", "images/s"],
                    [[r["precision"], r["batch"], "on" if r["cudnn_benchmark"] else "off",
                      "none" if r.get("memory_cap_gib") is None else r["memory_cap_gib"], r["ms_per_image"],
                      r["images_per_s"]] for r in eager_rows])
    lines += ["", "Every perf_analyzer row:", ""]
    lines += _table(["run", "concurrency", "images/s", "p50 ms", "p99 ms"],
                    [[r["run"], r["concurrency"], r["infer_per_s"], r["p50_ms"], r["p99_ms"]] for r in perf_rows])
    return lines + [""]


def summary_markdown(env: str, goals_table: str, rec, kinds: dict[str, str]) -> str:
    """summary.md of ``benchmarks.perf``: the goals, throughput and latency, the per-step breakdown,
    the server's GPU memory, accuracy, the image decoders the servers named, and what was left out or
    failed (``rec``: an :class:`evaluation.bench.Record`)."""
    failed = [f"**{len(rec.failures)} stage(s) failed** (Left out and failed, below)", ""] if rec.failures else []
    lines = ["# fasterrcnn on Triton: torch-target ensemble vs torchvision", "", env, "", "## Goals", "",
             goals_table, *failed, *perf_section(rec.perf_rows, rec.eager_rows, kinds),
             "## Per-step breakdown (Triton statistics over each run's sweep)", "",
             "Each run's whole sweep (its averages mix every concurrency's), and its lowest and highest "
             "concurrency alone.", ""]
    lines += _table(["run", "step", "requests", "avg batch", "queue ms/req", "compute in ms/req", "infer ms/exec",
                     "compute out ms/req"],
                    [[r["run"], r["model"], r["requests"], r["avg_batch"], r["queue_ms_per_request"],
                      r["compute_input_ms_per_request"], r["compute_infer_ms_per_execution"],
                      r["compute_output_ms_per_request"]] for r in rec.breakdown_rows])
    lines += ["", "## GPU memory of the ensemble's server (nvidia-smi)", "",
              "Device delta: the card's memory in use minus what it was before the server started. Process "
              "sum: the server, its python-backend stubs and any MPS server.", ""]
    lines += _table(["precision", "when", "device delta MiB", "process sum MiB", "by process (MiB)"],
                    [[r["precision"], r["when"], r["device_delta_mib"], r["process_sum_mib"], r["by_process"]]
                     for r in rec.memory_rows])
    lines += ["", "## Accuracy against torchvision eager fp32 (TF32 off)", ""]
    lines += _table(["model", "image", "torchvision dets", "ours", "matched", "extra", "criterion", "pass"],
                    [[r["model"], r["image"], r["reference"], r["ours"], r["matched"], r["extra"], r["criterion"],
                      "yes" if r["pass"] else "**no**"] for r in rec.acc_rows])
    for model in dict.fromkeys(r["model"] for r in rec.acc_rows if "fp16" in r["model"] or "tf32" in r["model"]):
        lines.append("\n" + fp16_line(model, [r for r in rec.acc_rows if r["model"] == model]))
    lines += ["", "Requests are sent 4 at a time, so Triton batches them. The ensemble's fp32 rows are judged per "
              "image, fp16 over all detections (gated only with a trained checkpoint). Baseline rows are "
              "information: torchvision pads a batch to its largest image, so an image's detections depend on "
              "what it is batched with (README, \"Why an image's detections don't depend on its batch\").", "",
              "## Image decoders named in the server logs", ""]
    lines += [f"- {d}" for d in rec.decoders] or ["- none named"]
    lines += ["", "## Server logs (in the work folder)", ""] + [f"- {g}" for g in rec.server_logs]
    lines += ["", "## Left out and failed", ""]
    lines += [f"- left out: {n}" for n in rec.notes] + [f"- **failed**: {f}" for f in rec.failures]
    if not rec.notes and not rec.failures:
        lines.append("- nothing")
    return "\n".join(lines) + "\n"
