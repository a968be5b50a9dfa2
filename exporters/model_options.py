"""Which detector to export: :class:`ModelOptions`.

Apart from the export core (:mod:`exporters.export`) so that the command line can parse and check
its options without importing torch; :func:`exporters.loading.load` loads the model it names.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from python_backend.settings import check_canvases

from . import provenance

DEFAULT_ARCH = "fasterrcnn_resnet50_fpn"  # the builder of a random or COCO model when none is named
WEIGHT_SOURCES = ("coco", "random")  # or the path of a state_dict checkpoint
# torchvision's FasterRCNN_ResNet50_FPN_Weights.DEFAULT by name (tests/test_cli_usage.py checks it)
COCO_DIGEST = "torchvision-COCO_V1"


@dataclass(frozen=True)
class ModelOptions:
    """Which detector to export, and the canvases its rpn runs on.

    ``weights``: ``"coco"`` (torchvision's COCO weights, through torchvision's download cache),
    ``"random"`` (seeded random weights with ``num_classes`` classes, offline) or the path of a
    ``fasterrcnn_resnet50_fpn`` state_dict (its class count comes from the file).
    ``min_size``/``max_size``: torchvision's resize, None for the model's own (800/1333).
    ``canvases``: ``"auto"`` (:func:`python_backend.settings.default_canvases` of the model's
    resize: every image fits one) or ((height, width), ...), multiples of 32.  Each request is
    padded onto the smallest that holds it.
    """

    weights: str = "random"
    arch: str | None = None  # exporters.builders.ARCHS; None: a checkpoint's own, else fasterrcnn_resnet50_fpn
    num_classes: int = 91
    seed: int = 0
    class_names: str | None = None
    min_size: int | None = None
    max_size: int | None = None
    canvases: str | tuple[tuple[int, int], ...] = "auto"

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError("weights must be 'coco', 'random' or a checkpoint path, got ''")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background included), got {self.num_classes}")
        if isinstance(self.canvases, str):
            if self.canvases != "auto":
                raise ValueError(f"canvases must be 'auto' or ((height, width), ...), got {self.canvases!r}")
        else:
            object.__setattr__(self, "canvases", check_canvases(self.canvases))

    @property
    def is_random(self) -> bool:
        return self.weights == "random"

    def digest(self) -> str:
        """Names the weights for cache keys: the checkpoint file's SHA-256, or what makes them."""
        arch = self.arch or DEFAULT_ARCH
        if self.weights == "coco":
            return COCO_DIGEST if arch == DEFAULT_ARCH else f"torchvision-{arch}-COCO_V1"
        if self.weights == "random":
            return f"random-{self.num_classes}-{self.seed}" + ("" if arch == DEFAULT_ARCH else f"-{arch}")
        h = hashlib.sha256()
        with open(self.weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def weights_record(self) -> dict:
        """The weights as the repository's provenance records them (:mod:`exporters.provenance`)."""
        source = self.weights if self.weights in WEIGHT_SOURCES else str(Path(self.weights).resolve())
        return provenance.weights_record(source, self.digest(), self.seed, self.num_classes)
