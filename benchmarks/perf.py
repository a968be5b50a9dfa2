"""Throughput, latency, GPU memory and accuracy of the ensemble (torch target) against torchvision,
judged against the performance goals.

    python -m benchmarks.perf [--precisions fp32,fp16] [--inputs raw,jpeg,jpeg12mp] [--weights STATE_DICT]
                              [--baseline-variants i1b8,i2b16d2000] [--out DIR] [--work DIR] [--mps]

Steps, top to bottom (results under --out, default $OUT, else ./out/bench; scratch under --work):
  1. weights: ``--weights`` (a state_dict, e.g. from ``python -m benchmarks.train_synthetic``: the
     fp16 accuracy goal is gated only with a trained checkpoint) or seeded random ones;
  2. torchvision eager fp32 (TF32 off) on the accuracy images: the reference detections;
  3. torchvision eager alone, no server, per precision at each ``--eager-batches`` size
     (evaluation/eager_bench.py): "torchvision's best";
  4. per precision: ``python -m fasterrcnn export --target torch --device gpu --precision P`` with
     every other setting at its default (a ``tf32`` the export refuses is left out, said so); one
     server; its GPU memory (nvidia-smi) when ready and after the load; accuracy through
     ``fasterrcnn_raw`` (and ``fasterrcnn`` with the encoded images, where an encoded input kind
     is asked for); perf_analyzer per input kind (evaluation/payloads.py INPUT_KINDS: decoded
     640x480 pixels to ``fasterrcnn_raw``, JPEG 640x480 and 4000x3000 to ``fasterrcnn``), with
     Triton's statistics around each sweep;
  5. torchvision served by Triton (evaluation/baseline/), fp32 and fp16 as run, once per serving
     variant (``--baseline-variants``: instances, max batch, queue delay), decoded input, one server;
  6. the goals (evaluation/goals.py) and summary.md, perf.csv, accuracy.csv, perf.png (matplotlib).

Needs CUDA torch, CuPy, tritonclient, the tritonserver of TRITONSERVER_BIN (+ TRITON_BACKEND_DIR)
and the perf_analyzer of PERF_ANALYZER_BIN.  Without perf_analyzer the perf rows are left out (said
so in the summary; with ``--device gpu`` that fails the run) and everything else still runs.
Exit code 0 only if no goal measured is missed and no stage failed.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from evaluation import goals, payloads, perf_analyzer, plots, report, server
from evaluation.accuracy import eager_reference
from evaluation.bench import Check, Plan, Record, Sweep, Target, measure_server
from evaluation.eager_bench import eager_rows
from evaluation.parity import FP16, PARITY
from evaluation.repositories import (BASELINE_MEMORY_GIB, ROOT, WEIGHTS_FILE, baseline_name, encoded_input_type,
                                     export_ensemble, exported_settings, parse_variants, save_random_weights,
                                     write_baseline_repository)
from python_backend import names

log = logging.getLogger("perf")
STEPS = (names.RPN, names.ROI, names.HEADER, names.POSTPROCESS)  # after preprocess, in ensemble order


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "out" / "bench"))
    p.add_argument("--work", type=Path, default=Path("/tmp/fasterrcnn_bench"),
                   help="weights, repositories and perf_analyzer scratch files")
    p.add_argument("--reuse", action="store_true", help="reuse ensemble repositories already in --work")
    p.add_argument("--precisions", default="fp32,fp16", help="ensemble precisions: fp32, fp16, tf32")
    p.add_argument("--inputs", default="raw,jpeg,jpeg12mp",
                   help=f"input kinds the ensemble is swept with: {', '.join(payloads.INPUT_KINDS)}")
    p.add_argument("--concurrency", type=ints, default="1,4,8,16,32,64", help="the ensemble, decoded input")
    p.add_argument("--encoded-concurrency", type=ints, default="1,16,64", help="the ensemble, encoded inputs")
    p.add_argument("--baseline-concurrency", type=ints, default="16,32,64")
    p.add_argument("--baseline-variants", type=parse_variants, default="i1b8,i2b8,i2b16,i2b16d2000",
                   help="served torchvision: i<instances>b<max batch>[d<queue delay us>], comma-separated")
    p.add_argument("--skip-baseline", action="store_true", help="no served torchvision")
    p.add_argument("--eager-batches", type=ints, default=None,
                   help="torchvision eager alone at these batch sizes (default 8,16 on the GPU, none on the CPU)")
    p.add_argument("--eager-repeat", type=int, default=10)
    p.add_argument("--window-ms", type=int, default=1500, help="perf_analyzer measurement window")
    p.add_argument("--max-trials", type=int, default=4, help="perf_analyzer windows at most per concurrency")
    p.add_argument("--instances", type=int, default=None, help="export: instances of every ensemble step")
    p.add_argument("--queue-delay-us", type=int, default=None, help="export: the ensemble steps' queue delay")
    p.add_argument("--export-args", default="", help="more arguments for `python -m fasterrcnn export`, "
                                                     "as one string after '=' (--export-args=--no-cuda-graphs)")
    p.add_argument("--mps", action="store_true", help="servers under a CUDA MPS daemon (fasterrcnn/server.py)")
    p.add_argument("--no-warm-up", action="store_true",
                   help="no warm-up requests before the sweeps (the CPU has no CUDA graphs to capture)")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="cpu: try the plumbing on a machine without a GPU (KIND_CPU steps)")
    p.add_argument("--no-perf", action="store_true", help="leave perf_analyzer out (accuracy and memory only)")
    p.add_argument("--accuracy-images", choices=("photos", "synthetic"), default="photos",
                   help="scikit-image's photographs and two textures, or held-out generated scenes "
                        "(evaluation/synthetic.py; for a checkpoint trained on them, --weights)")
    p.add_argument("--weights", type=Path, default=None,
                   help="a fasterrcnn_resnet50_fpn state_dict (exporters.loading.checkpoint_model reads it) for "
                        "the ensemble, baselines and references, taken as trained; default: seeded random (seed 0)")
    args = p.parse_args(argv)
    args.precisions = [v for v in args.precisions.split(",") if v]
    args.inputs = [v for v in args.inputs.split(",") if v]
    for kind in args.inputs:
        if kind not in payloads.INPUT_KINDS:
            p.error(f"--inputs: {kind!r} is not one of {', '.join(payloads.INPUT_KINDS)}")
    if args.weights is not None:
        if not args.weights.is_file():
            p.error(f"--weights {args.weights}: no such file")
        args.weights = args.weights.resolve()  # the export subprocess runs in the repository root
    if args.eager_batches is None:
        args.eager_batches = [8, 16] if args.device == "gpu" else []
    return args


def export_args(args) -> tuple[str, ...]:
    extra = [f"--instances={args.instances}"] if args.instances is not None else []
    extra += [f"--queue-delay-us={args.queue_delay_us}"] if args.queue_delay_us is not None else []
    return (*extra, *args.export_args.split())


def ensemble_target(args, precision: str, kinds: list[str], reference, images, encoded) -> Target:
    """The ensemble of one precision: a sweep per input kind, accuracy through the decoded entry point
    and, where an encoded kind is swept, through the encoded one."""
    criterion = PARITY if precision == "fp32" else FP16
    sweeps, checks = {}, [Check(f"ensemble_{precision}", names.ENSEMBLE_RAW, images, reference, criterion)]
    for kind in kinds:
        if kind == "raw":
            sweeps[kind] = Sweep(names.ENSEMBLE_RAW, args.concurrency, (names.PREPROCESS_RAW, *STEPS))
        else:
            sweeps[kind] = Sweep(names.ENSEMBLE, args.encoded_concurrency, (names.PREPROCESS, *STEPS))
    if any(k != "raw" for k in kinds):
        checks.append(Check(f"ensemble_{precision}_encoded", names.ENSEMBLE, encoded, reference, criterion))
    return Target({"model": "ensemble", "precision": precision}, sweeps, checks)


def baseline_targets(args, precisions: list[str], reference, images) -> list[Target]:
    """torchvision served, every serving variant of every precision, decoded input; the accuracy of
    the first variant of each precision (information: torchvision's results depend on the batch)."""
    targets = []
    for precision in precisions:
        for i, variant in enumerate(args.baseline_variants):
            name = baseline_name(precision, variant)
            checks = [Check(name, name, images, reference, PARITY if precision == "fp32" else FP16)] if i == 0 else []
            targets.append(Target({"model": "baseline", "precision": precision, "variant": variant.key},
                                  {"raw": Sweep(name, args.baseline_concurrency)}, checks))
    return targets


def run_stages(args, rec: Record, save) -> None:
    """Steps 1-5 of the docstring, calling ``save()`` after each server so that a run cut short
    still leaves its tables."""
    # 1-2. weights, the photographs perf_analyzer sends, the accuracy images and their reference
    weights = args.weights or save_random_weights(args.work / WEIGHTS_FILE)
    photos = payloads.decoded(payloads.jpeg_payloads(args.work / "images"))
    encoded = (payloads.synthetic_payloads(args.work / "scenes") if args.accuracy_images == "synthetic"
               else payloads.jpeg_payloads(args.work / "images"))
    images = payloads.decoded(encoded)
    reference = eager_reference(weights, images, "cuda" if args.device == "gpu" else "cpu")
    log.info("torchvision eager reference: %s", {k: len(v.scores) for k, v in reference.items()})

    # 3. torchvision eager alone
    if args.eager_batches:
        try:
            rec.eager_rows = eager_rows(weights, payloads.perf_payloads("raw", photos), args.precisions,
                                        args.eager_batches, "cuda" if args.device == "gpu" else "cpu",
                                        repeat=args.eager_repeat, memory_caps=(None, BASELINE_MEMORY_GIB))
            log.info("torchvision eager alone: %s", [(r["precision"], r["batch"], r["cudnn_benchmark"],
                                                      r["memory_cap_gib"], r["images_per_s"]) for r in rec.eager_rows])
        except Exception as e:  # noqa: BLE001 - the served measurements still run
            rec.fail(f"torchvision eager alone: {e}")
    else:
        rec.note("torchvision eager alone: no --eager-batches (none by default on the CPU)")

    # perf_analyzer, or why not
    if args.why_no_perf:
        (rec.fail if args.device == "gpu" and not args.no_perf else rec.note)(f"perf rows: {args.why_no_perf}")
    ps = None if args.why_no_perf else perf_analyzer.PerfSettings(perf_analyzer.binary(), "", Path(), args.window_ms,
                                                                 args.max_trials)
    plan = Plan(ps, {}, {}, args.work, args.why_no_perf, args.mps, warm_up=not args.no_warm_up)

    # 4. the ensemble, one repository and server per precision
    for precision in args.precisions:
        repo = args.work / f"repo_{precision}"
        if not (args.reuse and (repo / names.ENSEMBLE / "config.pbtxt").is_file()):
            try:
                export_ensemble(repo, weights, precision, args.device, extra_args=export_args(args))
            except RuntimeError as e:
                last = str(e).strip().splitlines()[-1]  # the CLI's own words; the whole of it is in run.log
                log.error("%s", e)
                (rec.note if precision == "tf32" else rec.fail)(f"ensemble {precision}: the export refused it: {last}")
                continue
        kinds = list(args.inputs)
        if server.input_mode("auto", repo) == "raw" and kinds != ["raw"]:
            rec.note(f"ensemble {precision}: encoded inputs left out: the ensemble's TYPE_STRING input is garbled "
                     "under numpy 2 by this Triton build (docs/benchmarks.md, \"Input mode\")")
            kinds = ["raw"]
        for kind in kinds if ps else []:
            if kind not in plan.input_data:
                plan.payloads[kind] = payloads.perf_payloads(kind, photos)
                plan.input_data[kind] = perf_analyzer.write_input_data(
                    args.work / f"perf_input_{kind}.json", plan.payloads[kind], encoded_input_type(repo))
        target = ensemble_target(args, precision, kinds, reference, images, encoded)
        measure_server(rec, repo, [target], plan, f"tritonserver_{precision}.log", {"precision": precision})
        save()

    # 5. torchvision served, every variant of every precision it has, decoded input
    served = [p for p in args.precisions if p in ("fp32", "fp16")]
    exported = [r for r in (args.work / f"repo_{p}" for p in args.precisions) if (r / names.PREPROCESS_RAW).is_dir()]
    if args.skip_baseline or not served or not exported:
        rec.note("served torchvision: " + ("--skip-baseline" if args.skip_baseline else
                                           "no fp32 or fp16 in --precisions" if not served else "no ensemble exported"))
        return
    repo = args.work / "repo_baseline"  # the settings of the ensemble's export
    write_baseline_repository(repo, weights, exported_settings(exported[0]), served, args.baseline_variants,
                              args.device)
    if ps and "raw" not in plan.input_data:
        plan.payloads["raw"] = payloads.perf_payloads("raw", photos)
        plan.input_data["raw"] = perf_analyzer.write_input_data(args.work / "perf_input_raw.json", plan.payloads["raw"])
    measure_server(rec, repo, baseline_targets(args, served, reference, images), plan, "tritonserver_baseline.log")


def save_results(args, env: str, rec: Record, plot: bool) -> int:
    """Step 6: the goals, summary.md, perf.csv, accuracy.csv and (``plot``) perf.png from what ``rec``
    holds so far; the exit code they give."""
    kinds = {k: payloads.INPUT_KINDS[k] for k in dict.fromkeys(["raw", *args.inputs])}
    results = goals.evaluate(report.gpu_name(), args.precisions, rec.perf_rows, rec.eager_rows, rec.memory_rows,
                             rec.acc_rows, trained=args.weights is not None,
                             why_missing="no perf rows: see Left out and failed",
                             encoded_kinds={k: v for k, v in kinds.items() if k != "raw"},
                             decoder="; ".join(rec.decoders))
    table = goals.goals_markdown(results)
    (args.out / "summary.md").write_text(report.summary_markdown(env, table, rec, kinds))
    report.write_csv(args.out / "perf.csv", rec.perf_rows + rec.eager_rows)
    report.write_csv(args.out / "accuracy.csv", rec.acc_rows)
    if plot:
        print(table)
        try:
            if rec.perf_rows:
                plots.throughput_latency(args.out / "perf.png", rec.perf_rows, env)
        except plots.PlotUnavailable as e:
            log.warning("perf.png not drawn: %s", e)
    return max(goals.exit_code(results), int(bool(rec.failures)))


def main(argv=None) -> int:
    args = parse_args(argv)
    # a `timeout` around this script sends SIGTERM: unwind, so that the servers are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    args.why_no_perf = "--no-perf" if args.no_perf else perf_analyzer.unavailable(perf_analyzer.binary())
    t0, rec, env = time.monotonic(), Record(), report.environment(args.weights)
    log.info("%s", env)
    finished = False
    try:
        run_stages(args, rec, lambda: save_results(args, env, rec, plot=False))
        finished = True
    finally:
        if not finished:
            rec.fail("the run was cut short (see run.log); the tables hold what was measured before")
        code = save_results(args, env, rec, plot=True)
    log.info("done in %.0f s; results in %s; %d failed stage(s); exit code %d", time.monotonic() - t0, args.out,
             len(rec.failures), code)
    return code


if __name__ == "__main__":
    sys.exit(main())
