"""A tritonserver for one benchmark run: start it on free ports, warm its models up, keep its log.

The launcher itself is :class:`fasterrcnn.server.TritonServer`; this module adds what a benchmark
needs around it.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from fasterrcnn.server import TritonServer, free_port

log = logging.getLogger(__name__)

# Triton's CUDA memory pool: GPU tensors between python-backend steps larger than the pool are
# copied through host memory; FPN P2 of a batch of 8 at 800x1344 in fp32 is 550 MB.
POOL_BYTES = 4 << 30
# (concurrency, requests): from one at a time to the largest batches, so that every batch size's
# first call (CUDA graphs, cuDNN autotuning, allocator pools) happens before the measurement.
WARM_UP_ROUNDS = ((1, 2), (8, 24), (32, 64))


def start_server(repo: Path, mps: bool = False, timeout: float = 300.0) -> TritonServer:
    """tritonserver on ``repo``, on free ports, with a :data:`POOL_BYTES` CUDA pool (``mps``: under a
    CUDA MPS daemon of its own), ready when this returns."""
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                          cuda_pool_bytes=POOL_BYTES, mps=mps)
    t0 = time.monotonic()
    server.start(timeout=timeout)
    log.info("server on %s ready in %.0f s", Path(repo).name, time.monotonic() - t0)
    return server


def report_server_log(server: TritonServer, path: Path) -> list[str]:
    """Copy the server's log to ``path`` and log its error lines (the last 20); returns them all."""
    text = server.log_text()
    Path(path).write_text(text)
    errors = [ln for ln in text.splitlines() if ln[:1] == "E" or "Traceback" in ln or "Error" in ln]
    log.info("server log %s: %d error lines%s", path, len(errors), "".join("\n  " + e[:300] for e in errors[-20:]))
    return errors


def input_mode(choice: str, repo: Path | None = None) -> str:
    """``--input`` of the benchmark scripts: ``jpeg`` or ``raw`` as given; ``auto`` -> ``jpeg``, except
    where the ``fasterrcnn`` ensemble of ``repo`` takes TYPE_STRING under numpy 2, whose python-backend
    stub in this Triton build garbles string inputs (docs/benchmarks.md, "Input mode"): ``raw`` there."""
    if choice not in ("auto", "jpeg", "raw"):
        raise ValueError(f"input mode must be auto, jpeg or raw, got {choice!r}")
    if choice != "auto":
        return choice
    from evaluation.repositories import encoded_input_type
    from python_backend.triton_io import NUMPY2

    string_input = repo is None or encoded_input_type(repo) == "TYPE_STRING"
    return "raw" if NUMPY2 and string_input else "jpeg"


def decoder_lines(log_text: str, limit: int = 4) -> list[str]:
    """The distinct messages of a server log that name an image decoder (a step saying which one it
    uses: nvJPEG on the GPU, Pillow...), without Triton's line prefix; at most ``limit``."""
    seen: dict[str, None] = {}
    for line in log_text.splitlines():
        if re.search(r"decoder|nvjpeg", line, re.IGNORECASE) and not re.search(r"error|traceback", line, re.I):
            message = line.split("] ", 1)[-1].strip().strip('"')
            seen.setdefault(message[:200], None)
    return list(seen)[:limit]


def warm_up(client, model: str, payloads: list) -> None:
    """Send ``payloads`` round after round (:data:`WARM_UP_ROUNDS`).  Raises RuntimeError with the
    first failure, and a hint where encoded input was garbled by the numpy 2 stub."""
    from client.detect import infer_many

    for concurrency, n in WARM_UP_ROUNDS:
        items = [payloads[i % len(payloads)] for i in range(n)]
        bad = [r for r in infer_many(client, items, concurrency, model) if isinstance(r, Exception)]
        if bad:
            hint = ""
            if "not a decodable image" in str(bad[0]):
                hint = (" -- encoded (TYPE_STRING) input is garbled by this Triton build's python backend under "
                        "numpy 2; run with --input raw (docs/benchmarks.md, \"Input mode\")")
            raise RuntimeError(f"warm-up of {model} failed: {bad[0]}{hint}")
