"""Throughput/latency of the ensemble (torch target, fp32 and fp16) against torchvision eager, on one GPU.

    python -m benchmarks.perf [--out DIR] [--work DIR] [--concurrency 1,2,4,8,16,32,64] [--window-ms 1500]
                              [--weights STATE_DICT]

Steps (results under --out, default $OUT, else ./out/bench; scratch files under --work):
  1. seeded random weights (no download), or ``--weights`` (a state_dict, e.g. from
     ``python -m benchmarks.train_synthetic``, which the fp16 accuracy check needs) ->
     ``python -m exporters export --target torch`` at the 800x1344 canvas, fp32 and fp16, and the
     torchvision baseline models beside the fp32 ensemble (evaluation/repositories.py);
  2. one tritonserver per repository, a warm-up, then perf_analyzer on each model at each
     concurrency with real input: JPEG bytes, or with ``--input raw`` the same photographs decoded
     (``fasterrcnn_raw``, UINT8 HWC, all 480x640 so that Triton can batch them);
  3. Triton's statistics before and after each model's sweep: per-step times and average batch;
  4. accuracy on the GPU: served detections against torchvision eager fp32 (evaluation/parity.py:
     the parity criterion for the fp32 ensemble, the fp16 criterion for the fp16 one);
  5. perf.csv, breakdown.csv, accuracy.csv, summary.md and perf.png (throughput vs p99 latency;
     where matplotlib is installed).

Needs CUDA torch, CuPy, tritonclient, and the binaries named by TRITONSERVER_BIN (+
TRITON_BACKEND_DIR) and PERF_ANALYZER_BIN.  ``--input auto`` sends decoded images under numpy 2,
whose python-backend stub in this Triton build garbles TYPE_STRING inputs (docs/benchmarks.md,
"Input mode"); JPEG decoding is then left out of the ensemble and the baselines alike.
Exit code 0 only if the ensemble passes its accuracy criteria and every perf_analyzer run worked.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from evaluation import accuracy, payloads, perf_analyzer, plots, report, server, triton_stats
from evaluation.parity import FP16, PARITY, fp16_overall
from evaluation.repositories import ROOT, WEIGHTS_FILE, write_benchmark_repositories
from python_backend import names

log = logging.getLogger("perf")

# the models served from each precision's repository; the baselines sit beside the fp32 ensemble
MODELS = {"fp32": ["ensemble", "baseline_fp32", "baseline_fp16"], "fp16": ["ensemble"]}
STEPS = (names.RPN, names.ROI, names.HEADER, names.POSTPROCESS)  # after preprocess, in ensemble order


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "out" / "bench"))
    p.add_argument("--work", type=Path, default=Path("/tmp/fasterrcnn_bench"),
                   help="weights, repositories and perf_analyzer scratch files")
    p.add_argument("--reuse", action="store_true", help="reuse repositories already in --work")
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    p.add_argument("--window-ms", type=int, default=1500, help="perf_analyzer measurement window")
    p.add_argument("--max-trials", type=int, default=4, help="perf_analyzer windows at most per concurrency")
    p.add_argument("--precisions", default="fp32,fp16", help="ensemble repositories to run")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--instances", type=int, default=1, help="instances of every ensemble step")
    p.add_argument("--queue-delay-us", type=int, default=0, help="dynamic batcher queue delay of the ensemble steps")
    p.add_argument("--mps", action="store_true",
                   help="servers under a CUDA MPS daemon (fasterrcnn/server.py MpsDaemon)")
    p.add_argument("--export-args", default="", help="more arguments for `python -m exporters export`, "
                                                     "as one string after '=' (--export-args=--no-cuda-graphs)")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="cpu: try the plumbing on a machine without a GPU (no perf_analyzer: use --no-perf)")
    p.add_argument("--no-perf", action="store_true", help="skip perf_analyzer (accuracy and statistics only)")
    p.add_argument("--accuracy-images", choices=("photos", "synthetic"), default="photos",
                   help="images of the accuracy check: scikit-image's photographs and two textures, or held-out "
                        "generated scenes (evaluation/synthetic.py; for a checkpoint trained on them, --weights)")
    p.add_argument("--weights", type=Path, default=None,
                   help="a fasterrcnn_resnet50_fpn state_dict (as exporters.loading.checkpoint_model reads) for the "
                        "ensemble, baselines and eager reference; default: seeded random weights (seed 0)")
    p.add_argument("--input", choices=("auto", "jpeg", "raw"), default="auto",
                   help="request input: JPEG bytes (fasterrcnn) or decoded UINT8 (fasterrcnn_raw); auto: raw "
                        "under numpy 2, whose python backend garbles TYPE_STRING inputs")
    args = p.parse_args(argv)
    if args.weights is not None:
        if not args.weights.is_file():
            p.error(f"--weights {args.weights}: no such file")
        args.weights = args.weights.resolve()  # the export subprocess runs in the repository root
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # a `timeout` around this script sends SIGTERM: unwind, so that the servers are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import tritonclient.grpc as grpcclient

    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    precisions = args.precisions.split(",")
    raw = server.input_mode(args.input) == "raw"
    env = report.environment(args.weights)
    env += f"; input: {'decoded UINT8 images (fasterrcnn_raw), 480x640 for perf_analyzer' if raw else 'JPEG bytes'}"
    log.info("%s", env)
    t0 = time.monotonic()

    # 1. repositories: the ensemble per precision, the baselines beside the fp32 one
    wanted = precisions + ([] if args.skip_baseline else ["fp32"])
    if args.reuse and all((args.work / f"repo_{pr}").is_dir() for pr in wanted):
        repos = {pr: args.work / f"repo_{pr}" for pr in wanted}
    else:
        repos = write_benchmark_repositories(args.work, weights=args.weights, device=args.device,
                                             precisions=tuple(precisions), raw=raw, instances=args.instances,
                                             queue_delay_us=args.queue_delay_us,
                                             extra_args=tuple(args.export_args.split()),
                                             baselines=not args.skip_baseline)
    log.info("repositories ready in %.0f s", time.monotonic() - t0)

    # inputs: perf_analyzer always sends the photographs; the accuracy check may use generated scenes
    jpegs = payloads.jpeg_payloads(args.work / "images")
    photos = payloads.decoded(jpegs)
    perf_items = list(payloads.resized(photos).values()) if raw else list(jpegs.values())
    input_data = perf_analyzer.write_input_data(args.work / f"perf_input_{'raw' if raw else 'jpeg'}.json", perf_items)
    encoded, images = jpegs, photos
    if args.accuracy_images == "synthetic":
        encoded = payloads.synthetic_payloads(args.work / "scenes")
        images = payloads.decoded(encoded)
    checked = images if raw else encoded
    weights = args.weights if args.weights is not None else args.work / WEIGHTS_FILE
    reference = accuracy.eager_reference(weights, images, "cuda" if args.device == "gpu" else "cpu")
    log.info("torchvision eager reference: %s", {k: len(v.scores) for k, v in reference.items()})

    # 2-4. per repository: one server; per model: warm-up, accuracy, perf_analyzer sweep, statistics
    perf_rows, breakdown_rows, acc_rows, ok = [], [], [], True
    for precision in precisions:
        models = [m for m in MODELS[precision] if not (args.skip_baseline and m.startswith("baseline"))]
        triton = server.start_server(repos[precision], args.mps)
        try:
            client = grpcclient.InferenceServerClient(triton.grpc_url)
            ps = perf_analyzer.PerfSettings(perf_analyzer.binary(), triton.grpc_url, input_data, args.window_ms,
                                            args.max_trials)
            for model_key in models:
                ensemble = model_key == "ensemble"
                name = f"ensemble_{precision}" if ensemble else model_key
                model = (names.ENSEMBLE_RAW if raw else names.ENSEMBLE) if ensemble else model_key
                if not args.no_perf:
                    server.warm_up(client, model, perf_items)
                served = accuracy.served_detections(client, model, checked)
                rows = accuracy.accuracy_rows(name, reference, served, PARITY if name.endswith("fp32") else FP16)
                acc_rows += rows
                if name == "ensemble_fp32":
                    ok &= all(r["pass"] for r in rows)
                elif name == "ensemble_fp16" and args.weights is not None:
                    # seeded random weights give near-tied scores that fp16 reorders (torchvision's
                    # autocast fails the same check): there the fp16 rows are informational
                    ok &= fp16_overall(rows)[2]
                log.info("%s accuracy: %s", name, [(r["image"], r["matched"], r["reference"], r["pass"]) for r in rows])
                before = triton_stats.stats_snapshot(client)
                for c in ([] if args.no_perf else [int(c) for c in args.concurrency.split(",")]):
                    result = perf_analyzer.run_perf(ps, model, c, args.work / f"pa_{name}_{c}.csv")
                    if result is None:
                        ok = False
                        continue
                    row = perf_analyzer.perf_row(name, result)
                    perf_rows.append(row)
                    log.info("%s c=%d: %.1f img/s, p50 %.1f ms, p99 %.1f ms", name, c, row["infer_per_s"],
                             row["p50_ms"], row["p99_ms"])
                    report.write_csv(args.out / "perf.csv", perf_rows)
                after = triton_stats.stats_snapshot(client)
                steps = (model, names.PREPROCESS_RAW if raw else names.PREPROCESS, *STEPS) if ensemble else (model,)
                breakdown_rows += [dict(run=name, **r) for r in triton_stats.breakdown(before, after, steps)]
                report.write_csv(args.out / "breakdown.csv", breakdown_rows)
                report.write_csv(args.out / "accuracy.csv", acc_rows)
        finally:
            triton.stop()
            server.report_server_log(triton, args.work / f"tritonserver_{precision}.log")

    # 5. summary and figure
    (args.out / "summary.md").write_text(report.summary_markdown(env, perf_rows, breakdown_rows, acc_rows))
    try:
        if perf_rows:
            plots.throughput_latency(args.out / "perf.png", perf_rows, env)
    except plots.PlotUnavailable as e:
        log.warning("perf.png not drawn: %s", e)
    log.info("done in %.0f s; results in %s (%s)", time.monotonic() - t0, args.out, "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
