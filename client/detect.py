"""gRPC client for the ``fasterrcnn`` ensemble.

    python -m client.detect IMAGE_OR_DIR_OR_GLOB... [--url 127.0.0.1:8001] [--concurrency N] [--draw DIR]

Prints one JSON object per image: boxes in original pixel coordinates, scores and class names.
Before sending anything it checks the server's model metadata and config against what this
client expects, and fails with "expected X, got Y".
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import sys
import threading
from pathlib import Path

import numpy as np

from python_backend import names

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class ClientError(RuntimeError):
    """The server can't be used as expected; the message says what differs."""


def expand_inputs(items: list[str]) -> list[Path]:
    """Image files, folders (their images) and globs -> sorted unique paths."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            matched = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matched:
                raise ClientError(f"no image found at {item!r}")
            paths += matched
    return list(dict.fromkeys(paths))


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


def check_model(client, model: str = names.ENSEMBLE) -> dict:
    """Check the ensemble's metadata and config; return its config as a dict (parameters included)."""
    from tritonclient.utils import InferenceServerException

    try:
        if not client.is_model_ready(model):
            raise ClientError(f"model {model!r} is not ready on the server")
        meta = client.get_model_metadata(model, as_json=True)
        config = client.get_model_config(model, as_json=True)["config"]
    except InferenceServerException as e:
        raise ClientError(f"model {model!r}: {e.message()}") from None
    inputs = {i["name"]: i for i in meta["inputs"]}
    _expect(f"{model} inputs", [names.IMAGE_BYTES], sorted(inputs))
    _expect(f"{model} input {names.IMAGE_BYTES!r} datatype", "BYTES", inputs[names.IMAGE_BYTES]["datatype"])
    outputs = {o["name"]: o for o in meta["outputs"]}
    expected = {names.DETECTION_BOXES: "FP32", names.DETECTION_SCORES: "FP32", names.DETECTION_LABELS: "INT32",
                names.NUM_DETECTIONS: "INT32"}
    _expect(f"{model} outputs", sorted(expected), sorted(outputs))
    for name, dtype in expected.items():
        _expect(f"{model} output {name!r} datatype", dtype, outputs[name]["datatype"])
    slots = int(outputs[names.DETECTION_BOXES]["shape"][-2])
    _expect(f"{model} output {names.DETECTION_BOXES!r} shape", ["-1", str(slots), "4"],
            [str(s) for s in outputs[names.DETECTION_BOXES]["shape"]])
    if int(config.get("max_batch_size", 0)) < 1:
        raise ClientError(f"{model} max_batch_size: expected at least 1, got {config.get('max_batch_size', 0)}")
    return config


def class_names(config: dict) -> list[str]:
    raw = config.get("parameters", {}).get("class_names", {}).get("string_value", "[]")
    return list(json.loads(raw))


def _request(data):
    """Encoded bytes -> an ``image`` input; a decoded HWC uint8 array -> an ``image_raw`` input."""
    import tritonclient.grpc as grpcclient

    if isinstance(data, np.ndarray):
        inp = grpcclient.InferInput(names.IMAGE_RAW, [1, *data.shape], "UINT8")
        inp.set_data_from_numpy(np.ascontiguousarray(data[None], dtype=np.uint8))
    else:
        inp = grpcclient.InferInput(names.IMAGE_BYTES, [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[data]], dtype=np.object_))
    outs = [grpcclient.InferRequestedOutput(n) for n in
            (names.DETECTION_BOXES, names.DETECTION_SCORES, names.DETECTION_LABELS, names.NUM_DETECTIONS)]
    return [inp], outs


def parse_result(result, labels: list[str]) -> list[dict]:
    n = int(result.as_numpy(names.NUM_DETECTIONS).reshape(-1)[0])
    boxes = result.as_numpy(names.DETECTION_BOXES).reshape(-1, 4)[:n]
    scores = result.as_numpy(names.DETECTION_SCORES).reshape(-1)[:n]
    ids = result.as_numpy(names.DETECTION_LABELS).reshape(-1)[:n]
    return [{"label": labels[i] if 0 <= i < len(labels) else str(int(i)), "label_id": int(i),
             "score": float(s), "box": [float(v) for v in b]} for b, s, i in zip(boxes, scores, ids)]


def infer_many(client, payloads: list, concurrency: int = 1, model: str | None = None) -> list:
    """Send each payload as its own request, at most ``concurrency`` in flight (async gRPC).

    A payload is encoded image bytes (sent to ``fasterrcnn``) or a decoded HWC uint8 array (sent
    to ``fasterrcnn_raw``), unless ``model`` names another model with the same input.  Returns, per
    payload, the InferResult or the InferenceServerException it failed with.
    """
    results: list = [None] * len(payloads)
    slots = threading.Semaphore(max(1, concurrency))
    done = threading.Event()
    remaining = [len(payloads)]
    lock = threading.Lock()

    def callback(index, result, error):
        results[index] = error if error is not None else result
        slots.release()
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()

    if not payloads:
        return results
    for i, data in enumerate(payloads):
        slots.acquire()
        inputs, outputs = _request(data)
        target = model or (names.ENSEMBLE_RAW if isinstance(data, np.ndarray) else names.ENSEMBLE)
        client.async_infer(target, inputs, callback=functools.partial(callback, i), outputs=outputs)
    done.wait()
    return results


def draw(image_path: Path, detections: list[dict], out_path: Path) -> None:
    from PIL import Image, ImageDraw

    img = Image.open(image_path).convert("RGB")
    pen = ImageDraw.Draw(img)
    for d in detections:
        x1, y1, x2, y2 = d["box"]
        pen.rectangle([x1, y1, x2, y2], outline=(255, 40, 40), width=2)
        pen.text((x1 + 2, y1 + 2), f"{d['label']} {d['score']:.2f}", fill=(255, 255, 0))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    img.save(out_path)


def decode_file(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def run(url: str, images: list[Path], concurrency: int = 1, draw_dir: Path | None = None,
        min_score: float = 0.0, raw: bool = False) -> list[dict]:
    """Detect on image files.  ``raw``: decode here and send uint8 pixels to ``fasterrcnn_raw``
    (for servers whose python backend can't read string tensors, see README)."""
    client = connect(url)
    config = check_model(client)
    labels = class_names(config)
    payloads = [decode_file(p) if raw else p.read_bytes() for p in images]
    results = infer_many(client, payloads, concurrency)
    out = []
    for path, res in zip(images, results):
        if isinstance(res, Exception):
            msg = res.message() if hasattr(res, "message") else str(res)
            out.append({"image": str(path), "error": msg, "detections": []})
            continue
        dets = [d for d in parse_result(res, labels) if d["score"] >= min_score]
        out.append({"image": str(path), "detections": dets})
        if draw_dir is not None:
            draw(path, dets, Path(draw_dir) / (path.stem + ".png"))
    return out


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files, folders or globs")
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC endpoint")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight")
    p.add_argument("--draw", type=Path, help="write annotated images into this folder")
    p.add_argument("--min-score", type=float, default=0.0, help="drop detections below this score")
    p.add_argument("--raw", action="store_true", help="decode here and send pixels to fasterrcnn_raw")
    args = p.parse_args(argv)
    try:
        results = run(args.url, expand_inputs(args.images), args.concurrency, args.draw, args.min_score, args.raw)
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps(r))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
