"""Generated shape scenes: images whose objects and boxes are known exactly, from a seed.

Each scene is a textured background with 1-6 filled shapes of up to three classes (rectangle,
ellipse, triangle), each class with its own colour family, so that a detector trained briefly on
them (:mod:`evaluation.training`) gives confident, well separated scores.  The same
``(seed, index)`` always gives the same pixels, whatever the order of the calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Shape classes, label = index + 1 (0 is torchvision's background).  Each has a colour family
# (base RGB, jittered per object) so that colour alone separates the classes: a brief training run
# then gives confident scores, which is all the fp16 check needs.
SHAPES = ("rectangle", "ellipse", "triangle")
BASE_COLOURS = ((220, 50, 40), (40, 190, 60), (50, 80, 230))
COLOUR_JITTER = 25
# (height, width) of generated images: landscape and square, like the benchmark's photographs.
IMAGE_SIZES = ((384, 512), (352, 480), (416, 416), (320, 512))
MIN_OBJECTS, MAX_OBJECTS = 1, 6
MIN_SIDE, MAX_SIDE = 24, 180  # object box sides in pixels, before the transform's resize
HELD_OUT = 1 << 30  # self-check images use indices from here; training uses 0, 1, 2, ...


@dataclass
class Scene:
    """One generated image and its targets.

    image: ``[H, W, 3]`` uint8 RGB.  boxes: ``[N, 4]`` float32 (x1, y1, x2, y2) in pixels, the
    edges of the drawn pixels (a shape covering columns 10..19 has x1 = 10, x2 = 20).  labels: ``[N]``
    int64 in 1..K.  instances: ``[H, W]`` uint8, 0 for background and i + 1 where object i was drawn
    (objects do not overlap, so none hides another).
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    instances: np.ndarray


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour blobs (a few random colours upsampled bilinearly) plus fine grain: ``[H, W, 3]`` int16."""
    from PIL import Image

    cells = rng.integers(0, 256, size=(int(rng.integers(2, 7)), int(rng.integers(2, 7)), 3), dtype=np.uint8)
    # muted: the background's colours stay away from the saturated class colours
    cells = (cells.astype(np.int16) // 2 + 64).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(cells).resize((width, height), Image.BILINEAR), dtype=np.int16)
    stripes = rng.uniform(0, 12) * np.sin(np.arange(width) * rng.uniform(0.02, 0.3) + rng.uniform(0, 6.3))
    return smooth + stripes.astype(np.int16)[None, :, None]


def _place(rng: np.random.Generator, height: int, width: int, taken: list[tuple[int, int, int, int]]):
    """An object box (x0, y0, x1, y1), pixel-inclusive, that stays 2 px clear of the others; None if
    20 tries find no room."""
    for _ in range(20):
        bw = int(rng.integers(MIN_SIDE, min(MAX_SIDE, width - 2) + 1))
        aspect = rng.uniform(0.5, 2.0)
        bh = int(np.clip(round(bw / aspect), MIN_SIDE, min(MAX_SIDE, height - 2)))
        x0 = int(rng.integers(0, width - bw + 1))
        y0 = int(rng.integers(0, height - bh + 1))
        x1, y1 = x0 + bw - 1, y0 + bh - 1
        if all(x0 > b[2] + 2 or x1 < b[0] - 2 or y0 > b[3] + 2 or y1 < b[1] - 2 for b in taken):
            return x0, y0, x1, y1
    return None


def make_scene(seed: int, index: int, num_classes: int = len(SHAPES),
               size: tuple[int, int] | None = None) -> Scene:
    """The scene number ``index`` of the stream ``seed``: the same arguments give the same pixels.

    ``num_classes`` (K, 1..len(SHAPES)) shape classes are used; ``size`` (height, width) overrides
    the size picked from ``IMAGE_SIZES``.
    """
    from PIL import Image, ImageDraw

    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)} (shapes {SHAPES}), got {num_classes}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, index])
    height, width = size if size is not None else IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    if min(height, width) < MIN_SIDE + 2:
        raise ValueError(f"image size {height}x{width} is too small for objects of {MIN_SIDE} px")
    canvas = Image.fromarray(np.zeros((height, width, 3), np.uint8))
    mask = Image.new("L", (width, height), 0)
    draw, draw_mask = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    taken, labels = [], []
    for _ in range(int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))):
        box = _place(rng, height, width, taken)
        if box is None:
            continue
        label = int(rng.integers(1, num_classes + 1))
        colour = tuple(int(c) for c in np.clip(np.asarray(BASE_COLOURS[label - 1])
                                                + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255))
        x0, y0, x1, y1 = box
        shape = SHAPES[label - 1]
        apex = int(rng.integers(x0, x1 + 1))  # triangles: apex on the top edge, base on the bottom edge
        for d, fill in ((draw, colour), (draw_mask, len(taken) + 1)):  # the image and the instance map
            if shape == "rectangle":
                d.rectangle(box, fill=fill)
            elif shape == "ellipse":
                d.ellipse(box, fill=fill)
            else:
                d.polygon([(x0, y1), (x1, y1), (apex, y0)], fill=fill)
        taken.append(box)
        labels.append(label)
    instances = np.asarray(mask)
    background = _background(rng, height, width)
    pixels = np.where(instances[..., None] > 0, np.asarray(canvas, dtype=np.int16), background)
    # grain over everything, objects included, so that no region is flat
    pixels = pixels + rng.integers(-12, 13, size=pixels.shape, dtype=np.int16)
    image = np.clip(pixels, 0, 255).astype(np.uint8)
    boxes = np.array([(x0, y0, x1 + 1, y1 + 1) for x0, y0, x1, y1 in taken], np.float32).reshape(-1, 4)
    return Scene(image, boxes, np.array(labels, np.int64), instances)


class SyntheticScenes:
    """Map-style dataset: item ``i`` is ``make_scene(seed, i)`` as (image ``[H, W, 3]`` uint8 tensor,
    target dict of ``boxes`` float32 ``[N, 4]`` and ``labels`` int64 ``[N]``).  Deterministic per index,
    so the order and content don't depend on the number of DataLoader workers."""

    def __init__(self, length: int, seed: int = 0, num_classes: int = len(SHAPES), offset: int = 0):
        self.length, self.seed, self.num_classes, self.offset = length, seed, num_classes, offset

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        import torch

        s = make_scene(self.seed, self.offset + i, self.num_classes)
        return torch.from_numpy(s.image), {"boxes": torch.from_numpy(s.boxes), "labels": torch.from_numpy(s.labels)}


def collate(batch):
    """Lists, as torchvision detection models take them (images of different sizes)."""
    return tuple(zip(*batch))
