"""The performance goals (evaluation/goals.py) on hand-built measurements whose verdict is known,
and torchvision eager's timing helpers (evaluation/eager_bench.py) on the CPU."""
from __future__ import annotations

import types

import pytest

from evaluation import goals
from evaluation.goals import INFO, MET, NOT_MEASURED, NOT_MET

H200, H100 = "NVIDIA H200", "NVIDIA H100 80GB HBM3"


def perf(model, precision, best, p99_c1=8.0, variant="", kind="raw"):
    """perf_analyzer rows of one run: concurrency 1 at a tenth of ``best`` (p99 ``p99_c1``), 16 at
    ``best``, 64 a little below it."""
    base = {"model": model, "precision": precision, "variant": variant, "input": kind}
    return [{**base, "concurrency": 1, "infer_per_s": best / 10, "p99_ms": p99_c1},
            {**base, "concurrency": 16, "infer_per_s": best, "p99_ms": 40.0},
            {**base, "concurrency": 64, "infer_per_s": best * 0.95, "p99_ms": 90.0}]


def eager(precision, batch8, batch16):
    return [{"precision": precision, "batch": 8, "images_per_s": batch8},
            {"precision": precision, "batch": 16, "images_per_s": batch16}]


def acc(model, counts):
    """Accuracy rows: one per (matched, reference) pair; ``pass`` as the parity criterion would say."""
    return [{"model": model, "image": f"im{i}", "matched": m, "reference": r, "pass": m == r}
            for i, (m, r) in enumerate(counts)]


def memory(precision, ready, after):
    return [{"precision": precision, "when": "ready", "device_delta_mib": ready, "process_sum_mib": ready - 300},
            {"precision": precision, "when": "after the load", "device_delta_mib": after, "process_sum_mib": 100}]


GOOD = dict(
    perf_rows=(perf("ensemble", "fp16", 800.0, p99_c1=9.5) + perf("ensemble", "fp32", 300.0, p99_c1=19.0)
               + perf("baseline", "fp16", 140.0, variant="i2b16d0") + perf("baseline", "fp16", 120.0, variant="i1b8d0")
               + perf("ensemble", "fp16", 780.0, p99_c1=14.0, kind="jpeg")),
    eager_rows=eager("fp16", 172.0, 183.0) + eager("fp32", 133.0, 138.0),
    memory_rows=memory("fp16", 15000, 18000) + memory("fp32", 19000, 20480),
    acc_rows=acc("ensemble_fp32", [(10, 10), (7, 7)]) + acc("ensemble_fp16", [(9, 10), (40, 40), (30, 30)]),
)


def by_name(results):
    return {g.goal: g for g in results}


def test_a_run_meeting_every_goal_exits_zero():
    results = goals.evaluate(H200, ["fp32", "fp16"], **GOOD, trained=True, encoded_kinds={"jpeg": "JPEG 640x480"})
    got = by_name(results)
    assert got["fp16 throughput"].status == MET and got["fp16 throughput"].measured.startswith("800.0 images/s")
    # 800 / 183 (eager's best, batch 16) = 4.37x; 800 / 140 (the best served variant) = 5.71x
    assert got["fp16 vs torchvision eager's best fp16 (autocast)"].measured.startswith("4.37x (800.0 / 183.0")
    assert "i2b16d0" in got["fp16 vs the best served torchvision baseline, fp16"].measured
    assert got["fp32 vs torchvision eager's best fp32 (TF32 off on both sides)"].measured.startswith("2.17x")
    assert got["server GPU memory, fp32"].measured == "20.0 GiB (20480 MiB)"  # exactly at the limit: met
    assert got["accuracy, ensemble_fp16"].measured.startswith("79 of 80 detections (98.75%); worst image im0 90%")
    assert got["fp16, JPEG 640x480"].measured == "780.0 images/s (concurrency 16), p99 at concurrency 1 14.0 ms"
    assert got["fp16, JPEG 640x480"].status == INFO
    assert got["fp16, JPEG 640x480 / decoded 640x480 throughput"].measured == "0.975"  # 780 / 800
    assert {g.status for g in results} == {MET, INFO}
    assert goals.exit_code(results) == 0
    assert "every goal measured in this run is met" in goals.goals_markdown(results)


@pytest.mark.parametrize("change, goal", [
    (dict(perf_rows=perf("ensemble", "fp16", 740.0)), "fp16 throughput"),
    (dict(eager_rows=eager("fp16", 172.0, 201.0)), "fp16 vs torchvision eager's best fp16 (autocast)"),  # 3.98x
    (dict(perf_rows=perf("baseline", "fp16", 161.0, variant="i2b16d2000")),
     "fp16 vs the best served torchvision baseline, fp16"),  # 4.97x
    (dict(eager_rows=eager("fp32", 151.0, 110.0)), "fp32 vs torchvision eager's best fp32 (TF32 off on both sides)"),
    (dict(perf_rows=perf("ensemble", "fp32", 300.0, p99_c1=20.5)), "p99 at concurrency 1, fp32"),
    (dict(memory_rows=memory("fp16", 21000, 15000)), "server GPU memory, fp16"),
    (dict(perf_rows=perf("ensemble", "fp16", 750.0, p99_c1=14.0, kind="jpeg")),
     "fp16, JPEG 640x480 / decoded 640x480 throughput"),  # 750 / 800 = 0.9375
    (dict(acc_rows=acc("ensemble_fp32", [(99, 100)])), "accuracy, ensemble_fp32"),
    (dict(acc_rows=acc("ensemble_fp16_encoded", [(95, 100), (90, 100)])), "accuracy, ensemble_fp16_encoded"),
    (dict(acc_rows=acc("ensemble_fp16", [(8, 10)] + [(200, 200)])), "accuracy, ensemble_fp16"),  # 208/210, floor
])
def test_each_missed_goal_fails_the_run(change, goal):
    measured = {k: list(v) for k, v in GOOD.items()}
    for key, rows in change.items():
        if key in ("perf_rows",):  # the changed run replaces the same run's rows
            first = rows[0]
            measured[key] = [r for r in measured[key] if not all(r.get(k) == first.get(k) for k in
                                                                 ("model", "precision", "variant", "input"))]
        elif key == "acc_rows":
            measured[key] = [r for r in measured[key] if r["model"] != rows[0]["model"]]
        else:
            measured[key] = [r for r in measured[key] if r["precision"] != rows[0]["precision"]]
        measured[key] += rows
    results = goals.evaluate(H200, ["fp32", "fp16"], **measured, trained=True, encoded_kinds={"jpeg": "JPEG 640x480"})
    missed = [g.goal for g in results if g.status == NOT_MET]
    assert missed == [goal]
    assert goals.exit_code(results) == 1
    assert f"**1 goal(s) not met: {goal}**" in goals.goals_markdown(results)


def test_the_absolute_fp16_target_is_for_the_h200_only():
    slow = {**GOOD, "perf_rows": perf("ensemble", "fp16", 700.0) + GOOD["perf_rows"][3:]}
    assert by_name(goals.evaluate(H200, ["fp16"], **slow, trained=True))["fp16 throughput"].status == NOT_MET
    g = by_name(goals.evaluate(H100, ["fp16"], **slow, trained=True))["fp16 throughput"]
    assert g.status == INFO and "this card is NVIDIA H100 80GB HBM3: the absolute target is for an H200" in g.measured


def test_goals_not_measured_say_why_and_do_not_fail():
    results = goals.evaluate("no GPU", ["fp32"], [], [], [], acc("ensemble_fp32", [(5, 5)]), trained=False,
                             why_missing="perf_analyzer not found")
    got = by_name(results)
    assert got["p99 at concurrency 1, fp32"].measured == "- (perf_analyzer not found)"
    assert got["p99 at concurrency 1, fp32"].status == NOT_MEASURED
    assert got["server GPU memory, fp32"].status == NOT_MEASURED
    assert got["fp32 vs torchvision eager's best fp32 (TF32 off on both sides)"].status == NOT_MEASURED
    assert got["accuracy, ensemble_fp32"].status == MET
    assert "fp16 throughput" not in got  # fp16 was not in this run
    assert goals.exit_code(results) == 0


def test_fp16_accuracy_is_gated_only_with_a_trained_checkpoint():
    rows = acc("ensemble_fp16", [(70, 100)])
    assert by_name(goals.evaluate(H200, ["fp16"], [], [], [], rows, trained=True))["accuracy, ensemble_fp16"].status \
        == NOT_MET
    g = by_name(goals.evaluate(H200, ["fp16"], [], [], [], rows, trained=False))["accuracy, ensemble_fp16"]
    assert g.status == INFO and "seeded random weights" in g.measured


def test_tf32_rows_are_information():
    rows = perf("ensemble", "tf32", 500.0, p99_c1=30.0)
    results = goals.evaluate(H200, ["tf32"], rows, eager("tf32", 300.0, 310.0), memory("tf32", 30000, 30000),
                             acc("ensemble_tf32", [(1, 10)]), trained=True)
    assert {g.status for g in results} == {INFO}
    assert by_name(results)["tf32 vs torchvision eager's best with TF32 on (TF32 on both sides)"].measured.startswith(
        "1.61x")
    assert goals.exit_code(results) == 0


def test_server_memory_takes_the_larger_figure_of_every_sample():
    rows = [{"precision": "fp16", "device_delta_mib": 900, "process_sum_mib": 1200},
            {"precision": "fp16", "device_delta_mib": 1100, "process_sum_mib": -1},
            {"precision": "fp32", "device_delta_mib": 5000, "process_sum_mib": 5000}]
    assert goals.server_memory_mib(rows, "fp16") == 1200
    assert goals.server_memory_mib([{"precision": "fp16", "device_delta_mib": -1, "process_sum_mib": -1}],
                                   "fp16") is None


def test_goals_table_escapes_cells():
    table = goals.goals_markdown([goals.Goal("g", "a | b", "t", NOT_MET)])
    assert "| g | a \\| b | t | **NOT MET** |" in table


# --- torchvision eager alone ---------------------------------------------------------------------

def test_torch_flags_set_and_restore_tf32_and_autotuner():
    import torch

    from evaluation.eager_bench import torch_flags

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    with torch_flags(tf32=True, cudnn_benchmark=True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark
    with torch_flags(tf32=False, cudnn_benchmark=False):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark) == before


def test_eager_rows_on_the_cpu(small_model, monkeypatch, tmp_path):
    import torch

    import exporters.loading
    from evaluation import eager_bench
    from evaluation.payloads import textured_image

    calls = []

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = small_model

        def forward(self, xs):
            calls.append([tuple(x.shape) for x in xs])
            return self.inner(xs)

    monkeypatch.setattr(exporters.loading, "checkpoint_model", lambda path: Counting())
    images = [textured_image(40, 60, seed=1), textured_image(50, 30, seed=2)]
    rows = eager_bench.eager_rows(tmp_path / "w.pt", images, ["fp32"], batches=(3,), device="cpu", warmup=1, repeat=2)
    assert [(r["precision"], r["batch"], r["cudnn_benchmark"]) for r in rows] == [("fp32", 3, False)]
    # every call got the batch: the images cycled, channels first
    assert calls == [[(3, 40, 60), (3, 50, 30), (3, 40, 60)]] * 3
    assert rows[0]["images_per_s"] == pytest.approx(3000 / rows[0]["ms_per_call"], rel=0.01)
    with pytest.raises(ValueError, match="eager precision must be one of"):
        eager_bench.eager_rows(tmp_path / "w.pt", images, ["int8"], device="cpu")


def test_eager_rows_on_a_gpu_run_each_variant_in_a_process_of_its_own(monkeypatch, tmp_path):
    """cuDNN keeps a shape's plan for the rest of the process: every (precision, autotuner, cap)
    gets a fresh process (a new pool of one worker), and its rows come back as it labelled them."""
    from evaluation import eager_bench

    pools = []

    class Pool:
        def __init__(self, workers, mp_context=None):
            assert workers == 1 and mp_context.get_start_method() == "spawn"
            self.jobs = []
            pools.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, *args):
            self.jobs.append(args)
            weights, images, precision, labels, autotuner, cap, batches = args[:7]
            rows = [{"precision": label, "cudnn_benchmark": autotuner, "memory_cap_gib": cap, "batch": b}
                    for label in labels for b in batches]
            return types.SimpleNamespace(result=lambda: rows)

    monkeypatch.setattr(eager_bench, "ProcessPoolExecutor", Pool)
    rows = eager_bench.eager_rows(tmp_path / "w.pt", [], ["fp32", "fp16"], batches=(8, 16), device="cuda",
                                  memory_caps=(None, 12.0))
    assert [len(p.jobs) for p in pools] == [1] * 8
    assert [p.jobs[0][2:6] for p in pools] == [
        (precision, (precision,), autotuner, cap)
        for precision in ("fp32", "fp16") for autotuner in (False, True) for cap in (None, 12.0)]
    assert len(rows) == 16 and {(r["precision"], r["cudnn_benchmark"], r["memory_cap_gib"]) for r in rows} == {
        (p, a, c) for p in ("fp32", "fp16") for a in (False, True) for c in (None, 12.0)}
