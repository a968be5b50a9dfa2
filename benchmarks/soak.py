"""Soak: perf_analyzer at concurrency 64 on the ensemble for N seconds, with bad inputs beside it.

    python benchmarks/soak.py [--seconds 90] [--out DIR] [--work DIR]

While perf_analyzer keeps 64 good requests (real JPEGs) in flight, one client thread sends bad
inputs (random bytes, empty, truncated and corrupt JPEGs, a PNG header alone) one after another.
Under numpy 2 (``--input auto``, see benchmarks/perf.py's doc) the soak runs on ``fasterrcnn_raw``
instead: good requests are decoded 480x640 images, bad ones are a 1x1 image, a 2x1 image and a
portrait image that does not fit the landscape canvas.
Every few seconds the GPU's memory in use (nvidia-smi) and the resident memory of the server and
its python-backend stubs (/proc/<pid>/status VmRSS) are sampled.

Pass criteria (the soak issue):
  * zero failed good requests: perf_analyzer exits 0, and the ensemble's failure count grew by
    exactly the number of bad requests;
  * every bad request answered with its own error ("bad input image: ...");
  * memory flat: after the first quarter of the run (warm-up, allocator pools filling), GPU memory
    grows by at most 256 MiB and server RSS by at most max(256 MiB, 10%).
Writes soak.csv (samples), soak.png, appends a "Soak" section to summary.md, prints PASS/FAIL.
Reuses ``--work``'s repo_fp32 written by benchmarks/perf.py (writes it if missing).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from python_backend import names  # noqa: E402

log = logging.getLogger("soak")
MIB = 1 << 20
GPU_GROWTH_MAX = 256 * MIB
RSS_GROWTH_MAX, RSS_GROWTH_FRACTION = 256 * MIB, 0.10


def bad_raw_payloads() -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    return {
        "1x1": rng.integers(0, 256, (1, 1, 3), dtype=np.uint8),
        "2x1": rng.integers(0, 256, (1, 2, 3), dtype=np.uint8),
        "portrait_beyond_canvas": rng.integers(0, 256, (1000, 600, 3), dtype=np.uint8),
    }


def bad_payloads(good_jpeg: bytes) -> dict[str, bytes]:
    import numpy as np

    rng = np.random.default_rng(0)
    corrupt = bytearray(good_jpeg)
    corrupt[len(corrupt) // 3: len(corrupt) // 3 + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    return {
        "random_bytes": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "empty": b"",
        "truncated_jpeg": good_jpeg[: len(good_jpeg) // 2],
        "corrupt_jpeg": bytes(corrupt),
        "png_header_only": b"\x89PNG\r\n\x1a\n",
    }


def gpu_memory_used() -> int:
    """Bytes in use on GPU 0 (nvidia-smi), -1 if unavailable."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return int(float(out.splitlines()[0])) * MIB
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return -1


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_pids(root_pid: int) -> list[int]:
    """``root_pid`` and all its descendants (the python-backend stubs)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    pids, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children.get(pid, [])
    return pids


def _process_label(pid: int) -> str:
    """``tritonserver``, or the model a python-backend stub serves (the model folder in its arguments)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    for a in args:
        a = a.decode(errors="replace")
        if a.endswith("model.py"):
            return Path(a).parent.parent.name  # <repository>/<model>/<version>/model.py
    return Path(args[0].decode(errors="replace")).name or str(pid)


def gpu_memory_by_process(pids: list[int]) -> str:
    """GPU memory of the server's processes ``pids`` as ``label=MiB`` pairs (nvidia-smi's compute
    apps), so a growth can be traced to a step; empty where nvidia-smi lists none of them."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    ours = set(pids)
    pairs = []
    for line in out.splitlines():
        try:
            pid, mib = (int(float(v)) for v in line.split(","))
        except ValueError:
            continue
        if pid in ours:
            pairs.append(f"{_process_label(pid)}={mib}")
    return " ".join(sorted(pairs))


class BadInputClient(threading.Thread):
    """Sends bad inputs one after another until stopped; counts how each was answered."""

    def __init__(self, url: str, model: str, payloads: dict):
        super().__init__(daemon=True)
        self.url, self.model, self.payloads = url, model, payloads
        self.stop_event = threading.Event()
        self.sent = self.answered_with_error = self.failed = 0
        self.unexpected: list[str] = []

    def run(self) -> None:
        import numpy as np
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(self.url)
        items = list(self.payloads.items())
        i = 0
        while not self.stop_event.is_set():
            kind, data = items[i % len(items)]
            i += 1
            if isinstance(data, bytes):
                inp = grpcclient.InferInput(names.IMAGE_BYTES, [1, 1], "BYTES")
                inp.set_data_from_numpy(np.array([[data]], dtype=np.object_))
            else:
                inp = grpcclient.InferInput(names.IMAGE_RAW, [1, *data.shape], "UINT8")
                inp.set_data_from_numpy(np.ascontiguousarray(data[None]))
            self.sent += 1
            try:
                client.infer(self.model, [inp], client_timeout=60)
                self.unexpected.append(f"{kind}: succeeded")
            except InferenceServerException as e:
                self.failed += 1
                if "bad input image" in (e.message() or ""):
                    self.answered_with_error += 1
                else:
                    self.unexpected.append(f"{kind}: {e.message()[:200]}")
            time.sleep(0.02)


def success_counts(client) -> dict[str, int]:
    """Successful requests per model.  Failures are not counted from Triton's ``fail`` statistics: in a
    CPU trial of Triton 2.51 a python model's error responses counted as successes of that model,
    and each failed ensemble request as two failures of the ensemble."""
    raw = client.get_inference_statistics(model_name="", as_json=True).get("model_stats", [])
    return {m["name"]: int(m.get("inference_stats", {}).get("success", {}).get("count", 0)) for m in raw}


def flat(values: list[int], max_growth: int, fraction: float = 0.0) -> tuple[bool, int]:
    """Growth from the end of the first quarter to the largest later sample; within the limit?"""
    if len(values) < 4:
        return False, -1
    start = values[len(values) // 4]
    growth = max(values[len(values) // 4:]) - start
    return growth <= max(max_growth, int(fraction * start)), growth


def plot(path: Path, samples: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pillow(path, samples)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    t = [s["t_s"] for s in samples]
    ax.plot(t, [s["gpu_mib"] for s in samples], marker=".", label="GPU memory used (MiB)")
    ax.plot(t, [s["server_rss_mib"] for s in samples], marker=".", label="server + stubs RSS (MiB)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("MiB")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("soak: concurrency 64 + bad inputs")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_pillow(path: Path, samples: list[dict]) -> None:
    from PIL import Image, ImageDraw

    w, h, m = 900, 500, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    if not samples:
        return
    tmax = max(s["t_s"] for s in samples) or 1
    ymax = max(max(s["gpu_mib"], s["server_rss_mib"]) for s in samples) * 1.1 or 1
    d.line([(m, h - m), (w - m, h - m)], fill="black")
    d.line([(m, m), (m, h - m)], fill="black")
    d.text((m, 10), f"soak: GPU MiB (blue), server RSS MiB (orange); y max {ymax:.0f} MiB, t max {tmax:.0f} s",
           fill="black")
    for key, color in (("gpu_mib", "#1f77b4"), ("server_rss_mib", "#ff7f0e")):
        xy = [(m + (w - 2 * m) * s["t_s"] / tmax, h - m - (h - 2 * m) * s[key] / ymax) for s in samples]
        if len(xy) > 1:
            d.line(xy, fill=color, width=2)
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=90)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--sample-s", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "out" / "bench"))
    p.add_argument("--work", type=Path, default=Path("/tmp/fasterrcnn_bench"))
    p.add_argument("--input", choices=("auto", "jpeg", "raw"), default="auto", help="as in benchmarks/perf.py")
    p.add_argument("--no-warm-up", action="store_true", help="skip the warm-up requests (CPU trials)")
    p.add_argument("--mps", action="store_true", help="the server under a CUDA MPS daemon, as in benchmarks/perf.py")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind under `timeout`: stop the server
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import tritonclient.grpc as grpcclient

    from benchmarks.perf import (decoded, input_mode, jpeg_payloads, report_server_log, resized, start_server,
                                 warm_up, write_csv, write_input_data)
    from benchmarks.repositories import write_benchmark_repositories

    args.out.mkdir(parents=True, exist_ok=True)
    raw = input_mode(args.input) == "raw"
    model = names.ENSEMBLE_RAW if raw else names.ENSEMBLE
    repo = args.work / "repo_fp32"
    if not (repo / names.ENSEMBLE / "config.pbtxt").is_file():
        repo = write_benchmark_repositories(args.work, precisions=("fp32",), raw=raw)["fp32"]
    jpegs = jpeg_payloads(args.work / "images")
    good = list(resized(decoded(jpegs)).values()) if raw else list(jpegs.values())
    input_data = write_input_data(args.work / f"soak_input_{'raw' if raw else 'jpeg'}.json", good)
    bad = bad_raw_payloads() if raw else bad_payloads(jpegs["astronaut"])

    server = start_server(repo, args.mps)
    samples: list[dict] = []
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        if not args.no_warm_up:
            warm_up(client, model, good)
        preprocess = names.PREPROCESS_RAW if raw else names.PREPROCESS
        ok0 = success_counts(client)
        # three windows of a third each: perf_analyzer's minimum for a measurement
        window_ms = max(1000, args.seconds * 1000 // 3)
        cmd = [os.environ.get("PERF_ANALYZER_BIN") or "perf_analyzer", "-m", model, "-i", "grpc",
               "-u", server.grpc_url, "--input-data", str(input_data), "-b", "1",
               "--concurrency-range", f"{args.concurrency}:{args.concurrency}", "--measurement-mode", "time_windows",
               "--measurement-interval", str(window_ms), "--stability-percentage", "100", "--max-trials", "3",
               "-f", str(args.work / "soak_pa.csv")]
        pa = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        bad_client = BadInputClient(server.grpc_url, model, bad)
        bad_client.start()
        t0 = time.monotonic()
        while pa.poll() is None:
            pids = tree_pids(server.process.pid)  # the server and its python-backend stubs
            samples.append({"t_s": round(time.monotonic() - t0, 1), "gpu_mib": gpu_memory_used() // MIB,
                            "server_rss_mib": sum(_rss(pid) for pid in pids) // MIB, "bad_sent": bad_client.sent,
                            "gpu_mib_by_process": gpu_memory_by_process(pids)})
            if time.monotonic() - t0 > args.seconds * 2 + 60:
                pa.kill()
                break
            time.sleep(args.sample_s)
        pa_out = pa.communicate()[0]
        bad_client.stop_event.set()
        bad_client.join(timeout=70)
        time.sleep(1.0)
        ok1 = success_counts(client)
        done = {k: ok1.get(k, 0) - ok0.get(k, 0) for k in (preprocess, model)}
    finally:
        server.stop()
        report_server_log(server, args.work / "tritonserver_soak.log")

    # every request passes preprocess (bad ones as error responses); good ones must come out of the ensemble
    good_failed = done[preprocess] - bad_client.sent - done[model]
    gpu_ok, gpu_growth = flat([s["gpu_mib"] * MIB for s in samples], GPU_GROWTH_MAX)
    rss_ok, rss_growth = flat([s["server_rss_mib"] * MIB for s in samples], RSS_GROWTH_MAX, RSS_GROWTH_FRACTION)
    throughput = next((ln.strip() for ln in pa_out.splitlines() if "Throughput" in ln), "no throughput line")
    checks = {
        "perf_analyzer exited 0 (no failed good request seen by the client)": pa.returncode == 0,
        f"requests through {preprocess} ({done[preprocess]}) - bad ({bad_client.sent}) - ensemble successes "
        f"({done[model]}) = "
        f"{good_failed} good requests failed": good_failed == 0,
        f"every bad request answered with its error ({bad_client.answered_with_error}/{bad_client.sent})":
            bad_client.sent > 0 and bad_client.answered_with_error == bad_client.sent,
        f"GPU memory flat (growth {gpu_growth // MIB} MiB <= {GPU_GROWTH_MAX // MIB} MiB)": gpu_ok,
        f"server RSS flat (growth {rss_growth // MIB} MiB <= max(256 MiB, 10%))": rss_ok,
    }
    passed = all(checks.values())
    write_csv(args.out / "soak.csv", samples)
    plot(args.out / "soak.png", samples)
    lines = ["", f"## Soak: {model}, concurrency {args.concurrency}, {args.seconds} s, bad inputs beside it", "",
             f"perf_analyzer: {throughput} (rc {pa.returncode})", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {what}" for what, ok in checks.items()]
    if bad_client.unexpected:
        lines.append(f"- unexpected answers to bad inputs: {bad_client.unexpected[:5]}")
    lines += ["", f"**soak {'PASS' if passed else 'FAIL'}**", ""]
    with open(args.out / "summary.md", "a") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    if pa.returncode != 0:
        print(pa_out[-3000:])
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
