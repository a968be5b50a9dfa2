"""The export core: a torch detector -> ONNX or TorchScript (-> TensorRT engines) -> model repository.

Library only.  :func:`export` takes a :class:`ModelOptions` (which detector, on which canvas) and
the repository's :class:`~exporters.repository_options.RepositoryOptions`; the command line that builds
both from its arguments or from the Docker environment is ``python -m fasterrcnn``.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from python_backend.settings import DetectorSettings, format_canvases

from . import loading
from .model_options import COCO_DIGEST, WEIGHT_SOURCES, ModelOptions  # noqa: F401  (their home before)
from .repository import RepositoryOptions, write_repository
from .tensorrt.gpus import GpuInfo, cuda_devices, plan_targets

log = logging.getLogger(__name__)

def load_model(options: ModelOptions):
    """(model, settings): the model and every setting the serving pipeline reads from it."""
    model = loading.load(options)
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
