"""``fasterrcnn evaluate`` through a real tritonserver on the CPU (one server for the module), and
the JPEG kinds' detections on that server.

The served model is the small test model (seeded random weights, COCO's 91 class names, 256/320
resize).  The dataset is the generated scenes written as COCO (evaluation/coco_scenes.py) with
COCO category names.  Random weights score near zero against the scenes' own boxes, where any two
detection sets tie; so for the comparison with torchvision the ground truth is torchvision's own
best detections on those images, which puts both mAPs where a changed box, score or label moves
them.  Served and torchvision fp32 must agree to 1e-3.  (A trained checkpoint can't be made on a
CPU in CI's time; ``benchmarks/train_synthetic.py`` makes one on a GPU, README "Model card".)
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data

import jpeg_kinds
from client import detect
from client import evaluate as cli
from evaluation import coco
from evaluation.coco_scenes import ANNOTATIONS, IMAGES, write_scenes
from evaluation.parity import assert_parity, from_packed, torchvision_detect
from exporters import provenance
from exporters.repository import RepositoryOptions, write_repository
from fasterrcnn.server import TritonServer, free_port
from python_backend import names

pytestmark = pytest.mark.triton
pytest.importorskip("pycocotools", reason="pycocotools (the eval extra) is not installed")
pytest.importorskip("tritonclient.grpc")

SCENES = 4
CATEGORIES = ["person", "bicycle", "car"]  # COCO names, so the small model's classes map onto them
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def server(small_export, tmp_path_factory):
    settings, paths = small_export
    repo = tmp_path_factory.mktemp("evaluate_repo")
    weights = provenance.weights_record("random", "random-91-0", seed=0, num_classes=settings.num_classes)
    write_repository(repo, settings, paths, RepositoryOptions(max_batch_size=4, queue_delay_us=50_000), link=True,
                     weights=weights, options_record={"weights": "random", "seed": 0,
                                                      "num_classes": settings.num_classes})
    srv = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    srv.start(timeout=240)
    yield srv, repo
    srv.stop()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coco_scenes")
    write_scenes(folder, SCENES, seed=5, image_format="jpeg", category_names=CATEGORIES)
    return folder


def _evaluate(capsys, server_repo, folder, annotations, *extra):
    srv, repo = server_repo
    code = cli.main(["--annotations", str(annotations), "--images", str(folder / IMAGES), "--url", srv.grpc_url,
                     "--concurrency", "3", "--results", str(folder / f"{annotations.stem}.results.json"),
                     "--repository", str(repo), "--no-progress", *extra])
    out, err = capsys.readouterr()
    assert code == 0, f"{err}\n--- server log ---\n{srv.log_text()[-4000:]}"
    return out, err


def _assert_equal_maps(result: dict, what: str) -> None:
    assert result["images"] == SCENES
    assert set(result["served"]) == set(result["reference"]) == set(coco.METRICS)
    for k in coco.METRICS:
        a, b = result["served"][k], result["reference"][k]
        assert (a is None) == (b is None), (what, k, a, b)
        if a is not None:
            assert abs(a - b) <= TOLERANCE, f"{what}: {k} served {a} vs torchvision {b}"


def test_evaluate_scores_the_generated_scenes(server, scenes, capsys):
    """The scenes' own ground truth: the served mAP as JSON, the detections as COCO results."""
    out, err = _evaluate(capsys, server, scenes, scenes / ANNOTATIONS, "--json")
    result = json.loads(out)
    assert set(result) == {"served", "images"} and result["images"] == SCENES
    assert set(result["served"]) == set(coco.METRICS)
    assert f"served: {SCENES} images in" in err and "images/s" in err
    written = json.loads((scenes / "instances.results.json").read_text())
    # random weights seldom pick these three of 91 classes: the file may hold few rows
    assert isinstance(written, list) and all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in written)
    assert {r["category_id"] for r in written} <= {1, 2, 3}


def test_served_map_equals_torchvisions_where_the_map_is_high(server, scenes, small_model, capsys):
    """Ground truth = torchvision's ten best detections of each image on Pillow's pixels: a high mAP,
    where a differing detection shows.  The reference's weights: those the repository's
    provenance.json records."""
    data = json.loads((scenes / ANNOTATIONS).read_text())
    settings_names = detect.class_names(detect.check_model(detect.connect(server[0].grpc_url)))
    anns, used = [], set()
    for image in data["images"]:
        dets = torchvision_detect(small_model, coco.pillow_pixels(scenes / IMAGES / image["file_name"]))
        best = [(box, label) for box, label in zip(dets.boxes, dets.labels) if settings_names[label] != "N/A"][:10]
        for box, label in best:
            x1, y1, x2, y2 = (float(v) for v in box)
            anns.append({"id": len(anns) + 1, "image_id": image["id"], "category_id": int(label),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
            used.add(int(label))
    assert len(anns) >= 5 * SCENES, "weak test: torchvision found few detections"
    pseudo = scenes / "pseudo.json"
    pseudo.write_text(json.dumps({**data, "annotations": anns,
                                  "categories": [{"id": i, "name": settings_names[i]} for i in sorted(used)]}))
    out, _ = _evaluate(capsys, server, scenes, pseudo, "--reference", "--json")
    result = json.loads(out)
    _assert_equal_maps(result, "torchvision's confident detections")
    assert result["reference"]["AP50"] > 0.3, result
    assert (scenes / "pseudo.results.reference.json").is_file()


def test_a_category_the_model_lacks_is_an_error_naming_its_id(server, scenes, tmp_path, capsys):
    srv, _ = server
    data = json.loads((scenes / ANNOTATIONS).read_text())
    data["categories"].append({"id": 77, "name": "unicorn"})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    code = cli.main(["--annotations", str(bad), "--images", str(scenes / IMAGES), "--url", srv.grpc_url,
                     "--no-progress", "--results", str(tmp_path / "r.json")])
    assert code == 2 and "category ids 77 ('unicorn')" in capsys.readouterr().err


def test_every_jpeg_kind_gets_torchvisions_detections_on_pillows_pixels(server, small_model):
    """4:2:0, 4:2:2, 4:4:4, progressive, grayscale and CMYK through the encoded entry point, alone and
    together: torchvision's fp32 detections on ``PIL.Image.open(f).convert("RGB")``."""
    srv, _ = server
    client = detect.connect(srv.grpc_url)
    photo = skimage.data.astronaut()
    jpegs = {kind: jpeg_kinds.jpeg(photo, kind) for kind in jpeg_kinds.KINDS}
    for kind, data in jpegs.items():
        jpeg_kinds.check_kind(data, kind)
    reference = {k: torchvision_detect(small_model, jpeg_kinds.pillow_pixels(d)) for k, d in jpegs.items()}
    assert not np.array_equal(jpeg_kinds.pillow_pixels(jpegs["4:2:0"]), jpeg_kinds.pillow_pixels(jpegs["4:4:4"]))
    for concurrency in (1, len(jpegs)):
        for (kind, _), res in zip(jpegs.items(), detect.infer_many(client, list(jpegs.values()), concurrency)):
            assert not isinstance(res, Exception), f"{kind}: {res}"
            ours = from_packed(*(res.as_numpy(n) for n in (names.DETECTION_BOXES, names.DETECTION_SCORES,
                                                          names.DETECTION_LABELS, names.NUM_DETECTIONS)))
            assert_parity(reference[kind], ours, f"{kind} JPEG (concurrency {concurrency})")
