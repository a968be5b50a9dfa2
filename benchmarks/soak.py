"""Soak: the ensemble under constant load for N seconds, with bad inputs beside it.

    python -m benchmarks.soak [--seconds 90] [--concurrency 64] [--out DIR] [--work DIR] [--mps]

One client keeps ``--concurrency`` good requests in flight: the photographs as JPEGs to
``fasterrcnn``, or decoded 480x640 images to ``fasterrcnn_raw`` (``--input raw``, and ``--input
auto`` where the repository's encoded input is TYPE_STRING under numpy 2: evaluation/server.py
``input_mode``).  Another sends bad inputs one after another (random bytes, empty, truncated and
corrupt JPEGs, a PNG signature alone; decoded: images with no rows or no columns).
Each request's outcome is counted by the client that sent it (evaluation/soak.py).  Every
``--sample-s`` seconds the GPU's memory in use (nvidia-smi) and the resident memory of the server
and its python-backend stubs are sampled.

Pass criteria:
  * every good request succeeded (none failed, none left unanswered);
  * every bad request answered with its own error, "bad input image: ...";
  * memory flat: after the first quarter of the run (warm-up, allocator pools filling), GPU memory
    grows by at most 256 MiB and server RSS by at most max(256 MiB, 10%).
Writes soak.csv (samples) and soak.png (where matplotlib is installed), appends a "Soak" section to
summary.md, prints PASS/FAIL.  Reuses ``--work``'s repo_fp32 written by ``benchmarks.perf``
(exports it, default settings, if missing).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from evaluation import memory, payloads, plots, report, server
from evaluation.memory import MIB
from evaluation.repositories import ROOT, WEIGHTS_FILE, export_ensemble, save_random_weights
from evaluation.soak import RequestLoop, request_checks, unexpected_answers
from python_backend import names

log = logging.getLogger("soak")
GPU_GROWTH_MAX = 256 * MIB
RSS_GROWTH_MAX, RSS_GROWTH_FRACTION = 256 * MIB, 0.10
BAD_PAUSE_S = 0.02  # between bad requests: a steady trickle beside the load, not a second load


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=90)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--sample-s", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "out" / "bench"))
    p.add_argument("--work", type=Path, default=Path("/tmp/fasterrcnn_bench"))
    p.add_argument("--input", choices=("auto", "jpeg", "raw"), default="auto", help="as in benchmarks.perf")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="where the repository's steps run, if it has to be written (cpu: plumbing trials)")
    p.add_argument("--no-warm-up", action="store_true", help="skip the warm-up requests (CPU trials)")
    p.add_argument("--mps", action="store_true", help="the server under a CUDA MPS daemon, as in benchmarks.perf")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind under `timeout`: stop the server
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import tritonclient.grpc as grpcclient

    args.out.mkdir(parents=True, exist_ok=True)
    repo = args.work / "repo_fp32"
    if not (repo / names.ENSEMBLE / "config.pbtxt").is_file():
        weights = args.work / WEIGHTS_FILE
        export_ensemble(repo, weights if weights.is_file() else save_random_weights(weights), "fp32", args.device)
    raw = server.input_mode(args.input, repo) == "raw"
    model = names.ENSEMBLE_RAW if raw else names.ENSEMBLE
    jpegs = payloads.jpeg_payloads(args.work / "images")
    good = payloads.resized(payloads.decoded(jpegs)) if raw else jpegs
    bad = payloads.bad_raw_payloads() if raw else payloads.bad_payloads(jpegs["astronaut"])

    triton = server.start_server(repo, args.mps)
    samples: list[dict] = []
    try:
        if not args.no_warm_up:
            server.warm_up(grpcclient.InferenceServerClient(triton.grpc_url), model, list(good.values()))
        load = RequestLoop(grpcclient.InferenceServerClient(triton.grpc_url), model, good, args.concurrency)
        trickle = RequestLoop(grpcclient.InferenceServerClient(triton.grpc_url), model, bad, 1, pause_s=BAD_PAUSE_S)
        t0 = time.monotonic()
        load.start()
        trickle.start()
        while time.monotonic() - t0 < args.seconds and load.is_alive() and trickle.is_alive():
            samples.append(memory.sample(triton.process.pid, time.monotonic() - t0))
            time.sleep(args.sample_s)
        trickle.stop()
        load.stop()
        elapsed = time.monotonic() - t0
    finally:
        triton.stop()
        server.report_server_log(triton, args.work / "tritonserver_soak.log")

    good_total, bad_total = load.totals(), trickle.totals()
    checks = request_checks(good_total, bad_total)
    gpu_ok, gpu_growth = memory.flat([s["gpu_mib"] * MIB for s in samples], GPU_GROWTH_MAX)
    rss_ok, rss_growth = memory.flat([s["server_rss_mib"] * MIB for s in samples], RSS_GROWTH_MAX,
                                     RSS_GROWTH_FRACTION)
    for what, growth, ok, limit in (("GPU memory", gpu_growth, gpu_ok, f"{GPU_GROWTH_MAX // MIB} MiB"),
                                    ("server RSS", rss_growth, rss_ok, "max(256 MiB, 10%)")):
        seen = f"growth {growth // MIB} MiB" if growth >= 0 else "not sampled"
        checks[f"{what} flat ({seen}; at most {limit})"] = ok
    passed = all(checks.values())

    report.write_csv(args.out / "soak.csv", samples)
    try:
        plots.memory_over_time(args.out / "soak.png", samples, f"soak: concurrency {args.concurrency} + bad inputs")
    except plots.PlotUnavailable as e:
        log.warning("soak.png not drawn: %s", e)
    lines = ["", f"## Soak: {model}, concurrency {args.concurrency}, {args.seconds} s, bad inputs beside it", "",
             f"{good_total.succeeded / elapsed:.1f} good requests/s succeeded over {elapsed:.0f} s", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {what}" for what, ok in checks.items()]
    odd = unexpected_answers(load.tallies, trickle.tallies)
    if odd:
        lines.append(f"- unexpected answers: {odd}")
    lines += ["", f"**soak {'PASS' if passed else 'FAIL'}**", ""]
    with open(args.out / "summary.md", "a") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
