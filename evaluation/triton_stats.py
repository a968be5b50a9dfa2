"""Per-step times from Triton's inference statistics, read before and after a measurement.

Triton's statistics are cumulative counts and nanoseconds per model; the difference of two
snapshots gives what happened in between: requests, executions (batches), and the time per request
in the queue, in compute_input / compute_infer / compute_output, and per execution in compute_infer.
"""
from __future__ import annotations


def stats_snapshot(client) -> dict[str, dict]:
    """{model name: its statistics as JSON} for every model of the server (``client``: tritonclient gRPC)."""
    raw = client.get_inference_statistics(model_name="", as_json=True)
    return {m["name"]: m for m in raw.get("model_stats", [])}


def _count_ns(d: dict, key: str) -> tuple[int, int]:
    v = d.get("inference_stats", {}).get(key, {})
    return int(v.get("count", 0)), int(v.get("ns", 0))


def _batch_infer(d: dict) -> tuple[int, int]:
    """Executions and their total compute_infer ns, from the per-batch-size statistics."""
    n = ns = 0
    for b in d.get("batch_stats", []):
        c = b.get("compute_infer", {})
        n += int(c.get("count", 0))
        ns += int(c.get("ns", 0))
    return n, ns


def _ms_per(ns: int, count: int) -> float:
    return round(ns / max(count, 1) / 1e6, 3)


def breakdown(before: dict, after: dict, models) -> list[dict]:
    """Per model of ``models``, between two :func:`stats_snapshot`: requests, executions, average
    batch (requests per execution), milliseconds per request in each stage, compute_infer
    milliseconds per execution, and Triton's ``fail`` count."""
    rows = []
    for m in models:
        a, b = after.get(m, {}), before.get(m, {})
        req = int(a.get("inference_count", 0)) - int(b.get("inference_count", 0))
        exe = int(a.get("execution_count", 0)) - int(b.get("execution_count", 0))
        row = {"model": m, "requests": req, "executions": exe, "avg_batch": round(req / exe, 2) if exe else 0.0}
        for key in ("queue", "compute_input", "compute_infer", "compute_output"):
            (c1, n1), (c0, n0) = _count_ns(a, key), _count_ns(b, key)
            row[f"{key}_ms_per_request"] = _ms_per(n1 - n0, c1 - c0)
        (e1, n1), (e0, n0) = _batch_infer(a), _batch_infer(b)
        row["compute_infer_ms_per_execution"] = _ms_per(n1 - n0, e1 - e0)
        row["failed"] = _count_ns(a, "fail")[0] - _count_ns(b, "fail")[0]
        rows.append(row)
    return rows
