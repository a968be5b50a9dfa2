"""The export core: a torch detector -> ONNX or TorchScript (-> TensorRT engines) -> model repository.

Library only.  :func:`export` takes a :class:`ModelOptions` (which detector, on which canvas) and
the repository's :class:`~exporters.repository_options.RepositoryOptions`; the command line that builds
both from its arguments or from the Docker environment is ``python -m fasterrcnn``.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from python_backend.settings import DetectorSettings, check_canvases, format_canvases

from . import loading, provenance
from .repository import RepositoryOptions, write_repository
from .tensorrt.gpus import GpuInfo, cuda_devices, plan_targets

log = logging.getLogger(__name__)

WEIGHT_SOURCES = ("coco", "random")  # or the path of a state_dict checkpoint
COCO_DIGEST = "torchvision-" + loading.FasterRCNN_ResNet50_FPN_Weights.DEFAULT.name


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

    def load(self):
        """The torchvision model in eval mode (raises loading.CheckpointError for a bad checkpoint)."""
        sizes = {"min_size": self.min_size, "max_size": self.max_size}
        arch = self.arch or loading.DEFAULT_ARCH
        if self.weights == "random":
            return loading.random_model(self.num_classes, seed=self.seed, arch=arch, **sizes)
        if self.weights == "coco":
            return loading.coco_model(arch, **sizes)
        return loading.checkpoint_model(self.weights, self.arch, **sizes)

    def digest(self) -> str:
        """Names the weights for cache keys: the checkpoint file's SHA-256, or what makes them."""
        arch = self.arch or loading.DEFAULT_ARCH
        if self.weights == "coco":
            return COCO_DIGEST if arch == loading.DEFAULT_ARCH else f"torchvision-{arch}-COCO_V1"
        if self.weights == "random":
            return f"random-{self.num_classes}-{self.seed}" + ("" if arch == loading.DEFAULT_ARCH else f"-{arch}")
        h = hashlib.sha256()
        with open(self.weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def weights_record(self) -> dict:
        """The weights as the repository's provenance records them (:mod:`exporters.provenance`)."""
        source = self.weights if self.weights in WEIGHT_SOURCES else str(Path(self.weights).resolve())
        return provenance.weights_record(source, self.digest(), self.seed, self.num_classes)


def load_model(options: ModelOptions):
    """(model, settings): the model and every setting the serving pipeline reads from it."""
    model = options.load()
    num_classes = int(model.roi_heads.box_predictor.cls_score.out_features)
    class_names = loading.read_class_names(options.class_names, num_classes)
    return model, loading.settings_from_model(model, options.canvases, class_names)


def export(model: ModelOptions, repo: RepositoryOptions, out: str | Path, **kw) -> Path:
    """Load the detector of ``model`` and write a model repository for ``repo`` to ``out``.

    Keyword arguments are :func:`export_loaded`'s.  Returns ``out``.
    """
    log.info("[1/3] loading the model (weights: %s)", model.weights)
    loaded = load_model(model)
    return export_loaded(*loaded, model, repo, out, **kw)


def serving_devices(gpus: Sequence[int] = ()) -> list[GpuInfo]:
    """The CUDA devices the repository's GPU instances will run on: ``gpus`` (every visible device
    when empty), as the driver reports them (name, compute capability)."""
    devices = cuda_devices()
    if not gpus:
        return devices
    missing = sorted(set(gpus) - {d.index for d in devices})
    if missing:
        raise ValueError(f"GPU ids {missing} are not among the visible CUDA devices "
                         f"{[d.index for d in devices]}")
    return [d for d in devices if d.index in gpus]


def export_loaded(detector, settings: DetectorSettings, model: ModelOptions, repo: RepositoryOptions,
                  out: str | Path, work_dir: str | Path | None = None, timing_cache_dir: str | Path | None = None,
                  devices: Sequence[GpuInfo] | None = None, printer: Callable[[str], None] | None = None,
                  options_record: dict | None = None) -> Path:
    """:func:`export` for an already loaded detector (``load_model``'s pair).

    ``work_dir``: where the ONNX files, traces and engines are written before they are copied
    into the repository (kept); None: a temporary folder.  tensorrt target: ``devices`` are the
    GPUs that will serve (default :func:`serving_devices` of ``repo.gpus``), one engine is built
    per distinct compute capability among them; ``timing_cache_dir`` keeps TensorRT's timing cache
    per GPU model; ``printer`` gets the build's progress.  ``options_record``: the command's
    options, kept in the repository's ``provenance.json`` beside the weights.
    """
    t0 = time.monotonic()
    out = Path(out)
    canvases = format_canvases(settings.canvases)
    recorded = dict(weights=model.weights_record(), options_record=options_record)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        if repo.target == "torch":
            from .torch_export import export_torch

            log.info("[2/3] tracing the header and the rpn at each canvas %s (TorchScript, %s, on %s)",
                     canvases, repo.torch_precision, repo.device)
            traces = export_torch(detector, settings, work / "torch", device=repo.device,
                                  precision=repo.torch_precision,
                                  unmasked=repo.torch_unmasked_rpn)
            log.info("[3/3] writing the model repository to %s (target torch, device %s)", out, repo.device)
            write_repository(out, settings, {}, repo, torch_models=traces, **recorded)
        else:
            from .onnx_export import export_all

            log.info("[2/3] exporting rpn and header to ONNX (the rpn for the canvases %s)", canvases)
            onnx_paths = export_all(detector, settings, work / "onnx")
            plans = None
            targets = None
            if repo.target == "tensorrt":
                from .tensorrt.build import build_plans_per_gpu

                targets = plan_targets(serving_devices(repo.gpus) if devices is None else devices)
                log.info("[2/3] building TensorRT engines (%s) for compute capability %s; this takes minutes",
                         repo.trt_precision, ", ".join(t.compute_capability for t in targets))
                plans = build_plans_per_gpu(onnx_paths, work / "plans", settings, repo.max_batch_size, targets,
                                            precision=repo.trt_precision, workspace_bytes=repo.trt_workspace_bytes,
                                            timing_cache_dir=timing_cache_dir, printer=printer or log.info)
            log.info("[3/3] writing the model repository to %s (target %s, device %s)", out, repo.target, repo.device)
            write_repository(out, settings, onnx_paths, repo, plans=plans, plan_targets=targets, **recorded)
    log.info("done in %.1f s", time.monotonic() - t0)
    return out
