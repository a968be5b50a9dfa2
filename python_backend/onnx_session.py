"""ONNX Runtime sessions on the CPU, with a stated number of threads.

ONNX Runtime's own default is one intra-op thread per core, each spinning while it waits for work.
Where several processes share the cores (a tritonserver's step instances, parallel test processes)
that oversubscribes them, so the count can be set: ``threads`` when given (a config's
``intra_op_thread_count`` parameter, the name Triton's onnxruntime backend uses), else
``OMP_NUM_THREADS`` when it is set (the variable torch reads for its own threads), else ONNX
Runtime's default.
"""
from __future__ import annotations

import os
from pathlib import Path

THREADS_PARAMETER = "intra_op_thread_count"


def cpu_threads(threads: int | str | None = None) -> int:
    """The intra-op thread count to ask for: 0 is ONNX Runtime's default (one per core)."""
    value = threads if threads not in (None, "") else os.environ.get("OMP_NUM_THREADS", "0")
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"{THREADS_PARAMETER} must be a whole number of threads, got {value!r}") from None
    if count < 0:
        raise ValueError(f"{THREADS_PARAMETER} must be 0 (one per core) or more, got {count}")
    return count


def open_session(path: str | Path, threads: int | str | None = None):
    """An ``onnxruntime.InferenceSession`` of ``path`` on the CPU execution provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_threads(threads)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
