"""The generated scenes (:mod:`evaluation.synthetic`) written out as a COCO detection dataset.

    DIR/instances.json      COCO "instances" annotations: images, categories, annotations
    DIR/images/scene_<i>.png (or .jpg)
    DIR/class_names.txt     background first, then the category names: ``export --class-names``

Scene ``i`` of the dataset is ``make_scene(seed, HELD_OUT + i)``: images the trainer
(:mod:`evaluation.training`, which uses indices 0, 1, 2, ...) never saw.  Categories are numbered
1..K, the labels the scenes carry (torchvision's label ids of a model trained on them); a box is
COCO's ``[x, y, width, height]`` of the drawn pixels' extent and ``area`` counts the drawn pixels.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from evaluation.synthetic import HELD_OUT, SHAPES, make_scene

ANNOTATIONS = "instances.json"
IMAGES = "images"
CLASS_NAMES = "class_names.txt"
FORMATS = {"png": ("PNG", ".png"), "jpeg": ("JPEG", ".jpg")}


def scene_annotations(index: int, scene, file_name: str, first_annotation_id: int) -> tuple[dict, list[dict]]:
    """(COCO image record, its annotation records) of one scene; image ids start at 1."""
    h, w = scene.image.shape[:2]
    image = {"id": index + 1, "file_name": file_name, "width": int(w), "height": int(h)}
    annotations = []
    for k, (box, label) in enumerate(zip(scene.boxes, scene.labels)):
        x1, y1, x2, y2 = (float(v) for v in box)
        annotations.append({"id": first_annotation_id + k, "image_id": index + 1, "category_id": int(label),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float((scene.instances == k + 1).sum()),
                            "iscrowd": 0})
    return image, annotations


def write_scenes(folder: str | Path, count: int, seed: int = 0, num_classes: int = len(SHAPES),
                 image_format: str = "png", quality: int = 95, size: tuple[int, int] | None = None,
                 category_names: Sequence[str] | None = None) -> Path:
    """Write ``count`` generated scenes as a COCO dataset under ``folder``; returns the annotation
    file's path.

    ``image_format``: "png" (lossless: the pixels are the scene's) or "jpeg" (Pillow, ``quality``,
    4:2:0).  ``size``: (height, width) of every image (default: the generator's mix of sizes).
    ``category_names``: the K names (default: the shapes' names); a served model's class names
    must hold them (``fasterrcnn evaluate`` maps its labels to categories by name).
    """
    from PIL import Image

    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if image_format not in FORMATS:
        raise ValueError(f"image_format must be one of {sorted(FORMATS)}, got {image_format!r}")
    names = list(category_names) if category_names is not None else list(SHAPES[:num_classes])
    if len(names) != num_classes or len(set(names)) != len(names):
        raise ValueError(f"expected {num_classes} distinct category names, got {names}")
    folder = Path(folder)
    (folder / IMAGES).mkdir(parents=True, exist_ok=True)
    pil_format, suffix = FORMATS[image_format]
    images, annotations = [], []
    for i in range(count):
        scene = make_scene(seed, HELD_OUT + i, num_classes, size)
        file_name = f"scene_{i:06d}{suffix}"
        extra = {"quality": quality} if pil_format == "JPEG" else {}
        Image.fromarray(scene.image).save(folder / IMAGES / file_name, format=pil_format, **extra)
        image, anns = scene_annotations(i, scene, file_name, len(annotations) + 1)
        images.append(image)
        annotations += anns
    dataset = {"info": {"description": f"generated scenes: seed {seed}, indices {HELD_OUT}..{HELD_OUT + count - 1}, "
                                       f"{num_classes} classes (evaluation/synthetic.py)"},
               "images": images, "annotations": annotations,
               "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(names)]}
    path = folder / ANNOTATIONS
    path.write_text(json.dumps(dataset))
    (folder / CLASS_NAMES).write_text("\n".join(["__background__", *names]) + "\n")
    return path


def image_paths(annotations: dict, folder: str | Path) -> list[Path]:
    """The file of every image record of a COCO annotation dict, under ``folder``, in record order."""
    return [Path(folder) / image["file_name"] for image in annotations["images"]]


def boxes_xywh(boxes: np.ndarray) -> np.ndarray:
    """``[N, 4]`` (x1, y1, x2, y2) -> COCO's ``[N, 4]`` (x, y, width, height), float64."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)
