"""perf_analyzer, driven one concurrency at a time: its real-input JSON, its command, its CSV row.

The binary is ``$PERF_ANALYZER_BIN`` or ``perf_analyzer`` on PATH.  Every run sends one image per
request over gRPC and measures in time windows of ``window_ms``; ``--stability-percentage 100``
makes any consecutive windows count as stable, so a run's length is bounded by the windows, not by
waiting for figures to converge.
"""
from __future__ import annotations

import base64
import csv
import json
import logging
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from python_backend import names

log = logging.getLogger(__name__)


def binary() -> str:
    return os.environ.get("PERF_ANALYZER_BIN") or "perf_analyzer"


def unavailable(path: str) -> str | None:
    """Why perf_analyzer ``path`` can't be run here (a sentence), or None where it is found."""
    if shutil.which(path) is None:
        return (f"perf_analyzer not found ({path!r}; set PERF_ANALYZER_BIN or put it on PATH; the PyPI wheel "
                "perf-analyzer needs glibc 2.38)")
    return None


@dataclass
class PerfSettings:
    binary: str
    url: str  # gRPC host:port
    input_data: Path  # from write_input_data
    window_ms: int = 1500
    max_trials: int = 4
    timeout_s: float = 90.0


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def input_entry(item, bytes_type: str = "TYPE_UINT8") -> dict:
    """One perf_analyzer data entry (perf_analyzer's docs/input_data.md, "Real Input Data").

    Encoded bytes go to the ``fasterrcnn`` ensemble's ``image``: with ``bytes_type`` "TYPE_UINT8"
    (dims ``[-1]``) as ``{"content": {"b64": <the bytes>}, "shape": [n]}``; with "TYPE_STRING" (dims
    ``[1]``) as one BYTES element, ``{"b64": <4-byte little-endian length + the bytes>}``.  A decoded
    ``[H, W, 3]`` uint8 array goes to ``image_raw`` as ``{"content": {"b64": <its bytes>}, "shape":
    [H, W, 3]}``.  Shapes leave out the batch axis (requests of batch 1, ``-b 1``).
    """
    if isinstance(item, (bytes, bytearray)):
        if bytes_type == "TYPE_UINT8":
            return {names.IMAGE_BYTES: {"content": {"b64": _b64(bytes(item))}, "shape": [len(item)]}}
        if bytes_type == "TYPE_STRING":
            return {names.IMAGE_BYTES: {"b64": _b64(struct.pack("<I", len(item)) + bytes(item))}}
        raise ValueError(f"encoded input type must be TYPE_UINT8 or TYPE_STRING, got {bytes_type!r}")
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
            raise ValueError(f"a decoded payload is a [H, W, 3] uint8 array, got {item.dtype} {list(item.shape)}")
        return {names.IMAGE_RAW: {"content": {"b64": _b64(np.ascontiguousarray(item).tobytes())},
                                  "shape": list(item.shape)}}
    raise TypeError(f"a payload is encoded bytes or a uint8 array, got {type(item).__name__}")


def write_input_data(path: Path, items: list, bytes_type: str = "TYPE_UINT8") -> Path:
    """perf_analyzer's real-input JSON, one entry per payload (:func:`input_entry`), which it sends
    round-robin."""
    Path(path).write_text(json.dumps({"data": [input_entry(item, bytes_type) for item in items]}))
    return Path(path)


def command(ps: PerfSettings, model: str, concurrency: int, csv_path: Path) -> list[str]:
    """The perf_analyzer command line of one run at one concurrency, writing its CSV to ``csv_path``."""
    return [ps.binary, "-m", model, "-i", "grpc", "-u", ps.url, "--input-data", str(ps.input_data), "-b", "1",
            "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-mode", "time_windows",
            "--measurement-interval", str(ps.window_ms), "--stability-percentage", "100",
            "--max-trials", str(ps.max_trials), "-f", str(csv_path)]


def run_perf(ps: PerfSettings, model: str, concurrency: int, csv_path: Path) -> dict | None:
    """One perf_analyzer run at one concurrency: its CSV row as a dict, or None (logged) if it
    failed or ran past ``ps.timeout_s``."""
    try:
        proc = subprocess.run(command(ps, model, concurrency, csv_path), capture_output=True, text=True,
                              timeout=ps.timeout_s)
    except subprocess.TimeoutExpired:
        log.error("perf_analyzer %s c=%d timed out after %.0f s", model, concurrency, ps.timeout_s)
        return None
    if proc.returncode != 0 or not Path(csv_path).is_file():
        log.error("perf_analyzer %s c=%d failed (%d):\n%s", model, concurrency, proc.returncode,
                  (proc.stdout + proc.stderr)[-2500:])
        return None
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("Concurrency")]
    return rows[-1] if rows else None


def perf_row(labels: dict, raw: dict) -> dict:
    """A perf_analyzer CSV row (latencies in microseconds) -> the result table's row (milliseconds),
    after ``labels`` (which model, precision, input...)."""
    def ms(key: str) -> float:
        return float(raw.get(key, "nan")) / 1e3

    return {**labels, "concurrency": int(raw["Concurrency"]), "infer_per_s": float(raw["Inferences/Second"]),
            "p50_ms": ms("p50 latency"), "p90_ms": ms("p90 latency"), "p99_ms": ms("p99 latency"),
            "avg_ms": ms("Avg latency"), "server_queue_ms": ms("Server Queue"),
            "server_compute_infer_ms": ms("Server Compute Infer")}
