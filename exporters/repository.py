"""Write the Triton model repository: one folder per step plus the ensembles.

Targets (how the two dense networks are served; every other step is the same for all):
  python       python-backend models running the ONNX with ONNX Runtime (any tritonserver,
               including the nvidia-pytriton wheel's, which has no other backend)
  onnxruntime  ``platform: onnxruntime_onnx`` (NVIDIA's Triton image)
  tensorrt     ``platform: tensorrt_plan`` with ``model.plan`` engines (NVIDIA's Triton image)
  torch        python-backend models running TorchScript traces (from exporters.torch_export:
               the rpn's ``model_<h>x<w>.pt``, one per canvas, and the header's ``model.pt``)
               with torch on the instance's device, fp32 or fp16: the GPU path where TensorRT
               is absent

What to write comes as :class:`~exporters.repository_options.RepositoryOptions`. Configs are
built as ``ModelConfig`` protos and written with ``text_format``, so what is written is what
the tests parse back.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from python_backend import names
from python_backend.settings import DetectorSettings, canvas_file, format_canvases

from . import provenance
from .repository_options import RepositoryOptions
from .specs import FP32, INT32, UINT8, maps_type, max_rois, tensor_specs
from .specs import io_spec as _io
from .tensorrt.gpus import PLAN_FILE, PlanTarget, set_cc_model_filenames
from .tensorrt.profiles import optimization_profiles, shapes_string

log = logging.getLogger(__name__)

TRITON_MODELS_DIR = Path(__file__).resolve().parent.parent / "python_backend" / "triton_models"
TORCH_FILE = "model.pt"  # the torch target's header TorchScript file (the rpn has one per canvas: canvas_file)
_TORCH_ADAPTER = "torch_runner.py"


def canvas_key(height: int, width: int, unmasked: bool = False) -> str:
    """Key of the rpn trace at one canvas in the torch target's traces (``unmasked``: the trace
    without extent masks)."""
    return f"{names.RPN}_{height}x{width}{'_unmasked' if unmasked else ''}"


def _params(config: mc.ModelConfig, values: dict[str, str]) -> None:
    for k, v in values.items():
        config.parameters[k].string_value = v


def _base(name: str, specs, max_batch: int, backend: str | None = None, platform: str | None = None) -> mc.ModelConfig:
    inputs, outputs = specs
    cfg = mc.ModelConfig(name=name, max_batch_size=max_batch)
    if backend:
        cfg.backend = backend
    if platform:
        cfg.platform = platform
    for i in inputs:
        cfg.input.add(**i)
    for o in outputs:
        cfg.output.add(**o)
    return cfg


def _batching(cfg: mc.ModelConfig, options: RepositoryOptions) -> None:
    cfg.dynamic_batching.max_queue_delay_microseconds = options.queue_delay_us


def _instances(cfg: mc.ModelConfig, count: int, gpu: bool, options: RepositoryOptions) -> None:
    """One instance group: ``count`` instances on the CPU, or on each GPU of ``options.gpus``
    (every visible GPU when that is empty)."""
    group = cfg.instance_group.add(count=count)
    group.kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    if gpu:
        group.gpus.extend(options.gpus)


def rpn_count(options: RepositoryOptions) -> int:
    """``rpn_instances``, or automatically ``instances``, and at least 2 for the torch target's fp16 rpn
    on GPU instances (one saturates under load and a second fits a 24 GB card; fp32's does not)."""
    fp16_torch_gpu = (options.target, options.torch_precision, options.device) == ("torch", "fp16", "gpu")
    return options.rpn_instances or (max(2, options.instances) if fp16_torch_gpu else options.instances)


def postprocess_count(options: RepositoryOptions) -> int:
    """``postprocess_instances``, or automatically one more than the rpn's on the GPU, ``instances`` on the CPU."""
    gpu = options.device == "gpu"
    return options.postprocess_instances or (max(rpn_count(options) + 1, options.instances) if gpu
                                             else options.instances)


def _step_instances(name: str, options: RepositoryOptions) -> int:
    """Instances of a step: the rpn's and postprocess's own counts, ``instances`` for the others."""
    counts = {names.RPN: rpn_count, names.POSTPROCESS: postprocess_count}
    return counts[name](options) if name in counts else options.instances


def python_step_config(name: str, settings: DetectorSettings, options: RepositoryOptions) -> mc.ModelConfig:
    specs = tensor_specs(settings, maps_type(options.target, options.torch_precision))[name]
    batching = name != names.POSTPROCESS
    max_batch = options.max_batch_size if batching else 0
    if name == names.HEADER:
        max_batch = max_rois(settings, options.max_batch_size)
    cfg = _base(name, specs, max_batch, backend="python")
    if batching:
        _batching(cfg, options)
    gpu = options.device == "gpu"
    _instances(cfg, _step_instances(name, options), gpu, options)
    params = settings.to_parameters()
    params["device"] = options.device
    if name in (names.RPN, names.HEADER):
        if options.target == "torch":
            params["precision"] = options.torch_precision
            if gpu:  # the caching allocator's cap for this process (RepositoryOptions says why)
                gib = options.torch_rpn_memory_gib if name == names.RPN else options.torch_header_memory_gib
                params["gpu_memory_gib"] = f"{gib:g}"
            if name == names.HEADER:
                params["torch_file"] = TORCH_FILE
            else:  # one trace per canvas (settings.canvases), each named by canvas_file
                params["torch_per_canvas"] = "true"
                params["unmasked_rpn"] = str(options.torch_unmasked_rpn).lower()
                # channels last speeds up fp16 convolutions (NHWC tensor-core kernels) but slows fp32
                # ones (docs/benchmarks.md: the fp32 rows of the channels-last measurements)
                params["channels_last"] = str(options.torch_channels_last and options.torch_precision == "fp16").lower()
                # fp16 only: fp32's graphs of every batch size and canvas filled the rpn's cap at
                # warm-up on the H200 (docs/benchmarks.md, session 13); fp32 runs eagerly
                params["cuda_graphs"] = str(options.torch_cuda_graphs and gpu and options.torch_precision == "fp16").lower()
                params["optimize_for_inference"] = str(options.torch_optimize_for_inference and gpu
                                                       and options.torch_precision == "fp16").lower()
        else:
            params["onnx_file"] = "model.onnx"
    if name == names.PREPROCESS:  # (preprocess_raw takes decoded pixels)
        params["jpeg_decoder"] = options.jpeg_decoder if gpu else "pillow"
        params["decode_threads"] = str(options.decode_threads)
    if gpu:
        # keep GPU tensors on the GPU between steps (DLPack, no host round trip)
        params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
    _params(cfg, params)
    return cfg


def network_config(name: str, settings: DetectorSettings, options: RepositoryOptions) -> mc.ModelConfig:
    """rpn / header for the chosen target."""
    if options.target == "python":
        return python_step_config(name, settings, options)
    if options.target == "torch":
        # python backend running model.pt; KIND_GPU with --device gpu (traced on the GPU),
        # KIND_CPU with --device cpu (traced on the CPU: the CPU-only test setup)
        return python_step_config(name, settings, options)
    specs = tensor_specs(settings, maps_type(options.target, options.torch_precision))[name]
    max_batch = max_rois(settings, options.max_batch_size) if name == names.HEADER else options.max_batch_size
    platform = {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx"}[options.target]
    cfg = _base(name, specs, max_batch, platform=platform)
    _batching(cfg, options)
    _instances(cfg, _step_instances(name, options), True, options)
    if options.target == "tensorrt":
        # Triton's TensorRT backend makes an execution context only for the profiles an instance
        # group lists, and for profile 0 alone when it lists none (InitOptimizationProfiles in
        # triton-inference-server/tensorrt_backend src/instance_state.cc): list every profile,
        # one per group of canvases for the rpn (exporters.tensorrt.profiles.canvas_groups)
        count = len(optimization_profiles(settings, options.max_batch_size)[name])
        for group in cfg.instance_group:
            group.profile.extend(str(i) for i in range(count))
    if options.ort_tensorrt:
        _ort_tensorrt_accelerator(cfg, name, settings, options)
    return cfg


def _ort_tensorrt_accelerator(cfg: mc.ModelConfig, name: str, settings: DetectorSettings,
                              options: RepositoryOptions) -> None:
    """``optimization { execution_accelerators { gpu_execution_accelerator { name: "tensorrt" ... } } }``.

    Keys are the Triton onnxruntime backend's (its README maps them to the TensorRT EP options).
    The profile shapes are the tensorrt target's (one profile per canvas for the rpn), so both
    targets accept the same batches; without them the EP rebuilds its engine whenever a larger
    batch arrives.
    """
    profiles = optimization_profiles(settings, options.max_batch_size)[name]
    acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    params = {
        "precision_mode": options.trt_precision.upper(),
        "max_workspace_size_bytes": str(options.trt_workspace_bytes),
        "trt_profile_min_shapes": shapes_string(profiles, 0),
        "trt_profile_opt_shapes": shapes_string(profiles, 1),
        "trt_profile_max_shapes": shapes_string(profiles, 2),
    }
    if options.ort_trt_cache_dir:
        params.update({"trt_engine_cache_enable": "1", "trt_engine_cache_path": options.ort_trt_cache_dir,
                       "trt_timing_cache_enable": "1", "trt_timing_cache_path": options.ort_trt_cache_dir})
    for k, v in params.items():
        acc.parameters[k] = v


def _step(ens: mc.ModelConfig, model: str, inputs: dict[str, str], outputs: dict[str, str]) -> None:
    step = ens.ensemble_scheduling.step.add(model_name=model, model_version=-1)
    for k, v in inputs.items():
        step.input_map[k] = v
    for k, v in outputs.items():
        step.output_map[k] = v


def ensemble_config(raw: bool, settings: DetectorSettings, options: RepositoryOptions) -> mc.ModelConfig:
    """``fasterrcnn`` (encoded bytes) or ``fasterrcnn_raw`` (uint8 HWC). Ensemble tensors keep the
    step tensor names, so each map is ``{name: name}``."""
    d = settings.box_detections_per_img
    pre = names.PREPROCESS_RAW if raw else names.PREPROCESS
    image = _io(names.IMAGE_RAW, UINT8, [-1, -1, 3]) if raw else _io(names.IMAGE_BYTES, UINT8, [-1])
    outputs = [_io(names.DETECTION_BOXES, FP32, [d, 4]), _io(names.DETECTION_SCORES, FP32, [d]),
               _io(names.DETECTION_LABELS, INT32, [d]), _io(names.NUM_DETECTIONS, INT32, [1])]
    ens = _base(names.ENSEMBLE_RAW if raw else names.ENSEMBLE, ([image], outputs), options.max_batch_size,
                platform="ensemble")
    same = lambda *ts: {t: t for t in ts}  # noqa: E731
    _step(ens, pre, same(image["name"]), same(names.IMAGES, names.IMAGE_SIZES, names.ORIGINAL_SIZES))
    _step(ens, names.RPN, same(names.IMAGES, names.IMAGE_SIZES), same(names.PROPOSALS, *settings.feature_names))
    _step(ens, names.ROI, same(names.PROPOSALS, *settings.feature_names, names.IMAGE_SIZES),
          same(names.ROIS, names.ROI_FEATURES, names.NUM_ROIS))
    _step(ens, names.HEADER, same(names.ROI_FEATURES, names.ROIS), same(names.CLASS_SCORES, names.CLASS_BOXES))
    _step(ens, names.POSTPROCESS,
          same(names.CLASS_SCORES, names.CLASS_BOXES, names.NUM_ROIS, names.IMAGE_SIZES, names.ORIGINAL_SIZES),
          same(names.DETECTION_BOXES, names.DETECTION_SCORES, names.DETECTION_LABELS, names.NUM_DETECTIONS))
    _params(ens, {"class_names": settings.to_parameters()["class_names"],
                  "canvases": format_canvases(settings.canvases)})
    return ens


def all_configs(settings: DetectorSettings, options: RepositoryOptions) -> dict[str, mc.ModelConfig]:
    cfgs = {n: python_step_config(n, settings, options)
            for n in (names.PREPROCESS, names.PREPROCESS_RAW, names.ROI, names.POSTPROCESS)}
    cfgs[names.RPN] = network_config(names.RPN, settings, options)
    cfgs[names.HEADER] = network_config(names.HEADER, settings, options)
    cfgs[names.ENSEMBLE] = ensemble_config(False, settings, options)
    cfgs[names.ENSEMBLE_RAW] = ensemble_config(True, settings, options)
    return cfgs


# which adapter serves each python-backend model
_ADAPTERS = {names.PREPROCESS: "preprocess.py", names.PREPROCESS_RAW: "preprocess.py", names.ROI: "roi.py",
             names.POSTPROCESS: "postprocess.py", names.RPN: "onnx_runner.py", names.HEADER: "onnx_runner.py"}


def write_repository(out: Path, settings: DetectorSettings, onnx_paths: dict[str, Path],
                     options: RepositoryOptions, plans: dict[str, Path | dict[str, Path]] | None = None,
                     torch_models: dict[str, Path] | None = None,
                     plan_targets: list[PlanTarget] | None = None, link: bool = False,
                     weights: dict | None = None, options_record: dict | None = None) -> Path:
    """Write every model folder under ``out`` (created if needed; stale model folders replaced).

    ``onnx_paths``: {"rpn": path, "header": path} (may be empty for the torch target).
    ``plans``: TensorRT engines for the tensorrt target: {"rpn": path, "header": path} (written as
    ``model.plan``), or {"rpn": {file name: path}, ...} with one plan per compute capability
    (:func:`exporters.tensorrt.build.build_plans_per_gpu`) and their ``plan_targets``, which map
    each compute capability to its file in the config (``cc_model_filenames``).
    ``torch_models``: TorchScript traces for the torch target ({"header": path} and
    ``"rpn_<h>x<w>"`` (:func:`canvas_key`) for each of ``settings.canvases``, from
    :func:`exporters.torch_export.export_torch`).
    ``link``: hard-link those files instead of copying them where one file system holds both
    (several repositories from one export, as the tests write them; re-exporting into the same
    files would then change the repository too).
    ``weights`` (:func:`exporters.provenance.weights_record`) and ``options_record`` (the command's
    options) go into the repository's ``provenance.json``; every config carries the weights line as
    the parameter ``weights``.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write the model repository to {out}: {e.strerror or e}") from None
    if options.target == "tensorrt" and not plans:
        raise ValueError("the tensorrt target needs engines: build them with exporters.tensorrt.build.build_plans first")
    if options.target == "torch":
        wanted = [names.HEADER, *(canvas_key(h, w) for h, w in settings.canvases)]
        if options.torch_unmasked_rpn:
            wanted += [canvas_key(h, w, unmasked=True) for h, w in settings.canvases]
        missing = [k for k in wanted if k not in (torch_models or {})]
        if missing:
            raise ValueError(f"the torch target needs TorchScript traces of the header and of the rpn at every "
                             f"canvas; missing {missing}: make them with exporters.torch_export.export_torch")
    for name, cfg in all_configs(settings, options).items():
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        version = folder / "1"
        version.mkdir(parents=True)
        if cfg.platform == "tensorrt_plan" and plan_targets:
            set_cc_model_filenames(cfg, plan_targets)
        cfg.parameters[provenance.WEIGHTS_PARAMETER].string_value = weights["line"] if weights else "unrecorded"
        (folder / "config.pbtxt").write_text(text_format.MessageToString(cfg))
        torch_step = options.target == "torch" and name in (names.RPN, names.HEADER)
        if cfg.backend == "python":
            adapter = _TORCH_ADAPTER if torch_step else _ADAPTERS[name]
            shutil.copy(TRITON_MODELS_DIR / adapter, version / "model.py")
        if torch_step and name == names.HEADER:
            files = {TORCH_FILE: torch_models[name]}
        elif torch_step:
            masks = (False, True) if options.torch_unmasked_rpn else (False,)
            files = {canvas_file(h, w, unmasked=u): torch_models[canvas_key(h, w, unmasked=u)]
                     for h, w in settings.canvases for u in masks}
        elif cfg.platform == "tensorrt_plan":
            files = plans[name] if isinstance(plans[name], dict) else {PLAN_FILE: plans[name]}
        else:
            files = {"model.onnx": onnx_paths[name]} if name in (names.RPN, names.HEADER) else {}
        for filename, source in files.items():
            _place(Path(source), version / filename, link)
        log.info("wrote %s", folder)
    provenance.write(out, provenance.manifest(settings, options, weights, options_record))
    return out


def _place(source: Path, dest: Path, link: bool) -> None:
    """Copy ``source`` to ``dest``, or hard-link it where ``link`` and the file system allow."""
    if link:
        try:
            os.link(source, dest)
            return
        except OSError:
            pass
    shutil.copy(source, dest)


def read_config(path: Path) -> mc.ModelConfig:
    """Parse a ``config.pbtxt`` back into a ModelConfig."""
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
