"""The stages of a benchmark run on one server (evaluation/bench.py), with the server's client,
perf_analyzer and the warm-up replaced by stand-ins: what is measured, labelled and recorded when
every stage works, and when one fails."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from evaluation import bench, perf_analyzer
from evaluation.parity import FP16, Detections


def dets(n: int) -> Detections:
    boxes = np.array([[10.0 * i, 0, 10.0 * i + 8, 8] for i in range(n)], np.float32)
    return Detections(boxes, np.linspace(0.9, 0.5, n).astype(np.float32), np.ones(n, np.int64))


@pytest.fixture
def stand_ins(monkeypatch):
    """perf_analyzer answers with a row whose throughput is 10 x the concurrency, except on models in
    ``broken`` (None, as a failed run); warm-up fails on models in ``cold``; statistics count calls."""
    calls = {"perf": [], "warm": [], "stats": 0}
    broken, cold = set(), set()

    def run_perf(ps, model, concurrency, csv_path):
        calls["perf"].append((model, concurrency, ps.input_data, ps.url))
        if model in broken:
            return None
        return {"Concurrency": str(concurrency), "Inferences/Second": str(10.0 * concurrency),
                "p50 latency": "1000", "p99 latency": "2000"}

    def warm_up(client, model, payloads):
        calls["warm"].append((model, len(payloads)))
        if model in cold:
            raise RuntimeError(f"warm-up of {model} failed: bad input image: no")

    def snapshot(client):
        calls["stats"] += 1
        return {"rpn": {"inference_count": str(8 * calls["stats"]), "execution_count": str(2 * calls["stats"])}}

    monkeypatch.setattr(perf_analyzer, "run_perf", run_perf)
    monkeypatch.setattr(bench.server, "warm_up", warm_up)
    monkeypatch.setattr(bench.triton_stats, "stats_snapshot", snapshot)
    monkeypatch.setattr(bench.accuracy, "served_detections",
                        lambda client, model, payloads: {k: dets(9 if model == "lossy" else 10) for k in payloads})
    return calls, broken, cold


def plan(tmp_path, perf=True):
    ps = perf_analyzer.PerfSettings("pa", "", tmp_path, 500, 2) if perf else None
    return bench.Plan(ps, {"raw": tmp_path / "raw.json", "jpeg": tmp_path / "jpeg.json"},
                      {"raw": [1, 2], "jpeg": [3]}, tmp_path, "" if perf else "no perf_analyzer")


def target(model="fasterrcnn"):
    reference = {"a": dets(10), "b": dets(10)}
    return bench.Target({"model": "ensemble", "precision": "fp16"},
                        {"raw": bench.Sweep(model + "_raw", [1, 4], ("rpn",)), "jpeg": bench.Sweep(model, [2])},
                        [bench.Check("ensemble_fp16", "lossy", {"a": b"", "b": b""}, reference, FP16)])


def test_a_target_is_warmed_checked_swept_and_labelled(stand_ins, tmp_path):
    calls, _, _ = stand_ins
    rec = bench.Record()
    bench.measure_target(rec, client=None, url="127.0.0.1:9", target=target(), plan=plan(tmp_path))
    assert calls["warm"] == [("fasterrcnn_raw", 2), ("fasterrcnn", 1)]
    # each kind with its own input file, on the server's address
    assert calls["perf"] == [("fasterrcnn_raw", 1, tmp_path / "raw.json", "127.0.0.1:9"),
                             ("fasterrcnn_raw", 4, tmp_path / "raw.json", "127.0.0.1:9"),
                             ("fasterrcnn", 2, tmp_path / "jpeg.json", "127.0.0.1:9")]
    assert [(r["run"], r["input"], r["concurrency"], r["infer_per_s"]) for r in rec.perf_rows] == [
        ("ensemble_fp16", "raw", 1, 10.0), ("ensemble_fp16", "raw", 4, 40.0), ("ensemble_fp16_jpeg", "jpeg", 2, 20.0)]
    assert all(r["model"] == "ensemble" and r["precision"] == "fp16" for r in rec.perf_rows)
    # 9 of 10 detections served on each image: 90% < the FP16 criterion's 97%
    assert [(r["image"], r["matched"], r["reference"]) for r in rec.acc_rows] == [("a", 9, 10), ("b", 9, 10)]
    # one breakdown per sweep, over the sweep's model and steps, and one each of its lowest and
    # highest concurrency alone: the stand-in's statistics grow by 8 requests in 2 executions per
    # snapshot, so each concurrency alone counts 8 requests and the sweep (the first snapshot and the
    # last, with four between) 40
    assert [(r["run"], r["model"]) for r in rec.breakdown_rows] == [
        ("ensemble_fp16 at concurrency 1", "fasterrcnn_raw"), ("ensemble_fp16 at concurrency 1", "rpn"),
        ("ensemble_fp16 at concurrency 4", "fasterrcnn_raw"), ("ensemble_fp16 at concurrency 4", "rpn"),
        ("ensemble_fp16", "fasterrcnn_raw"), ("ensemble_fp16", "rpn"),
        ("ensemble_fp16_jpeg at concurrency 2", "fasterrcnn"), ("ensemble_fp16_jpeg", "fasterrcnn")]
    assert [(r["requests"], r["avg_batch"]) for r in rec.breakdown_rows if r["model"] == "rpn"] == [
        (8, 4.0), (8, 4.0), (40, 4.0)]
    assert rec.failures == []


def test_a_failed_stage_is_recorded_and_the_others_still_run(stand_ins, tmp_path):
    calls, broken, cold = stand_ins
    broken.add("fasterrcnn_raw")
    cold.add("fasterrcnn")
    rec = bench.Record()
    bench.measure_target(rec, None, "u", target(), plan(tmp_path))
    # the encoded kind never warmed up: not swept; the decoded kind's two runs failed
    assert [m for m, *_ in calls["perf"]] == ["fasterrcnn_raw", "fasterrcnn_raw"]
    assert rec.perf_rows == [] and len(rec.acc_rows) == 2
    assert rec.failures == ["ensemble_fp16_jpeg: warm-up of fasterrcnn failed: bad input image: no",
                            "perf_analyzer ensemble_fp16 at concurrency 1 failed (the log above says why)",
                            "perf_analyzer ensemble_fp16 at concurrency 4 failed (the log above says why)"]


def test_without_perf_analyzer_only_accuracy_runs(stand_ins, tmp_path):
    calls, _, _ = stand_ins
    rec = bench.Record()
    bench.measure_target(rec, None, "u", target(), plan(tmp_path, perf=False))
    assert calls["warm"] == [] and calls["perf"] == [] and rec.perf_rows == [] and rec.breakdown_rows == []
    assert len(rec.acc_rows) == 2 and rec.failures == []


def test_run_names():
    t = bench.Target({"model": "baseline", "precision": "fp32", "variant": "i2b16d0"}, {})
    assert t.run_name("raw") == "baseline_fp32_i2b16d0" and t.run_name("jpeg12mp") == "baseline_fp32_i2b16d0_jpeg12mp"


def test_perf_script_arguments(capsys):
    from benchmarks.perf import parse_args

    args = parse_args(["--device", "cpu", "--precisions", "fp32,tf32", "--inputs", "raw,jpeg12mp",
                       "--baseline-variants", "i2b16d2000"])
    assert args.precisions == ["fp32", "tf32"] and args.inputs == ["raw", "jpeg12mp"]
    assert args.eager_batches == [] and args.concurrency == [1, 4, 8, 16, 32, 64]  # no eager timing on the CPU
    assert [v.key for v in args.baseline_variants] == ["i2b16d2000"]
    assert parse_args([]).eager_batches == [8, 16] and parse_args(["--eager-batches="]).eager_batches == []
    with pytest.raises(SystemExit):
        parse_args(["--inputs", "raw,png"])
    assert "--inputs: 'png' is not one of raw, jpeg, jpeg12mp" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--baseline-variants", "two"])


def test_without_warm_up_the_sweeps_still_run(stand_ins, tmp_path):
    calls, _, _ = stand_ins
    rec = bench.Record()
    bench.measure_target(rec, None, "u", target(), dataclasses.replace(plan(tmp_path), warm_up=False))
    assert calls["warm"] == [] and len(calls["perf"]) == 3 and len(rec.perf_rows) == 3
