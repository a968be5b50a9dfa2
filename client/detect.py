"""gRPC client for the ``fasterrcnn`` ensemble (``fasterrcnn_raw`` with ``--raw``).

    python -m client.detect IMAGE_OR_DIR_OR_GLOB... [--url 127.0.0.1:8001] [--concurrency N] [--draw DIR]
                            [--json] [--output FILE.jsonl]

Library use: :func:`run` (a list of records) or :func:`detect_iter` (records as they come);
:func:`infer_many` / :func:`infer_iter` for payloads already in memory.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from python_backend import names

from . import output
from .inputs import IMAGE_SUFFIXES, ImageError, decode_image, expand_inputs, read_payloads  # noqa: F401  (public API)

OUTPUTS = (names.DETECTION_BOXES, names.DETECTION_SCORES, names.DETECTION_LABELS, names.NUM_DETECTIONS)


class ClientError(RuntimeError):
    """The server can't be used as expected; the message says what differs."""


def connect(url: str):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        live = client.is_server_live()
    except InferenceServerException as e:
        raise ClientError(f"cannot reach Triton at {url}: {e.message()}") from None
    if not live:
        raise ClientError(f"Triton at {url} is not live")
    return client


def _expect(what: str, expected, got) -> None:
    if expected != got:
        raise ClientError(f"{what}: expected {expected}, got {got}")


def check_model(client, model: str = names.ENSEMBLE, raw: bool | None = None) -> dict:
    """Check an ensemble's metadata and config; return its config as a dict (parameters included).

    ``raw`` (default: ``model == fasterrcnn_raw``) expects the ``image_raw`` UINT8 ``[-1, -1, -1, 3]``
    input of ``fasterrcnn_raw`` instead of the ``image`` UINT8 ``[-1, -1]`` input (encoded bytes)
    of ``fasterrcnn``.
    """
    from tritonclient.utils import InferenceServerException

    raw = model == names.ENSEMBLE_RAW if raw is None else raw
    image, shape = (names.IMAGE_RAW, ["-1", "-1", "-1", "3"]) if raw else (names.IMAGE_BYTES, ["-1", "-1"])
    try:
        if not client.is_model_ready(model):
            raise ClientError(f"model {model!r} is not ready on the server")
        meta = client.get_model_metadata(model, as_json=True)
        config = client.get_model_config(model, as_json=True)["config"]
    except InferenceServerException as e:
        raise ClientError(f"model {model!r}: {e.message()}") from None
    inputs = {i["name"]: i for i in meta["inputs"]}
    _expect(f"{model} inputs", [image], sorted(inputs))
    _expect(f"{model} input {image!r} datatype", "UINT8", inputs[image]["datatype"])
    _expect(f"{model} input {image!r} shape", shape, [str(s) for s in inputs[image]["shape"]])
    outputs = {o["name"]: o for o in meta["outputs"]}
    expected = dict(zip(OUTPUTS, ("FP32", "FP32", "INT32", "INT32")))
    _expect(f"{model} outputs", sorted(expected), sorted(outputs))
    for name, dtype in expected.items():
        _expect(f"{model} output {name!r} datatype", dtype, outputs[name]["datatype"])
    slots = int(outputs[names.DETECTION_BOXES]["shape"][-2])
    _expect(f"{model} output {names.DETECTION_BOXES!r} shape", ["-1", str(slots), "4"],
            [str(s) for s in outputs[names.DETECTION_BOXES]["shape"]])
    if int(config.get("max_batch_size", 0)) < 1:
        raise ClientError(f"{model} max_batch_size: expected at least 1, got {config.get('max_batch_size', 0)}")
    return config


def weights_warning(config: dict) -> str | None:
    """A warning where the ensemble's config says its weights are random (its ``weights`` parameter,
    written by the exporter), else None."""
    line = config.get("parameters", {}).get("weights", {}).get("string_value", "")
    return f"the server's weights are {line}" if line.startswith("random") else None


def class_names(config: dict) -> list[str]:
    raw = config.get("parameters", {}).get("class_names", {}).get("string_value", "[]")
    return list(json.loads(raw))


def _request(data):
    """Encoded bytes -> an ``image`` input (``[1, N]`` uint8: the file's N bytes); a decoded HWC
    uint8 array -> an ``image_raw`` input (``[1, H, W, 3]``)."""
    import tritonclient.grpc as grpcclient

    if isinstance(data, np.ndarray):
        name, array = names.IMAGE_RAW, np.ascontiguousarray(data, dtype=np.uint8)
    else:
        name, array = names.IMAGE_BYTES, np.frombuffer(bytes(data), dtype=np.uint8)
    inp = grpcclient.InferInput(name, [1, *array.shape], "UINT8")
    inp.set_data_from_numpy(array[None])
    return [inp], [grpcclient.InferRequestedOutput(n) for n in OUTPUTS]


def parse_result(result, labels: list[str]) -> list[dict]:
    n = int(result.as_numpy(names.NUM_DETECTIONS).reshape(-1)[0])
    boxes = result.as_numpy(names.DETECTION_BOXES).reshape(-1, 4)[:n]
    scores = result.as_numpy(names.DETECTION_SCORES).reshape(-1)[:n]
    ids = result.as_numpy(names.DETECTION_LABELS).reshape(-1)[:n]
    return [{"label": labels[i] if 0 <= i < len(labels) else str(int(i)), "label_id": int(i),
             "score": float(s), "box": [float(v) for v in b]} for b, s, i in zip(boxes, scores, ids)]


def infer_iter(client, payloads: Iterable, concurrency: int = 1, model: str | None = None) -> Iterator[tuple]:
    """Send each payload as its own request, at most ``concurrency`` in flight (async gRPC), and
    yield ``(InferResult or the exception it failed with, seconds from send to answer)`` in
    payload order.

    A payload is encoded image bytes (sent to ``fasterrcnn``) or a decoded HWC uint8 array (sent
    to ``fasterrcnn_raw``), unless ``model`` names another model with the same input.  A payload
    that is an exception (an input that could not be read) is yielded as ``(exception, None)``
    without a request.  ``payloads`` is consumed only as request slots free up, so a lazy iterable
    keeps few images in memory on a long run.
    """
    slots = threading.Semaphore(max(1, concurrency))
    ready = threading.Condition()
    answers: dict[int, tuple] = {}
    state: dict = {"count": None, "error": None}
    stop = threading.Event()

    def answer(index, t0, result, error):
        slots.release()
        with ready:
            answers[index] = (error if error is not None else result, time.perf_counter() - t0)
            ready.notify()

    def send():
        count = 0
        try:
            for i, data in enumerate(payloads):
                count = i + 1
                if isinstance(data, BaseException):
                    with ready:
                        answers[i] = (data, None)
                        ready.notify()
                    continue
                while not slots.acquire(timeout=0.2):
                    if stop.is_set():
                        return
                target = model or (names.ENSEMBLE_RAW if isinstance(data, np.ndarray) else names.ENSEMBLE)
                try:
                    inputs, outputs = _request(data)
                    client.async_infer(target, inputs, callback=functools.partial(answer, i, time.perf_counter()),
                                       outputs=outputs)
                except Exception as e:  # noqa: BLE001  this payload's failure (rejected before sending), not the run's
                    answer(i, time.perf_counter(), None, e)
        except BaseException as e:  # handed to the consumer, which raises it
            state["error"] = e
        finally:
            with ready:
                state["count"] = count
                ready.notify()

    sender = threading.Thread(target=send, name="infer_iter-send", daemon=True)
    sender.start()
    try:
        i = 0
        while True:
            with ready:
                while i not in answers and state["error"] is None and (state["count"] is None or i < state["count"]):
                    ready.wait()
                if i not in answers:
                    if state["error"] is not None:
                        raise state["error"]
                    return
                item = answers.pop(i)
            yield item
            i += 1
    finally:
        stop.set()


def infer_many(client, payloads: list, concurrency: int = 1, model: str | None = None) -> list:
    """:func:`infer_iter` as a list of InferResults or exceptions, one per payload."""
    return [result for result, _ in infer_iter(client, payloads, concurrency, model)]


def detect_iter(url: str, images: list[Path], concurrency: int = 1, draw_dir: Path | None = None,
                min_score: float | None = None, raw: bool = False,
                draw_max_side: int = output.DRAW_MAX_SIDE) -> Iterator[dict]:
    """Detect on image files; yield one record per image, in order, as answers arrive.

    A record is ``{"image", "detections", "latency_ms"}`` (+ ``"annotated"`` with ``draw_dir``),
    or ``{"image", "error", "detections": []}`` for an image that failed.  ``min_score``: the
    detections below it are dropped (None: records keep every detection, and drawings leave out
    those below :data:`output.DRAW_MIN_SCORE`).  ``draw_max_side``: drawings are scaled down to
    it (0: never).  ``raw``: decode here and send uint8 pixels to ``fasterrcnn_raw`` (the server
    then does no decoding).  Raises :class:`ClientError` (before any record) when the server or
    its model can't be used.
    """
    client = connect(url)
    config = check_model(client, names.ENSEMBLE_RAW if raw else names.ENSEMBLE, raw=raw)
    labels = class_names(config)
    if weights_warning(config):
        print(f"warning: {weights_warning(config)}", file=sys.stderr)
    annotated = output.annotated_paths(images, draw_dir) if draw_dir is not None else {}
    replies = infer_iter(client, read_payloads(images, raw), concurrency)
    for path, (res, seconds) in zip(images, replies):
        if isinstance(res, Exception):
            yield output.error_record(str(path), res.message() if hasattr(res, "message") else str(res))
            continue
        dets = [d for d in parse_result(res, labels) if min_score is None or d["score"] >= min_score]
        record = {"image": str(path), "detections": dets, "latency_ms": round(seconds * 1e3, 2)}
        if path in annotated:
            shown = output.DRAW_MIN_SCORE if min_score is None else min_score
            try:  # the pixels the server saw (decoded as it decodes them), not the file as an image viewer shows it
                output.draw(decode_image(path.read_bytes()), [d for d in dets if d["score"] >= shown], annotated[path],
                            max_side=draw_max_side)
                record["annotated"] = str(annotated[path])
            except (OSError, ValueError) as e:
                record["error"] = f"cannot write the annotated image {annotated[path]}: {e}"
        yield record


def run(url: str, images: list[Path], concurrency: int = 1, draw_dir: Path | None = None,
        min_score: float | None = None, raw: bool = False, draw_max_side: int = output.DRAW_MAX_SIDE) -> list[dict]:
    """:func:`detect_iter` as a list."""
    return list(detect_iter(url, images, concurrency, draw_dir, min_score, raw, draw_max_side))


def sample_images(folder: Path) -> list[Path]:
    """Write scikit-image's bundled photographs (no download) as JPEG/PNG files."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fmt in (("astronaut", "JPEG"), ("coffee", "JPEG"), ("chelsea", "PNG"), ("rocket", "JPEG")):
        path = folder / f"{name}.{fmt.lower().replace('jpeg', 'jpg')}"
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(path, format=fmt, quality=95)
        paths.append(path)
    return paths


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text}")
    return value


DESCRIPTION = """\
Detect objects in images with the fasterrcnn ensemble on a Triton server, over gRPC.

Prints one line per image (file, number of detections, top classes with scores, latency) and a
throughput line at the end; --json prints one JSON object per image instead (boxes as x1 y1 x2 y2
in original pixels, scores, class names), --output writes the same JSON lines to a file.
Before sending anything it checks the server's model metadata and config against what this
client expects, and fails with "expected X, got Y".  A bad input (missing, unreadable, empty,
not an image) gets its own error; the other images are still processed."""

EPILOG = """\
exit status:
  0  every image got detections
  1  some input or image failed (the others were still processed)
  2  usage error, or the server or model at --url can't be used"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" except for options that are off or unset by default."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=_HelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders (their image files) or globs")
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC endpoint HOST:PORT")
    p.add_argument("--concurrency", type=_positive_int, default=1, metavar="N",
                   help="requests in flight at once (one image per request)")
    p.add_argument("--raw", action="store_true",
                   help=f"decode images here and send pixels to {names.ENSEMBLE_RAW} (default: send the "
                        f"encoded files to {names.ENSEMBLE})")
    p.add_argument("--min-score", type=float, metavar="S",
                   help=f"drop detections below this score, from the output and the drawings (default: the output "
                        f"keeps every detection the server returns; --draw's drawings leave out those below "
                        f"{output.DRAW_MIN_SCORE}, so that the picture stays readable)")
    p.add_argument("--draw", type=Path, metavar="DIR",
                   help="write annotated copies into DIR as <file name>.png (x.jpg -> x.jpg.png; a second "
                        "x.jpg from another folder -> x.jpg.2.png); files of an earlier run are replaced")
    p.add_argument("--draw-max-side", type=_non_negative_int, default=output.DRAW_MAX_SIDE, metavar="PIXELS",
                   help="drawings of larger images are scaled down to this longest side (0: full size); lines "
                        "and captions scale with the drawing")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per image on stdout instead of the summary line")
    p.add_argument("--output", type=Path, metavar="FILE",
                   help="also write one JSON object per image to FILE (JSON lines)")
    p.add_argument("--no-progress", action="store_true",
                   help=f"no progress bar (default: shown on a terminal for runs of more than "
                        f"{output.PROGRESS_MIN_IMAGES} images)")
    return p


def main(argv=None, prog: str | None = None) -> int:
    """The command line; ``prog`` names it in the usage line (``fasterrcnn detect``)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        if args.draw is not None:
            args.draw.mkdir(parents=True, exist_ok=True)
        jsonl = open(args.output, "w", encoding="utf-8") if args.output is not None else None  # noqa: SIM115
    except OSError as e:
        parser.error(f"cannot write {e.filename}: {e.strerror}")
    with jsonl if jsonl is not None else contextlib.nullcontext():
        return _detect_and_report(args, jsonl)


def _detect_and_report(args, jsonl) -> int:
    images, problems = expand_inputs(args.images)
    report = output.Report(len(images) + len(problems), json_lines=args.json, jsonl=jsonl,
                           progress=not args.no_progress)
    try:
        for record in problems:
            report.add(record)
        if images:
            with report.timed():
                for record in detect_iter(args.url, images, args.concurrency, args.draw, args.min_score, args.raw,
                                          args.draw_max_side):
                    report.add(record)
    except ClientError as e:
        report.close(summary=False)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        report.close()
        print("interrupted", file=sys.stderr)
        return 130
    report.close()
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m client.detect"))
