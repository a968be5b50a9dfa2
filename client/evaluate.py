"""``fasterrcnn evaluate``: COCO box mAP of the running server, beside torchvision's own.

    fasterrcnn evaluate --annotations instances.json --images DIR [--url 127.0.0.1:8001]
                        [--concurrency 8] [--results detections.json] [--reference [--weights W]] [--json]

Sends every image of a COCO annotation file, as its encoded file, to the ``fasterrcnn`` ensemble
over gRPC, writes the detections as COCO results JSON and scores them with pycocotools' COCOeval
(``bbox``).  ``--reference`` runs torchvision ``model.eval()`` with the same weights and settings on
the same images (decoded by Pillow, as a torchvision user decodes them) and prints both side by
side.  The library pieces are :mod:`evaluation.coco`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Iterable

from evaluation import coco
from python_backend import names

from . import detect

DESCRIPTION = """\
COCO box mAP (pycocotools' COCOeval) of the fasterrcnn ensemble on a running Triton server, and
with --reference of torchvision's model.eval() with the same weights on the same images.

Prints AP, AP50, AP75, APs, APm, APl and AR100 (served, torchvision and their difference) and the
classes whose AP differs most; --json prints one object instead:
  {"served": {"AP": ...}, "reference": {...} (with --reference), "images": N}
Model labels map to the annotation file's categories by class name (the file's category ids are
kept); a category no class is named after is an error that names its id."""

EPILOG = """\
exit status:
  0  every image was served and scored
  1  some images failed on the server (their detections are missing from the served mAP)
  2  usage error, unreadable annotations or images, no usable server, pycocotools missing"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text}")
    return value


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", type=Path, required=True, metavar="FILE", help="COCO instances JSON")
    p.add_argument("--images", type=Path, required=True, metavar="DIR",
                   help="the folder the annotations' file_name entries are relative to")
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC endpoint HOST:PORT (default: %(default)s)")
    p.add_argument("--concurrency", type=_positive_int, default=8, metavar="N",
                   help="requests in flight at once (default: %(default)s)")
    p.add_argument("--results", type=Path, default=Path("detections.json"), metavar="FILE",
                   help="where the served detections go as COCO results JSON; with --reference, "
                        "torchvision's go beside it as FILE's name with .reference before the suffix "
                        "(default: %(default)s)")
    p.add_argument("--reference", action="store_true",
                   help="also run torchvision's model.eval() with the same weights on the same images")
    p.add_argument("--weights", metavar="coco|random|PATH",
                   help="the reference's weights, as for export (default: those the served repository's "
                        "provenance.json records, in --repository)")
    p.add_argument("--arch", metavar="BUILDER", default=None,
                   help="the reference's torchvision builder, as for export (default: the recorded one with the "
                        "recorded weights; with --weights, a checkpoint's own, else fasterrcnn_resnet50_fpn)")
    p.add_argument("--seed", type=int, default=None, help="seed of --weights random (default: the recorded one, or 0)")
    p.add_argument("--repository", type=Path, default=None, metavar="DIR",
                   help="the served model repository, for its provenance.json (default: ./model_repository of "
                        "this checkout)")
    p.add_argument("--reference-device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where torchvision runs (auto: CUDA where there is a GPU; default: %(default)s)")
    p.add_argument("--reference-precision", default="fp32", choices=("fp32", "fp16"),
                   help="fp32 (TF32 off) or fp16 (CUDA autocast) for torchvision (default: %(default)s)")
    p.add_argument("--top-classes", type=int, default=5, metavar="N",
                   help="per-class AP of the N classes whose AP differs most (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


class Progress:
    """``label  done/total  images/s  ETA m:ss`` on one line of stderr (a terminal only), and a
    closing line with the count, seconds and images/s."""

    def __init__(self, label: str, total: int, show: bool = True):
        self.label, self.total, self.done = label, total, 0
        self.show = show and sys.stderr.isatty()
        self.t0 = self._last = time.perf_counter()

    def tick(self) -> None:
        self.done += 1
        now = time.perf_counter()
        if self.show and (now - self._last >= 0.2 or self.done == self.total):
            self._last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = int(round((self.total - self.done) / rate)) if rate > 0 else 0
            width = 30
            bar = "#" * (width * self.done // max(self.total, 1))
            print(f"\r{self.label} [{bar:<{width}}] {self.done}/{self.total}  {rate:.1f} images/s  "
                  f"ETA {eta // 60}:{eta % 60:02d} ", end="", file=sys.stderr, flush=True)

    def close(self) -> float:
        seconds = time.perf_counter() - self.t0
        if self.show:
            print(file=sys.stderr)
        print(f"{self.label}: {self.done} images in {seconds:.1f} s, {self.done / max(seconds, 1e-9):.1f} images/s",
              file=sys.stderr)
        return seconds


def _payloads(paths: Iterable[Path]):
    for path in paths:
        try:
            yield path.read_bytes()
        except OSError as e:
            yield detect.ImageError(f"cannot read {path}: {e.strerror or e}")


def served_results(client, annotations: dict, paths: list[Path], label_to_category: dict, concurrency: int,
                   progress: bool = True) -> tuple[list[dict], list[str]]:
    """(COCO results of every image, error lines of the images that failed), each image its own
    ``fasterrcnn`` request, ``concurrency`` in flight."""
    labels: list[str] = []  # the ids are what matter here; names only fill the records
    bar = Progress("served", len(paths), progress)
    results, errors = [], []
    replies = detect.infer_iter(client, _payloads(paths), concurrency, names.ENSEMBLE)
    for image, path, (res, _) in zip(annotations["images"], paths, replies):
        if isinstance(res, Exception):
            errors.append(f"{path}: {res.message() if hasattr(res, 'message') else res}")
        else:
            dets = detect.parse_result(res, labels)
            results += coco.to_results(image["id"], [d["box"] for d in dets], [d["score"] for d in dets],
                                       [d["label_id"] for d in dets], label_to_category)
        bar.tick()
    bar.close()
    return results, errors


def served_settings(client):
    """The served repository's DetectorSettings, from its preprocess step's config parameters."""
    from python_backend.settings import DetectorSettings

    config = client.get_model_config(names.PREPROCESS, as_json=True)["config"]
    return DetectorSettings.from_parameters(config.get("parameters", {}))


def reference_model(args, settings):
    """torchvision's model with ``--weights`` (default: the served repository's recorded weights) and
    the served settings, on ``--reference-device``."""
    if args.weights is not None:
        source = {"weights": args.weights, "seed": args.seed or 0, "arch": None}
    else:
        from fasterrcnn.options import DEFAULT_REPOSITORY

        source = coco.recorded_weights(args.repository or DEFAULT_REPOSITORY)
        if args.seed is not None:
            source["seed"] = args.seed
    return coco.reference_model(source["weights"], settings, source["seed"], args.reference_device,
                                args.arch or source.get("arch"))


def reference_results(model, annotations: dict, paths: list[Path], label_to_category: dict, precision: str,
                      progress: bool = True) -> list[dict]:
    """torchvision's COCO results on the same images (Pillow's pixels)."""
    bar = Progress(f"torchvision ({next(model.parameters()).device.type}, {precision})", len(paths), progress)
    results = []
    for image, (boxes, scores, labels) in zip(annotations["images"],
                                              coco.reference_detections(model, paths, precision, bar.tick)):
        results += coco.to_results(image["id"], boxes, scores, labels, label_to_category)
    bar.close()
    return results


def _write(path: Path, results: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def table(served: coco.Evaluation, reference: coco.Evaluation | None, images: int, top: int) -> str:
    """The terminal report: one row per metric; with a reference, its column, the difference and the
    classes whose AP differs most."""
    head = f"{'metric':<8}{'served':>10}"
    if reference is not None:
        head += f"{'torchvision':>13}{'difference':>12}"
    lines = [f"COCO box mAP on {images} images (pycocotools COCOeval, bbox)", head]
    diff = coco.differences(served, reference) if reference is not None else {}
    for k in coco.METRICS:
        row = f"{k:<8}{_fmt(served.metrics[k]):>10}"
        if reference is not None:
            d = diff[k]
            row += f"{_fmt(reference.metrics[k]):>13}{'n/a' if d is None else f'{d:+.4f}':>12}"
        lines.append(row)
    if reference is not None and top > 0:
        rows = coco.classes_that_differ(served, reference, top)
        if rows:
            lines.append("classes whose AP differs most (served, torchvision, difference):")
            lines += [f"  {name}: {a:.4f}, {b:.4f}, {a - b:+.4f}" for name, a, b in rows]
    return "\n".join(lines)


def _paths(args, annotations: dict) -> list[Path]:
    from evaluation.coco_scenes import image_paths

    paths = image_paths(annotations, args.images)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise coco.EvaluationError(f"{len(missing)} of the {len(paths)} images are not in {args.images}: "
                                   f"{', '.join(str(p) for p in missing[:3])}{'...' if len(missing) > 3 else ''}")
    return paths


def main(argv=None, prog: str | None = None) -> int:
    """The command line; ``prog`` names it in the usage line (``fasterrcnn evaluate``)."""
    args = build_parser(prog).parse_args(argv)
    try:
        coco.require_pycocotools()
        annotations = coco.read_annotations(args.annotations)
        paths = _paths(args, annotations)
        client = detect.connect(args.url)
        class_names = detect.class_names(detect.check_model(client, names.ENSEMBLE))
        label_to_category = coco.label_categories(annotations["categories"], class_names)
        model = reference_model(args, served_settings(client)) if args.reference else None  # fails before the run
        served, errors = served_results(client, annotations, paths, label_to_category, args.concurrency,
                                        not args.no_progress)
        _write(args.results, served)
        reference = None
        if model is not None:
            reference = reference_results(model, annotations, paths, label_to_category, args.reference_precision,
                                          not args.no_progress)
            _write(args.results.with_name(f"{args.results.stem}.reference{args.results.suffix}"), reference)
    except (coco.EvaluationError, detect.ClientError, OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    scored = coco.evaluate(annotations, served)
    scored_ref = coco.evaluate(annotations, reference) if reference is not None else None
    if args.json:
        out = {"served": scored.metrics}
        if scored_ref is not None:
            out["reference"] = scored_ref.metrics
        out["images"] = len(paths)
        print(json.dumps(out))
    else:
        print(table(scored, scored_ref, len(paths), args.top_classes))
    if errors:
        print(f"{len(errors)} of {len(paths)} images failed on the server: their detections are missing from the "
              "served mAP", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m client.evaluate"))
