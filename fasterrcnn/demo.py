"""``fasterrcnn demo``: export, serve, detect on sample photographs, and say what the pictures mean."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .options import Options
from .serve import Stopped, ensure_repository, ignore_stop_signals, make_server, stop_signals

log = logging.getLogger(__name__)


def choose_weights(weights: str) -> str:
    """``auto``: torchvision's COCO weights when they are in torch's cache (no download), else random."""
    if weights != "auto":
        return weights
    from exporters.loading import coco_weights_cached

    return "coco" if coco_weights_cached() else "random"


def weights_statement(weights: str, command: str = "python -m fasterrcnn demo") -> str:
    """What the demo's detections and annotated pictures mean, given the weights they came from."""
    if weights == "random":
        return ("Weights: seeded RANDOM weights, not a trained model. The boxes, labels and "
                "scores in these pictures are meaningless: an untrained detector draws confident-looking "
                "boxes anywhere. They only show that every step of the pipeline runs.\n"
                f"For real detections: {command} --weights coco (downloads torchvision's COCO weights, "
                f"about 160 MB, once) or {command} --weights path/to/checkpoint.pt")
    if weights == "coco":
        return ("Weights: torchvision's COCO weights (fasterrcnn_resnet50_fpn, COCO_V1). The boxes and labels "
                "are real detections of COCO's classes, equal to torchvision's model.eval()([image]).")
    return (f"Weights: your checkpoint {weights}. The boxes and labels are its detections, named by "
            "--class-names (class_<i> without it).")


def demo(options: Options, out: Path, command: str = "python -m fasterrcnn demo") -> int:
    """Export (always: the repository follows the options), serve, detect on scikit-image's photos."""
    from client import detect

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_repository(options, rebuild=True)
    server = make_server(options)
    with stop_signals():
        try:
            server.start()
            images = detect.sample_images(out / "samples")
            results = detect.run(server.grpc_url, images, concurrency=2, draw_dir=out / "annotated")
        except Stopped as e:
            log.info("%s: stopping", e)
            return 128 + e.signum
        finally:
            ignore_stop_signals()
            server.stop()
    for item in results:
        name = Path(item["image"]).name
        if item.get("error"):
            print(f"{name}: error: {item['error']}")
            continue
        top = ", ".join(f"{d['label']} {d['score']:.2f}" for d in item["detections"][:5])
        print(f"{name}: {len(item['detections'])} detections; top: {top}")
    (out / "detections.json").write_text(json.dumps(results, indent=1))
    print(f"detections: {out / 'detections.json'}; annotated images: {out / 'annotated'}")
    print(weights_statement(options.weights, command))
    return 1 if any(item.get("error") for item in results) else 0
