"""evaluation/coco.py, evaluation/coco_scenes.py and the evaluate command without a server: the
generated dataset, label -> category mapping, COCO results, COCOeval, the recorded weights, the
reference's settings check and the message without pycocotools.  The command through a real
server: tests/test_evaluate.py."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from client import evaluate as cli
from evaluation import coco
from evaluation import synthetic as sc
from evaluation.coco_scenes import ANNOTATIONS, CLASS_NAMES, IMAGES, boxes_xywh, write_scenes

pytest.importorskip("pycocotools", reason="pycocotools (the eval extra) is not installed")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    return folder, json.loads(write_scenes(folder, 5, seed=3).read_text())


def test_scene_dataset_is_the_generator_written_as_coco(dataset):
    from PIL import Image

    folder, data = dataset
    assert [c["name"] for c in data["categories"]] == list(sc.SHAPES)
    assert (folder / CLASS_NAMES).read_text().split() == ["__background__", *sc.SHAPES]
    assert [im["id"] for im in data["images"]] == [1, 2, 3, 4, 5]
    ids = [a["id"] for a in data["annotations"]]
    assert len(set(ids)) == len(ids)
    for i, image in enumerate(data["images"]):
        scene = sc.make_scene(3, sc.HELD_OUT + i)
        pixels = np.asarray(Image.open(folder / IMAGES / image["file_name"]).convert("RGB"))
        np.testing.assert_array_equal(pixels, scene.image)  # PNG: the scene's own pixels
        assert (image["height"], image["width"]) == scene.image.shape[:2]
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        np.testing.assert_allclose([a["bbox"] for a in anns], boxes_xywh(scene.boxes))
        assert [a["category_id"] for a in anns] == scene.labels.tolist()
        assert all(0 < a["area"] <= a["bbox"][2] * a["bbox"][3] for a in anns)


def test_scene_dataset_options(tmp_path):
    data = json.loads(write_scenes(tmp_path, 2, num_classes=2, image_format="jpeg", size=(96, 128),
                                   category_names=["person", "car"]).read_text())
    assert [c["name"] for c in data["categories"]] == ["person", "car"]
    assert all(im["file_name"].endswith(".jpg") and (im["height"], im["width"]) == (96, 128) for im in data["images"])
    for kwargs, message in ((dict(count=0), "count must be >= 1"), (dict(image_format="gif"), "image_format must be"),
                            (dict(category_names=["a"]), "expected 3 distinct category names")):
        with pytest.raises(ValueError, match=message):
            write_scenes(tmp_path, **{"count": 1, **kwargs})


def test_labels_map_to_categories_by_name_and_keep_the_files_ids():
    names = ["__background__", "rectangle", "ellipse", "triangle"]
    cats = [{"id": 7, "name": "ellipse"}, {"id": 3, "name": "rectangle"}]
    assert coco.label_categories(cats, names) == {2: 7, 1: 3}
    with pytest.raises(coco.EvaluationError, match=r"category ids 12 \('unicorn'\), 14 \('dragon'\) of the"):
        coco.label_categories(cats + [{"id": 12, "name": "unicorn"}, {"id": 14, "name": "dragon"}], names)


def test_results_are_xywh_with_the_category_ids():
    rows = coco.to_results(4, np.array([[10, 20, 40, 60], [0, 0, 5, 5]], np.float32), [0.9, 0.5], [2, 3], {2: 7})
    assert rows == [{"image_id": 4, "category_id": 7, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.9}]


def test_ground_truth_as_detections_scores_one_and_nothing_scores_zero(dataset):
    _, data = dataset
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in data["annotations"]]
    scored = coco.evaluate(data, perfect)
    assert set(scored.metrics) == set(coco.METRICS)
    for k in ("AP", "AP50", "AP75", "AR100"):
        assert scored.metrics[k] == pytest.approx(1.0), k
    assert set(scored.per_class) == set(sc.SHAPES)
    empty = coco.evaluate(data, [])
    assert empty.metrics["AP"] == 0.0 and empty.metrics["AR100"] == 0.0
    # a box shifted by a third of its width: the classes differ, the table names them
    shifted = [dict(r, bbox=[r["bbox"][0] + r["bbox"][2] / 3, *r["bbox"][1:]]) if r["category_id"] == 1 else r
               for r in perfect]
    worse = coco.evaluate(data, shifted)
    assert worse.metrics["AP"] < 1.0
    assert coco.classes_that_differ(worse, scored, 1)[0][0] == "rectangle"
    text = cli.table(worse, scored, len(data["images"]), 2)
    assert "torchvision" in text and "difference" in text and "rectangle" in text


def test_recorded_weights_are_read_from_the_provenance_manifest(tmp_path):
    with pytest.raises(coco.EvaluationError, match="pass --weights"):
        coco.recorded_weights(tmp_path)
    manifest = {"weights": {"source": "random", "digest": "random-91-3", "line": "random (seed 3, 91 classes)"},
                "settings": {"num_classes": 91}, "options": {"seed": 3, "num_classes": 91}}
    (tmp_path / coco.MANIFEST).write_text(json.dumps(manifest))
    assert coco.recorded_weights(tmp_path) == {"weights": "random", "seed": 3, "num_classes": 91, "arch": None}
    (tmp_path / coco.MANIFEST).write_text(json.dumps({**manifest, "weights": None}))
    with pytest.raises(coco.EvaluationError, match="records no weights"):
        coco.recorded_weights(tmp_path)


def test_the_reference_refuses_settings_that_differ_from_the_served_ones():
    import dataclasses

    from exporters.loading import random_model, settings_from_model

    served = settings_from_model(random_model(num_classes=4, min_size=128, max_size=160))
    model = coco.reference_model("random", served, device="cpu")
    assert model.transform.min_size == (128,) and model.transform.max_size == 160
    with pytest.raises(coco.EvaluationError, match=r"box_score_thresh 0.05 \(served 0.3\)"):
        coco.reference_model("random", dataclasses.replace(served, box_score_thresh=0.3), device="cpu")


def test_without_pycocotools_evaluate_says_how_to_install_it(monkeypatch, capsys, dataset):
    folder, _ = dataset
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    code = cli.main(["--annotations", str(folder / ANNOTATIONS), "--images", str(folder / IMAGES)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"error: {coco.INSTALL_HINT}"
    assert "pip install 'fasterrcnn-triton[eval]'" in err


def test_missing_images_and_bad_annotations_are_usage_errors(tmp_path, capsys, dataset):
    folder, _ = dataset
    assert cli.main(["--annotations", str(folder / ANNOTATIONS), "--images", str(tmp_path)]) == 2
    assert "5 of the 5 images are not in" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    assert cli.main(["--annotations", str(tmp_path / "bad.json"), "--images", str(tmp_path)]) == 2
    assert "lack annotations, categories" in capsys.readouterr().err


def test_fasterrcnn_evaluate_help(capsys):
    from fasterrcnn.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--help"])
    assert e.value.code == 0 and "usage: fasterrcnn evaluate" in capsys.readouterr().out
