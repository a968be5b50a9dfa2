"""The evaluation library's parts that run without a GPU or a server: payloads, perf_analyzer
input and rows, Triton statistics, the soak's request counting, memory flatness, the baseline
model's core and config, and the figures."""
from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from evaluation import memory, payloads, perf_analyzer, plots, soak, triton_stats
from evaluation.parity import torchvision_detect
from python_backend import names
from python_backend.reference.image import BadImageError, check_image_array, decode_image, preprocess_batch
from python_backend.settings import DetectorSettings

SETTINGS = DetectorSettings(num_classes=91)  # the 800x1344 landscape canvas of the benchmarks


# --- payloads --------------------------------------------------------------------------------------

def test_textured_image_is_seeded():
    a = payloads.textured_image(30, 40, seed=5)
    assert a.shape == (30, 40, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, payloads.textured_image(30, 40, seed=5))
    assert not np.array_equal(a, payloads.textured_image(30, 40, seed=6))


def test_encode_round_trips_losslessly_as_png():
    image = payloads.textured_image(24, 32, seed=0)
    np.testing.assert_array_equal(decode_image(payloads.encode(image), SETTINGS.max_input_pixels, 2), image)


@pytest.mark.parametrize("kind", sorted(payloads.bad_payloads(b"any bytes")))
def test_every_bad_payload_is_refused_by_the_decoder(kind):
    good = payloads.encode(payloads.textured_image(240, 320, seed=1), "JPEG", quality=92)
    decode_image(good, SETTINGS.max_input_pixels, SETTINGS.min_input_side)  # the good one decodes
    with pytest.raises(BadImageError):
        decode_image(payloads.bad_payloads(good)[kind], SETTINGS.max_input_pixels, SETTINGS.min_input_side)


@pytest.mark.parametrize("kind", sorted(payloads.bad_raw_payloads()))
def test_every_bad_raw_payload_is_refused_by_the_preprocess(kind):
    image = payloads.bad_raw_payloads()[kind]
    with pytest.raises(BadImageError):
        check_image_array(image, SETTINGS.max_input_pixels, SETTINGS.min_input_side)
        preprocess_batch([image], SETTINGS)


@pytest.mark.parametrize("kind", ["jpeg", "jpeg12mp"])
def test_perf_payloads_are_jpegs_of_the_kind_s_size(kind):
    photos = {"a": payloads.textured_image(60, 80, seed=1), "b": payloads.textured_image(90, 70, seed=2)}
    items = payloads.perf_payloads(kind, photos)
    assert len(items) == 2 and all(isinstance(b, bytes) and b[:2] == b"\xff\xd8" for b in items)
    shape = payloads.JPEG_SHAPES[kind]
    decoded = [decode_image(b, SETTINGS.max_input_pixels, 1) for b in items]
    assert [d.shape for d in decoded] == [(*shape, 3)] * 2
    # the JPEG is the resized photograph (grain and JPEG loss aside): mean absolute error a few grey levels
    reference = payloads.resized(photos, shape)["a"].astype(np.float32)
    assert np.abs(decoded[0].astype(np.float32) - reference).mean() < 6


def test_grain_makes_large_jpegs_heavier_and_is_seeded():
    photos = {"a": payloads.textured_image(60, 80, seed=1)}
    smooth = payloads.jpegs_at(photos, (600, 800))["a"]
    grainy = payloads.jpegs_at(photos, (600, 800), grain_sigma=4.0)["a"]
    assert len(grainy) > 1.3 * len(smooth)
    assert payloads.jpegs_at(photos, (600, 800), grain_sigma=4.0)["a"] == grainy


def test_perf_payloads_raw_and_unknown_kinds():
    items = payloads.perf_payloads("raw", {"a": payloads.textured_image(60, 80, seed=1)})
    assert [(x.dtype, x.shape) for x in items] == [(np.uint8, (*payloads.RAW_SHAPE, 3))]
    with pytest.raises(ValueError, match="input kind must be one of raw, jpeg, jpeg12mp, got 'png'"):
        payloads.perf_payloads("png", {})


def test_resized_gives_one_shape():
    out = payloads.resized({"a": np.zeros((100, 50, 3), np.uint8), "b": np.full((7, 9, 3), 200, np.uint8)})
    assert {k: v.shape for k, v in out.items()} == {"a": (480, 640, 3), "b": (480, 640, 3)}
    assert np.all(out["b"] == 200)


# --- perf_analyzer -------------------------------------------------------------------------------

def _decode_entry(entry: dict) -> tuple[str, np.ndarray]:
    """A perf_analyzer data entry read back as perf_analyzer reads it (its docs/input_data.md): the
    tensor's name and its content as uint8, in its "shape" where one is given."""
    ((name, tensor),) = entry.items()
    content = tensor["content"] if "content" in tensor else tensor
    data = np.frombuffer(base64.b64decode(content["b64"]), np.uint8)
    return name, data.reshape(tensor["shape"]) if "shape" in tensor else data


def test_perf_analyzer_input_data_round_trips(tmp_path):
    photo = payloads.textured_image(48, 64, seed=3)
    jpeg = payloads.encode(photo, "JPEG", quality=90)
    data = json.loads(perf_analyzer.write_input_data(tmp_path / "in.json", [jpeg, photo]).read_text())["data"]
    name, sent = _decode_entry(data[0])
    # encoded bytes as the fasterrcnn ensemble's UINT8 [-1] input: the shape is the byte count
    assert name == names.IMAGE_BYTES and data[0][name]["shape"] == [len(jpeg)] and sent.tobytes() == jpeg
    np.testing.assert_array_equal(decode_image(sent.tobytes(), SETTINGS.max_input_pixels, 1),
                                  decode_image(jpeg, SETTINGS.max_input_pixels, 1))
    name, sent = _decode_entry(data[1])
    assert name == names.IMAGE_RAW and data[1][name]["shape"] == [48, 64, 3]
    np.testing.assert_array_equal(sent, photo)


def test_perf_analyzer_input_data_for_a_string_input(tmp_path):
    jpeg = b"\xff\xd8 not really a jpeg"
    (entry,) = json.loads(perf_analyzer.write_input_data(tmp_path / "s.json", [jpeg], "TYPE_STRING").read_text())["data"]
    _, sent = _decode_entry(entry)
    # one BYTES element: a 4-byte little-endian length, then the bytes
    assert int.from_bytes(sent[:4].tobytes(), "little") == len(jpeg) and sent[4:].tobytes() == jpeg


def test_perf_analyzer_input_data_refuses_what_no_input_takes(tmp_path):
    with pytest.raises(TypeError, match="got str"):
        perf_analyzer.write_input_data(tmp_path / "bad.json", ["a path?"])
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8 array, got float32 \[4, 4, 3\]"):
        perf_analyzer.input_entry(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="TYPE_UINT8 or TYPE_STRING, got 'TYPE_FP32'"):
        perf_analyzer.input_entry(b"abc", "TYPE_FP32")


def test_perf_analyzer_unavailable_says_why(tmp_path):
    assert "perf_analyzer not found" in perf_analyzer.unavailable(str(tmp_path / "no_such_binary"))
    tool = tmp_path / "pa"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert perf_analyzer.unavailable(str(tool)) is None


def test_perf_row_converts_microseconds():
    raw = {"Concurrency": "8", "Inferences/Second": "312.5", "p50 latency": "25000", "p90 latency": "30500",
           "p99 latency": "41250", "Avg latency": "26000", "Server Queue": "1500", "Server Compute Infer": "9000"}
    row = perf_analyzer.perf_row({"model": "ensemble", "precision": "fp16", "input": "raw"}, raw)
    assert row == {"model": "ensemble", "precision": "fp16", "input": "raw", "concurrency": 8, "infer_per_s": 312.5,
                   "p50_ms": 25.0, "p90_ms": 30.5, "p99_ms": 41.25, "avg_ms": 26.0, "server_queue_ms": 1.5,
                   "server_compute_infer_ms": 9.0}


def test_perf_command_names_the_run():
    ps = perf_analyzer.PerfSettings("pa", "127.0.0.1:1", "in.json", window_ms=1200, max_trials=3)
    cmd = perf_analyzer.command(ps, "fasterrcnn_raw", 16, "out.csv")
    assert cmd[:3] == ["pa", "-m", "fasterrcnn_raw"]
    for flag, value in (("-u", "127.0.0.1:1"), ("--concurrency-range", "16:16"), ("--measurement-interval", "1200"),
                        ("--max-trials", "3"), ("-f", "out.csv"), ("--input-data", "in.json"), ("-b", "1")):
        assert cmd[cmd.index(flag) + 1] == value, flag


# --- Triton statistics ---------------------------------------------------------------------------

def _stats(requests, executions, queue_ns, infer_ns, batch_infer, fails):
    return {"inference_count": str(requests), "execution_count": str(executions),
            "inference_stats": {"queue": {"count": str(requests), "ns": str(queue_ns)},
                                "compute_infer": {"count": str(requests), "ns": str(infer_ns)},
                                "fail": {"count": str(fails), "ns": "0"}},
            "batch_stats": [{"batch_size": str(b), "compute_infer": {"count": str(c), "ns": str(ns)}}
                            for b, (c, ns) in batch_infer.items()]}


def test_breakdown_is_the_difference_of_two_snapshots():
    before = {"rpn": _stats(10, 5, 10_000_000, 50_000_000, {1: (5, 40_000_000)}, 1)}
    # 40 more requests in 10 more executions, all of batch 4, taking 60 ms of compute_infer
    after = {"rpn": _stats(50, 15, 90_000_000, 250_000_000, {1: (5, 40_000_000), 4: (10, 60_000_000)}, 3)}
    (row,) = triton_stats.breakdown(before, after, ["rpn"])
    assert row["requests"] == 40 and row["executions"] == 10 and row["avg_batch"] == 4.0
    assert row["queue_ms_per_request"] == 2.0  # 80 ms over 40 requests
    assert row["compute_infer_ms_per_request"] == 5.0  # 200 ms over 40 requests
    assert row["compute_infer_ms_per_execution"] == 6.0  # 60 ms over 10 executions
    assert row["compute_input_ms_per_request"] == 0.0 and row["failed"] == 2
    (missing,) = triton_stats.breakdown(before, after, ["roi"])
    assert missing["requests"] == 0 and missing["avg_batch"] == 0.0


# --- the soak's counting -------------------------------------------------------------------------

class FakeClient:
    """async_infer like tritonclient's: answers each request on another thread, with an error for
    1x1 images, and counts what it was sent by image height."""

    def __init__(self):
        self.received: dict[int, int] = {}
        self.lock = threading.Lock()

    def async_infer(self, model, inputs, callback, outputs=None):
        height = inputs[0].shape()[1]  # [1, H, W, 3]
        with self.lock:
            self.received[height] = self.received.get(height, 0) + 1
        error = Exception(f"bad input image: height {height}") if height == 1 else None
        threading.Thread(target=callback, args=(None if error else "result", error)).start()


def _run_until_answered(loop: soak.RequestLoop, n: int, timeout_s: float = 5.0) -> None:
    loop.start()
    deadline = time.monotonic() + timeout_s
    while loop.totals().answered < n and time.monotonic() < deadline:
        time.sleep(0.01)
    loop.stop()


def test_request_loop_counts_every_outcome():
    client = FakeClient()
    sent = {"a": np.zeros((2, 2, 3), np.uint8), "b": np.zeros((3, 2, 3), np.uint8),
            "bad": np.zeros((1, 1, 3), np.uint8)}
    loop = soak.RequestLoop(client, "m", sent, concurrency=4)
    _run_until_answered(loop, 60)
    t = loop.tallies
    # the client's own count of what arrived equals the loop's count of what it sent
    assert {2: t["a"].sent, 3: t["b"].sent, 1: t["bad"].sent} == client.received
    assert t["a"].sent >= 20 and t["a"].sent - t["bad"].sent in (0, 1)  # in turn: a, b, bad, a, ...
    assert (t["a"].succeeded, t["b"].succeeded) == (t["a"].sent, t["b"].sent) and not t["a"].errors + t["b"].errors
    assert t["bad"].succeeded == 0 and t["bad"].errors == ["bad input image: height 1"] * t["bad"].sent
    assert loop.totals().sent == loop.totals().answered == sum(client.received.values())


def test_request_loop_counts_requests_that_could_not_be_sent():
    class Refusing:
        def async_infer(self, *args, **kwargs):
            raise ConnectionError("no server")

    loop = soak.RequestLoop(Refusing(), "m", {"a": b"x"}, pause_s=0.001)
    _run_until_answered(loop, 5)
    a = loop.tallies["a"]
    assert a.succeeded == 0 and a.sent == len(a.errors) >= 5 and set(a.errors) == {"no server"}
    assert list(soak.request_checks(a, soak.Tally()).values())[0] is False  # the good-requests check


def _tally(sent, succeeded, errors=()):
    return soak.Tally(sent, succeeded, list(errors))


@pytest.mark.parametrize("good,bad,passed", [
    (_tally(100, 100), _tally(3, 0, ["bad input image: x"] * 3), [True, True]),
    (_tally(100, 99, ["timeout"]), _tally(3, 0, ["bad input image: x"] * 3), [False, True]),
    (_tally(100, 99), _tally(3, 0, ["bad input image: x"] * 3), [False, True]),  # one never answered
    (_tally(0, 0), _tally(3, 0, ["bad input image: x"] * 3), [False, True]),  # nothing measured
    (_tally(100, 100), _tally(3, 1, ["bad input image: x"] * 2), [True, False]),  # a bad one succeeded
    (_tally(100, 100), _tally(3, 0, ["bad input image: x"] * 2 + ["internal error"]), [True, False]),
    (_tally(100, 100), _tally(0, 0), [True, False]),
])
def test_request_checks(good, bad, passed):
    assert list(soak.request_checks(good, bad).values()) == passed


def test_unexpected_answers_name_the_payload():
    odd = soak.unexpected_answers({"coffee": _tally(5, 4, ["timeout"])},
                                  {"empty": _tally(2, 1, ["bad input image: empty"]), "1x1": _tally(1, 0, ["boom"])})
    assert odd == ["coffee: failed: timeout", "1x1: answered with another error: boom", "empty: succeeded 1 times"]


# --- memory --------------------------------------------------------------------------------------

def test_flat_ignores_the_first_quarter():
    mib = memory.MIB
    warm = [100 * mib, 900 * mib] + [1000 * mib] * 6  # growth inside the first quarter (2 of 8)
    assert memory.flat(warm, 256 * mib) == (True, 0)
    late = [1000 * mib] * 6 + [1300 * mib] * 2
    assert memory.flat(late, 256 * mib) == (False, 300 * mib)
    assert memory.flat(late, 256 * mib, fraction=0.5) == (True, 300 * mib)  # allowed: 50% of 1000 MiB
    assert memory.flat([1, 2, 3], 10) == (False, -1)
    assert memory.flat([-1] * 8, 10) == (False, -1)  # nvidia-smi missing: nothing to judge


def test_memory_sample_of_this_process():
    import os

    row = memory.sample(os.getpid(), 1.234)
    assert row["t_s"] == 1.2 and row["server_rss_mib"] > 0
    assert os.getpid() in memory.tree_pids(os.getpid())


# --- the baseline model --------------------------------------------------------------------------

def test_pack_fills_slots_and_zeroes_the_rest():
    import torch

    from evaluation.baseline.eager import pack

    few = {"boxes": torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]), "scores": torch.tensor([0.9, 0.5]),
           "labels": torch.tensor([3, 7])}
    many = {"boxes": torch.arange(12 * 4, dtype=torch.float32).reshape(12, 4), "scores": torch.linspace(1, 0.1, 12),
            "labels": torch.arange(12)}
    boxes, scores, labels, num = pack([few, many], slots=10)
    assert boxes.shape == (2, 10, 4) and labels.dtype == np.int32 and num.tolist() == [[2], [10]]
    np.testing.assert_array_equal(boxes[0, :2], [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert not boxes[0, 2:].any() and not scores[0, 2:].any() and not labels[0, 2:].any()
    np.testing.assert_array_equal(labels[1], np.arange(10))  # the first ten: torchvision's order


def test_eager_baseline_equals_torchvision(small_model, tmp_path):
    import torch

    from evaluation.baseline.eager import EagerDetector
    from evaluation.parity import from_packed
    from exporters.loading import settings_from_model

    path = tmp_path / "weights.pt"
    torch.save(small_model.state_dict(), path)
    settings = settings_from_model(small_model)  # the canvases play no part in eager torchvision
    detector = EagerDetector(settings, path, "fp32", torch.device("cpu"))
    image = payloads.textured_image(200, 300, seed=4)
    ours = from_packed(*(part[0] for part in detector([image])))
    ref = torchvision_detect(small_model, image)
    assert len(ref.scores) > 0
    n = min(len(ref.scores), settings.box_detections_per_img)
    np.testing.assert_array_equal(ours.boxes, ref.boxes[:n])
    np.testing.assert_array_equal(ours.scores, ref.scores[:n])
    np.testing.assert_array_equal(ours.labels, ref.labels[:n])
    with pytest.raises(ValueError, match="precision must be one of"):
        EagerDetector(settings, path, "int8", torch.device("cpu"))


@pytest.mark.parametrize("raw", [False, True])
def test_baseline_config(raw):
    from evaluation.repositories import WEIGHTS_FILE, ServingVariant, baseline_config

    variant = ServingVariant(instances=2, max_batch_size=16, queue_delay_us=500)
    cfg = baseline_config("baseline_fp16_i2b16d500", SETTINGS, "fp16", variant, device="gpu", raw=raw)
    parsed = text_format.Parse(text_format.MessageToString(cfg), mc.ModelConfig())
    assert parsed.name == "baseline_fp16_i2b16d500" and parsed.backend == "python" and parsed.max_batch_size == 16
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 500
    (inp,) = parsed.input
    if raw:
        assert (inp.name, inp.data_type, list(inp.dims)) == (names.IMAGE_RAW, mc.TYPE_UINT8, [-1, -1, 3])
    else:  # as the fasterrcnn ensemble: the encoded bytes of one image per request
        assert (inp.name, inp.data_type, list(inp.dims)) == (names.IMAGE_BYTES, mc.TYPE_UINT8, [-1])
    assert [(o.name, o.data_type, list(o.dims)) for o in parsed.output] == [
        (names.DETECTION_BOXES, mc.TYPE_FP32, [100, 4]), (names.DETECTION_SCORES, mc.TYPE_FP32, [100]),
        (names.DETECTION_LABELS, mc.TYPE_INT32, [100]), (names.NUM_DETECTIONS, mc.TYPE_INT32, [1])]
    (group,) = parsed.instance_group
    assert (group.kind, group.count) == (mc.ModelInstanceGroup.KIND_GPU, 2)
    params = {k: v.string_value for k, v in parsed.parameters.items()}
    assert params["precision"] == "fp16" and params["weights_file"] == WEIGHTS_FILE
    assert DetectorSettings.from_parameters(params) == SETTINGS
    # the same allocator cap as the ensemble's torch processes on a GPU together (rpn + header)
    from exporters.repository import RepositoryOptions, python_step_config

    ensemble = RepositoryOptions(target="torch", device="gpu")
    caps = [float(python_step_config(n, SETTINGS, ensemble).parameters["gpu_memory_gib"].string_value)
            for n in (names.RPN, names.HEADER)]
    assert float(params["gpu_memory_gib"]) == sum(caps) == 12
    with pytest.raises(ValueError, match="baseline precision must be one of"):
        baseline_config("b", SETTINGS, "tf32")


def test_serving_variants_parse():
    from evaluation.repositories import ServingVariant, baseline_name, parse_variants

    assert parse_variants("i1b8, i2b16d2000") == [ServingVariant(1, 8, 0), ServingVariant(2, 16, 2000)]
    assert ServingVariant.parse("i2b16").key == "i2b16d0"
    assert baseline_name("fp16", ServingVariant(2, 16, 2000)) == "baseline_fp16_i2b16d2000"
    for bad in ("2b16", "i2", "i0b8", "i1b8d-5", ""):
        with pytest.raises(ValueError):
            parse_variants(bad)


def test_baseline_repository_holds_every_precision_and_variant(tmp_path):
    from evaluation.repositories import ServingVariant, write_baseline_repository

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    repo = tmp_path / "repo"
    (repo / "stale").mkdir(parents=True)
    written = write_baseline_repository(repo, weights, SETTINGS, ["fp32", "fp16"],
                                        [ServingVariant(1, 8, 0), ServingVariant(2, 16, 0)])
    assert written == ["baseline_fp32_i1b8d0", "baseline_fp32_i2b16d0", "baseline_fp16_i1b8d0",
                       "baseline_fp16_i2b16d0"]
    assert sorted(d.name for d in repo.iterdir()) == sorted(written)  # emptied first
    for name in written:
        cfg = text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())
        assert cfg.name == name and cfg.input[0].name == names.IMAGE_RAW
        assert (repo / name / "1" / "weights.pt").read_bytes() == b"weights"
        assert (repo / name / "1" / "model.py").read_text().startswith('"""Triton model (benchmark baseline)')


# --- server logs and memory ----------------------------------------------------------------------

def test_decoder_lines_name_each_decoder_once():
    from evaluation.server import decoder_lines

    log = "\n".join([
        'I1201 10:00:00.1 1 model.py:40] "preprocess: image decoder: nvjpeg (torchvision.io.decode_jpeg on cuda:0)"',
        'I1201 10:00:00.2 2 model.py:40] "preprocess: image decoder: nvjpeg (torchvision.io.decode_jpeg on cuda:0)"',
        "I1201 10:00:00.3 3 model_lifecycle.cc:1] successfully loaded 'rpn'",
        'E1201 10:00:01.0 1 pb_stub.cc:7] "decoder error: not a JPEG"',
        "preprocess_raw: image decoder: none (decoded input)"])
    assert decoder_lines(log) == ["preprocess: image decoder: nvjpeg (torchvision.io.decode_jpeg on cuda:0)",
                                  "preprocess_raw: image decoder: none (decoded input)"]
    assert decoder_lines("I1201 loaded 'rpn'") == []


def test_server_gpu_sample_without_nvidia_smi(monkeypatch):
    import os

    monkeypatch.setattr(memory, "gpu_memory_used", lambda index=0: -1)
    monkeypatch.setattr(memory, "compute_apps", lambda: {})
    row = memory.server_gpu_sample(os.getpid(), 500, precision="fp16", when="ready")
    assert row == {"precision": "fp16", "when": "ready", "device_delta_mib": -1, "process_sum_mib": -1,
                   "by_process": ""}


def test_server_gpu_sample_sums_the_server_s_processes(monkeypatch):
    import os

    me = os.getpid()
    monkeypatch.setattr(memory, "gpu_memory_used", lambda index=0: 9000 * memory.MIB)
    monkeypatch.setattr(memory, "mps_server_pids", lambda: [424242])
    monkeypatch.setattr(memory, "compute_apps", lambda: {me: 1200, 424242: 300, 1: 5000})  # pid 1: not ours
    row = memory.server_gpu_sample(me, 1000, precision="fp32", when="after the load")
    assert row["device_delta_mib"] == 8000 and row["process_sum_mib"] == 1500
    assert f"={1200}" in row["by_process"] and "=300" in row["by_process"] and "5000" not in row["by_process"]


# --- figures -------------------------------------------------------------------------------------

def test_throughput_latency_figure(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is in the dev extra")
    rows = [{"model": m, "concurrency": c, "infer_per_s": 10.0 * c, "p99_ms": 5.0 + c} for m in ("a", "b")
            for c in (1, 4, 16)]
    path = plots.throughput_latency(tmp_path / "perf.png", rows, "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [{"t_s": t, "gpu_mib": 1000, "server_rss_mib": 500 + t} for t in range(5)]
    assert plots.memory_over_time(tmp_path / "soak.png", samples, "soak").read_bytes()[:4] == b"\x89PNG"


def test_figures_say_when_matplotlib_is_missing(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(plots.PlotUnavailable, match="pip install matplotlib"):
        plots.throughput_latency(tmp_path / "perf.png", [], "title")
    assert not (tmp_path / "perf.png").exists()
