"""Build TensorRT engines (``model.plan``) for the rpn and header networks, and check them.

Pure core (no TensorRT import): :func:`optimization_profiles`, :func:`fp32_layer_names`,
:func:`engine_cache_key`, :class:`BuildProgress`.  TensorRT is imported lazily by
:func:`build_engine`, :func:`build_plans` and :func:`compare_with_onnxruntime`; where it is
missing they raise :class:`TensorRTUnavailable` naming what is missing.

Written against the TensorRT 10 Python API (NGC ``tritonserver:24.10-py3`` ships TensorRT 10.5).

CLI::

    python -m exporters.tensorrt_build --onnx artifacts/onnx --out artifacts/plans \\
        --max-batch-size 8 --precision fp16 --timing-cache artifacts/timing.cache
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hashlib
import json
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from python_backend import names
from python_backend.settings import DetectorSettings

from .repository import RepositoryOptions
from .specs import max_rois, tensor_specs

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)

PRECISIONS = ("fp32", "tf32", "fp16")
DEFAULT_WORKSPACE_BYTES = 4 << 30
MIN_TENSORRT_MAJOR = 10  # execute_async_v3, set_memory_pool_limit, IProgressMonitor
INSTALL_HINT = (
    "run inside nvcr.io/nvidia/tritonserver:24.10-py3 with `pip install tensorrt-cu12-bindings==10.5.0` "
    "(see Dockerfile and docs/docker.md); TensorRT can't be installed on the CPU/CI machines"
)


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing; the message says which and how to get it."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX or build the engine; the message lists TensorRT's errors."""


# ----------------------------------------------------------------------------------------------
# Optimization profiles (pure)
# ----------------------------------------------------------------------------------------------

def optimization_profiles(settings: DetectorSettings, options: RepositoryOptions,
                          header_opt_rois: int | None = None) -> dict[str, Profile]:
    """``{model: {input: (min, opt, max)}}`` for the rpn and header engines.

    rpn: the batch B of images runs 1..``options.max_batch_size`` on the fixed canvas.
    header: the RoI count R runs 1..``max_batch_size * rpn_post_nms_top_n``, the same limit as
    the header's Triton ``max_batch_size`` (:func:`~exporters.repository.max_rois`), because the
    header's dynamic batcher hands several images' RoIs over in one call.

    Why opt = max for both: TensorRT runs every shape in [min, max] correctly and only tunes
    its tactics for opt.  The shapes where speed matters are the ones under load, where Triton's
    dynamic batcher fills batches (rpn: max_batch_size images; header: their RoIs).  At low load
    a lone image is latency bound by the rpn, and the header's GEMMs (M = R) keep near-optimal
    tactics over a wide range of M.  ``header_opt_rois`` overrides the header's opt (for example
    ``rpn_post_nms_top_n`` for a latency-first deployment of single images).
    """
    b = options.max_batch_size
    r_max = max_rois(settings, options.max_batch_size)
    r_opt = r_max if header_opt_rois is None else int(header_opt_rois)
    if not 1 <= r_opt <= r_max:
        raise ValueError(f"header_opt_rois must be in 1..{r_max}, got {header_opt_rois}")

    def batch_axis(lo: int, opt: int, hi: int, rest: Sequence[int]) -> tuple[Shape, Shape, Shape]:
        rest = tuple(int(d) for d in rest)
        return ((lo, *rest), (opt, *rest), (hi, *rest))

    # per-item dims from the one place the repository's configs take them from
    inputs = {model: {t["name"]: t["dims"] for t in tensor_specs(settings)[model][0]}
              for model in (names.RPN, names.HEADER)}
    return {
        names.RPN: {n: batch_axis(1, b, b, d) for n, d in inputs[names.RPN].items()},
        names.HEADER: {n: batch_axis(1, r_opt, r_max, d) for n, d in inputs[names.HEADER].items()},
    }


def onnx_input_dims(onnx_model) -> dict[str, list[int | str]]:
    """``{input: dims}`` of an ONNX model; a dynamic dimension is its ``dim_param`` (or ``"?"``)."""
    out = {}
    for value in onnx_model.graph.input:
        dims = value.type.tensor_type.shape.dim
        out[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    return out


def check_profile(profile: Profile, onnx_model) -> None:
    """Raise ``ValueError`` unless ``profile`` covers exactly the ONNX inputs, with their rank and
    static dimensions, and min <= opt <= max on every axis."""
    dims = onnx_input_dims(onnx_model)
    if set(dims) != set(profile):
        raise ValueError(f"profile inputs {sorted(profile)} do not match the ONNX inputs {sorted(dims)}")
    for name, (lo, opt, hi) in profile.items():
        expected = dims[name]
        for label, shape in (("min", lo), ("opt", opt), ("max", hi)):
            if len(shape) != len(expected):
                raise ValueError(f"profile {label} shape of {name!r} is {shape}, expected rank {len(expected)} "
                                 f"(ONNX dims {expected})")
            for axis, (got, want) in enumerate(zip(shape, expected)):
                if isinstance(want, int) and want > 0 and got != want:
                    raise ValueError(f"profile {label} shape of {name!r} has {got} on axis {axis}, "
                                     f"expected the ONNX's static {want}")
        for axis, (a, b, c) in enumerate(zip(lo, opt, hi)):
            if not 1 <= a <= b <= c:
                raise ValueError(f"profile of {name!r} axis {axis}: expected 1 <= min <= opt <= max, got {a}, {b}, {c}")


def shapes_string(profile: Profile, which: int) -> str:
    """``"images:1x3x800x1344,image_sizes:1x2"`` for min (0), opt (1) or max (2): the format of
    ONNX Runtime's TensorRT EP ``trt_profile_*_shapes`` options."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profile.items())


# ----------------------------------------------------------------------------------------------
# fp16 precision constraints (pure, works on TensorRT layers or look-alikes)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerInfo:
    """What the fp32 selection needs to know about one network layer."""

    name: str
    kind: str  # trt.LayerType name: "CONVOLUTION", "ELEMENTWISE", ...
    op: str | None  # ElementWiseOperation / UnaryOperation / ActivationType name, else None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    float_outputs: tuple[int, ...]  # indices of outputs whose dtype is FLOAT or HALF


# Kept in fp32 wherever they are.  Concat and Add: the original author's Mask R-CNN TensorRT port
# produced NaNs in fp16 until Concatenation and ElementWise SUM layers were forced to fp32 (FPN
# top-down and residual sums overflow fp16's 65504).  Softmax and Exp: exp overflows fp16 above
# ~11.  TopK and Sigmoid: the rpn selects proposals by ranking objectness logits, and fp16 ties
# reorder which anchors survive.
FP32_ALWAYS = {
    ("CONCATENATION", None), ("ELEMENTWISE", "SUM"), ("SOFTMAX", None), ("TOPK", None),
    ("UNARY", "EXP"), ("ACTIVATION", "SIGMOID"),
}
# After the last Conv/MatMul, every arithmetic layer is box-decode math on pixel coordinates:
# fp16 has a 1-pixel resolution above 1024 and 0.5 above 512, so decode stays in fp32.
DENSE_KINDS = frozenset({"CONVOLUTION", "DECONVOLUTION", "MATRIX_MULTIPLY", "FULLY_CONNECTED"})
TAIL_KINDS = frozenset({"ELEMENTWISE", "UNARY", "ACTIVATION", "SOFTMAX", "TOPK", "CONCATENATION", "SELECT",
                        "REDUCE"})

_OP_ATTRIBUTE = {"ELEMENTWISE": ("IElementWiseLayer", "op"), "UNARY": ("IUnaryLayer", "op"),
                 "ACTIVATION": ("IActivationLayer", "type")}


def _enum_name(value) -> str:
    """``trt.LayerType.CONVOLUTION`` -> ``"CONVOLUTION"`` (pybind11 enums and look-alikes)."""
    name = getattr(value, "name", None)
    return str(name if name is not None else value).rsplit(".", 1)[-1]


def layer_info(layer, trt=None) -> LayerInfo:
    """Describe a ``trt.ILayer`` (or a look-alike with the same attributes).

    TensorRT returns layers as the base ``ILayer``; the operation of an ElementWise / Unary /
    Activation layer is read after downcasting (``layer.__class__ = trt.IElementWiseLayer``),
    and an activation's kind is then its ``type``, so the layer type is read first.
    """
    kind = _enum_name(layer.type)
    op = None
    if kind in _OP_ATTRIBUTE:
        if hasattr(layer, "op"):  # look-alikes, or a layer already downcast
            op = _enum_name(layer.op)
        elif trt is not None:
            cls_name, attr = _OP_ATTRIBUTE[kind]
            base = layer.__class__
            layer.__class__ = getattr(trt, cls_name)
            try:
                op = _enum_name(getattr(layer, attr))
            finally:
                layer.__class__ = base  # pybind11 may hand the same wrapper out again
    ins = tuple(layer.get_input(i).name for i in range(layer.num_inputs) if layer.get_input(i) is not None)
    outs, floats = [], []
    for i in range(layer.num_outputs):
        t = layer.get_output(i)
        outs.append(t.name)
        if _enum_name(t.dtype) in ("FLOAT", "HALF"):
            floats.append(i)
    return LayerInfo(layer.name, kind, op, ins, tuple(outs), tuple(floats))


def select_fp32_layers(layers: Sequence[LayerInfo]) -> list[str]:
    """Names of the layers to keep in fp32, in network order.

    A layer is kept when (1) it is one of :data:`FP32_ALWAYS` (an ElementWise SUM only when
    neither operand is a constant), or (2) it is arithmetic
    (:data:`TAIL_KINDS`) and no Conv/MatMul layer consumes its result, directly or further
    down: the decode tail.  Layers without a float output (shape arithmetic, masks, indices)
    are never constrained.
    """
    consumers: dict[str, list[int]] = {}
    producer: dict[str, LayerInfo] = {}
    for idx, layer in enumerate(layers):
        for t in layer.inputs:
            consumers.setdefault(t, []).append(idx)
        for t in layer.outputs:
            producer[t] = layer
    # feeds_dense[i]: a DENSE layer is reachable downstream of layer i.  Layers are in
    # topological order (TensorRT's network order), so one reverse sweep settles it.
    feeds_dense = [False] * len(layers)
    for idx in range(len(layers) - 1, -1, -1):
        for t in layers[idx].outputs:
            for c in consumers.get(t, ()):
                if layers[c].kind in DENSE_KINDS or feeds_dense[c]:
                    feeds_dense[idx] = True
    keep = []
    for idx, layer in enumerate(layers):
        if not layer.float_outputs:
            continue
        always = (layer.kind, layer.op) in FP32_ALWAYS
        if always and layer.kind == "ELEMENTWISE":
            # a bias (tensor + constant) fuses into the Conv/MatMul before it; only sums of two
            # computed tensors (residual, FPN top-down, decode) overflow
            always = not any(t in producer and producer[t].kind == "CONSTANT" for t in layer.inputs)
        tail = layer.kind in TAIL_KINDS and not feeds_dense[idx]
        if always or tail:
            keep.append(layer.name)
    return keep


def fp32_layer_names(network, trt=None) -> list[str]:
    """:func:`select_fp32_layers` over every layer of a ``trt.INetworkDefinition`` (or look-alike)."""
    return select_fp32_layers([layer_info(network.get_layer(i), trt) for i in range(network.num_layers)])


def constrain_fp32(network, layer_names: Iterable[str], trt) -> int:
    """Pin the named layers (and their float outputs) to fp32; returns how many were pinned.
    Needs ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS`` to be binding."""
    wanted = set(layer_names)
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name not in wanted:
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if _enum_name(layer.get_output(j).dtype) in ("FLOAT", "HALF"):
                layer.set_output_type(j, trt.float32)
        count += 1
    return count


# ----------------------------------------------------------------------------------------------
# Progress (pure part; the TensorRT subclass is made in _progress_monitor)
# ----------------------------------------------------------------------------------------------

class BuildProgress:
    """Prints TensorRT builder phases with their duration (builds take minutes).

    Phases nest (``parent_phase``); only the top ``max_depth`` levels are printed, and steps of a
    printed phase at most every ``step_interval_s`` seconds.  Thread-safe: TensorRT calls it
    from its own threads.
    """

    def __init__(self, printer: Callable[[str], None] = print, max_depth: int = 2, step_interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.printer = printer
        self.max_depth = max_depth
        self.step_interval_s = step_interval_s
        self.clock = clock
        self._lock = threading.Lock()
        self._phases: dict[str, tuple[int, int, float, float]] = {}  # name -> depth, steps, start, last print

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self._lock:
            depth = self._phases[parent_phase][0] + 1 if parent_phase in self._phases else 0
            now = self.clock()
            self._phases[phase_name] = (depth, num_steps, now, now)
            if depth < self.max_depth:
                self.printer(f"{'  ' * depth}[trt] {phase_name} ({num_steps} steps)")

    def step_complete(self, phase_name: str, step: int) -> bool:
        with self._lock:
            if phase_name in self._phases:
                depth, steps, start, last = self._phases[phase_name]
                now = self.clock()
                if depth < self.max_depth and now - last >= self.step_interval_s:
                    self.printer(f"{'  ' * depth}[trt] {phase_name}: {step + 1}/{steps}, {now - start:.0f} s")
                    self._phases[phase_name] = (depth, steps, start, now)
        return True  # False would cancel the build

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            depth, _, start, _ = self._phases.pop(phase_name, (0, 0, self.clock(), 0.0))
            if depth < self.max_depth:
                self.printer(f"{'  ' * depth}[trt] {phase_name} done in {self.clock() - start:.1f} s")


def _progress_monitor(trt, progress: BuildProgress):
    class ProgressMonitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            return progress.step_complete(phase_name, step)

        def phase_finish(self, phase_name):
            progress.phase_finish(phase_name)

    return ProgressMonitor()


def _capturing_logger(trt, verbose: bool):
    """A ``trt.ILogger`` that forwards to :mod:`logging` and keeps errors for the exception."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.WARNING:
                log.warning("TensorRT: %s", msg)
            elif verbose:
                log.info("TensorRT: %s", msg)

    return Logger()


# ----------------------------------------------------------------------------------------------
# TensorRT and the GPU
# ----------------------------------------------------------------------------------------------

def import_tensorrt():
    """The ``tensorrt`` module, or the ``tensorrt_bindings`` module of the ``tensorrt-cu12-bindings``
    wheel (the Docker image's choice: it links the image's own libnvinfer).  Raises
    :class:`TensorRTUnavailable` naming what is missing."""
    errors = []
    for module in ("tensorrt", "tensorrt_bindings"):
        try:
            trt = __import__(module)
        except ImportError as e:
            errors.append(f"import {module}: {e}")
            continue
        except OSError as e:  # the bindings found, a shared library (libnvinfer.so.10, ...) not
            errors.append(f"import {module}: {e}")
            continue
        version = getattr(trt, "__version__", "0")
        major = int(re.match(r"\d+", version).group()) if re.match(r"\d+", version) else 0
        if major < MIN_TENSORRT_MAJOR:
            raise TensorRTUnavailable(f"TensorRT {version} is too old: this code needs TensorRT >= "
                                      f"{MIN_TENSORRT_MAJOR} (execute_async_v3, IProgressMonitor); {INSTALL_HINT}")
        return trt
    raise TensorRTUnavailable(
        "the TensorRT Python package is not importable (" + "; ".join(errors) + f"); {INSTALL_HINT}")


def cuda_device_count() -> int:
    """CUDA devices visible through the driver API (0 without a driver), no torch/CuPy needed."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    if cuda.cuInit(0) != 0:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


def require_tensorrt():
    """TensorRT and a CUDA GPU, or :class:`TensorRTUnavailable` saying which is missing."""
    trt = import_tensorrt()
    if cuda_device_count() < 1:
        raise TensorRTUnavailable(
            f"TensorRT {trt.__version__} is installed but no CUDA GPU is visible (libcuda.so.1 missing or "
            "cuInit/cuDeviceGetCount found no device): run on a GPU machine, in Docker with `--gpus`"
        )
    return trt


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------

def parser_errors(parser) -> list[str]:
    """Readable ``trt.OnnxParser`` errors: ``node 12 'Where_3' (Where): <description>``."""
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        desc = e.desc() if callable(getattr(e, "desc", None)) else str(e)
        node = e.node() if callable(getattr(e, "node", None)) else -1
        name = e.node_name() if callable(getattr(e, "node_name", None)) else ""
        op = e.node_operator() if callable(getattr(e, "node_operator", None)) else ""
        where = f"node {node}" + (f" {name!r}" if name else "") + (f" ({op})" if op else "") if node >= 0 else "model"
        out.append(f"{where}: {desc}")
    return out


def build_engine(onnx_path: str | Path, plan_path: str | Path, profile: Profile, precision: str = "fp32",
                 workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, timing_cache_path: str | Path | None = None,
                 verbose: bool = False, printer: Callable[[str], None] = print) -> Path:
    """Parse ``onnx_path``, build one engine with ``profile`` and write it to ``plan_path``.

    precision: ``fp32`` (TF32 off: the ONNX Runtime reference's numbers), ``tf32`` (TensorRT's
    default), ``fp16`` (FP16 with :func:`fp32_layer_names` pinned to fp32 and
    ``OBEY_PRECISION_CONSTRAINTS``).  The timing cache at ``timing_cache_path`` is loaded when
    present and saved after the build (it makes rebuilds on the same GPU and TensorRT fast).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} does not exist")
    trt = require_tensorrt()
    logger = _capturing_logger(trt, verbose)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  " + "\n  ".join(parser_errors(parser)))

    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if inputs != set(profile):
        raise EngineBuildError(f"profile inputs {sorted(profile)} do not match the network inputs {sorted(inputs)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)

    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    elif precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = constrain_fp32(network, fp32_layer_names(network, trt), trt)
        printer(f"[trt] fp16 with {pinned} of {network.num_layers} layers pinned to fp32")

    cache_bytes = b""
    if timing_cache_path and Path(timing_cache_path).is_file():
        cache_bytes = Path(timing_cache_path).read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        printer(f"[trt] timing cache {timing_cache_path} is from another device or TensorRT; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    # TensorRT keeps a raw pointer: the monitor (like the logger) must outlive the build
    monitor = _progress_monitor(trt, BuildProgress(printer))
    config.progress_monitor = monitor
    printer(f"[trt] building {plan_path.name} from {onnx_path.name} ({precision}, TensorRT {trt.__version__})")
    start = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = logger.errors or ["(no error logged; rerun with verbose=True)"]
        raise EngineBuildError(f"TensorRT could not build {onnx_path}:\n  " + "\n  ".join(errors))
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    if timing_cache_path:
        Path(timing_cache_path).parent.mkdir(parents=True, exist_ok=True)
        Path(timing_cache_path).write_bytes(bytes(config.get_timing_cache().serialize()))
    printer(f"[trt] wrote {plan_path} ({plan_path.stat().st_size / 2**20:.1f} MiB) in {time.monotonic() - start:.0f} s")
    return plan_path


def build_plans(onnx_paths: Mapping[str, Path], out_dir: str | Path, settings: DetectorSettings,
                options: RepositoryOptions, precision: str = "fp16", workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                timing_cache_path: str | Path | None = None, header_opt_rois: int | None = None,
                verbose: bool = False, printer: Callable[[str], None] = print) -> dict[str, Path]:
    """Build ``rpn.plan`` and ``header.plan`` in ``out_dir``: ``{"rpn": path, "header": path}``, the
    ``plans=`` argument of :func:`~exporters.repository.write_repository` for the tensorrt target."""
    profiles = optimization_profiles(settings, options, header_opt_rois)
    missing = [n for n in profiles if n not in onnx_paths]
    if missing:
        raise ValueError(f"onnx_paths lacks {missing}; expected {{'rpn': path, 'header': path}}")
    import onnx

    out_dir = Path(out_dir)
    plans = {}
    for name, profile in profiles.items():
        check_profile(profile, onnx.load(str(onnx_paths[name]), load_external_data=False))
        plans[name] = build_engine(onnx_paths[name], out_dir / f"{name}.plan", profile, precision, workspace_bytes,
                                   timing_cache_path, verbose, printer)
    return plans


def engine_cache_key(settings: DetectorSettings, options: RepositoryOptions, precision: str, gpu_name: str,
                     trt_version: str, model_digest: str = "") -> str:
    """Folder name for cached engines: ``<gpu>__trt<version>__<precision>__<hash>``.

    An engine is valid only for the GPU model and TensorRT version that built it; the hash
    covers everything else that changes the engines or the repository (settings, options,
    the weights' digest)."""
    payload = json.dumps({"settings": settings.to_parameters(), "options": dataclasses.asdict(options),
                          "precision": precision, "model": model_digest}, sort_keys=True)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
    slug = lambda s: re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-") or "unknown"  # noqa: E731
    return f"{slug(gpu_name)}__trt{slug(trt_version)}__{precision}__{digest}"


# ----------------------------------------------------------------------------------------------
# Numeric check against ONNX Runtime
# ----------------------------------------------------------------------------------------------

class _TorchDevice:
    def __init__(self):
        import torch

        self.torch = torch
        # the stream the uploads are queued on, so the engine runs after them
        self.stream = torch.cuda.current_stream()

    def to_device(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a)).cuda()

    def empty(self, shape, dtype: np.dtype):
        t = self.torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        return self.torch.empty(tuple(shape), dtype=t, device="cuda")

    def ptr(self, a) -> int:
        return a.data_ptr()

    def handle(self) -> int:
        return self.stream.cuda_stream

    def sync(self) -> None:
        self.stream.synchronize()

    def to_host(self, a) -> np.ndarray:
        return a.cpu().numpy()


class _CupyDevice:
    def __init__(self):
        import cupy

        self.cp = cupy
        self.stream = cupy.cuda.get_current_stream()  # the uploads' stream (see _TorchDevice)

    def to_device(self, a: np.ndarray):
        return self.cp.asarray(np.ascontiguousarray(a))

    def empty(self, shape, dtype: np.dtype):
        return self.cp.empty(tuple(shape), dtype=dtype)

    def ptr(self, a) -> int:
        return a.data.ptr

    def handle(self) -> int:
        return self.stream.ptr

    def sync(self) -> None:
        self.stream.synchronize()

    def to_host(self, a) -> np.ndarray:
        return self.cp.asnumpy(a)


def _device_arrays():
    """Device buffers through torch (CUDA build) or CuPy, whichever works here."""
    try:
        import torch

        if torch.cuda.is_available():
            return _TorchDevice()
    except ImportError:
        pass
    try:
        return _CupyDevice()
    except ImportError:
        raise TensorRTUnavailable("running an engine needs device buffers: install torch with CUDA or "
                                  "cupy-cuda12x") from None


def run_engine(plan_path: str | Path, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a serialized engine once on host ``inputs``; returns every output on the host."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise EngineBuildError(
            f"TensorRT could not deserialize {plan_path} (built by another TensorRT version or GPU?)")
    context = engine.create_execution_context()
    dev = _device_arrays()
    io_names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    input_names = [n for n in io_names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    if set(input_names) != set(inputs):
        raise ValueError(f"engine {plan_path} takes inputs {sorted(input_names)}, got {sorted(inputs)}")
    buffers = {}
    for name in input_names:
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        host = np.asarray(inputs[name], dtype=dtype)
        if not context.set_input_shape(name, host.shape):
            raise ValueError(f"input {name!r} shape {host.shape} is outside the engine's profile "
                             f"{engine.get_tensor_profile_shape(name, 0)}")
        buffers[name] = dev.to_device(host)
        context.set_tensor_address(name, dev.ptr(buffers[name]))
    outputs = [n for n in io_names if n not in input_names]
    for name in outputs:
        shape = tuple(context.get_tensor_shape(name))
        buffers[name] = dev.empty(shape, np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
        context.set_tensor_address(name, dev.ptr(buffers[name]))
    if not context.execute_async_v3(dev.handle()):
        raise EngineBuildError(f"execute_async_v3 failed for {plan_path}")
    dev.sync()
    return {name: dev.to_host(buffers[name]) for name in outputs}


@dataclass(frozen=True)
class OutputDiff:
    name: str
    max_abs: float
    max_rel: float  # max |a - b| / (|b| + 1e-6) where |b| > 1e-3, else 0
    shape: Shape


def compare_with_onnxruntime(plan: str | Path, onnx_path: str | Path,
                             inputs: Mapping[str, np.ndarray]) -> dict[str, OutputDiff]:
    """Run the engine and ONNX Runtime (CPU) on the same inputs; per-output differences."""
    import onnxruntime as ort

    trt_out = run_engine(plan, inputs)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.asarray(inputs[i.name], dtype=np.float32) for i in session.get_inputs()}
    ort_names = [o.name for o in session.get_outputs()]
    ort_out = dict(zip(ort_names, session.run(ort_names, feeds)))
    diffs = {}
    for name in ort_names:
        a, b = trt_out[name].astype(np.float64), ort_out[name].astype(np.float64)
        if a.shape != b.shape:
            raise ValueError(f"output {name!r}: engine shape {a.shape}, ONNX Runtime shape {b.shape}")
        err = np.abs(a - b)
        big = np.abs(b) > 1e-3
        rel = float((err[big] / (np.abs(b[big]) + 1e-6)).max()) if big.any() else 0.0
        diffs[name] = OutputDiff(name, float(err.max()) if err.size else 0.0, rel, tuple(a.shape))
    return diffs


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def settings_from_onnx(rpn_model, header_model, rpn_post_nms_top_n: int) -> DetectorSettings:
    """The settings the profiles need, read from the exported ONNX (canvas, RoI size, classes).
    Only the profile fields are meaningful; use the exporter's settings where you have them."""
    rpn_dims = onnx_input_dims(rpn_model)[names.IMAGES]
    roi_dims = onnx_input_dims(header_model)[names.ROI_FEATURES]
    scores = next(o for o in header_model.graph.output if o.name == names.CLASS_SCORES)
    num_classes = scores.type.tensor_type.shape.dim[1].dim_value
    return DetectorSettings(num_classes=int(num_classes), canvas_height=int(rpn_dims[2]), canvas_width=int(rpn_dims[3]),
                            roi_output_size=int(roi_dims[2]), rpn_post_nms_top_n=int(rpn_post_nms_top_n))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exporters.tensorrt_build", description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", required=True, type=Path, help="folder with rpn.onnx and header.onnx (exporters output)")
    p.add_argument("--out", required=True, type=Path, help="folder for rpn.plan and header.plan")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16")
    p.add_argument("--max-batch-size", type=int, default=RepositoryOptions.max_batch_size,
                   help="images per batch; must equal the model repository's max_batch_size")
    p.add_argument("--rpn-post-nms-top-n", type=int, default=1000, help="RoIs per image (model's eval value)")
    p.add_argument("--header-opt-rois", type=int, default=None, help="header profile opt R (default: the max)")
    p.add_argument("--workspace-gib", type=float, default=DEFAULT_WORKSPACE_BYTES / 2**30)
    p.add_argument("--timing-cache", type=Path, default=None)
    p.add_argument("--check", action="store_true", help="compare each engine with ONNX Runtime on random inputs")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        import onnx

        paths = {n: args.onnx / f"{n}.onnx" for n in (names.RPN, names.HEADER)}
        for path in paths.values():
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist: export the ONNX first")
        settings = settings_from_onnx(onnx.load(str(paths[names.RPN]), load_external_data=False),
                                      onnx.load(str(paths[names.HEADER]), load_external_data=False),
                                      args.rpn_post_nms_top_n)
        options = RepositoryOptions(target="tensorrt", device="gpu", max_batch_size=args.max_batch_size)
        plans = build_plans(paths, args.out, settings, options, args.precision, int(args.workspace_gib * 2**30),
                            args.timing_cache, args.header_opt_rois, args.verbose)
        if args.check:
            for name, inputs in random_inputs(settings).items():
                for out, d in compare_with_onnxruntime(plans[name], paths[name], inputs).items():
                    print(f"{name}/{out}: max abs {d.max_abs:.3g}, max rel {d.max_rel:.3g}")
    except (TensorRTUnavailable, EngineBuildError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def random_inputs(settings: DetectorSettings, batch: int = 2, rois: int = 300, seed: int = 0) -> dict[str, dict]:
    """Plausible inputs for the numeric check: normalized noise images at full canvas size and
    RoIs inside the canvas."""
    rng = np.random.default_rng(seed)
    h, w = settings.canvas
    s = settings.roi_output_size
    xy = rng.uniform(0, [w - 32, h - 32], size=(rois, 2))
    wh = rng.uniform(8, 256, size=(rois, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], axis=1).astype(np.float32)
    return {
        names.RPN: {names.IMAGES: rng.standard_normal((batch, 3, h, w), dtype=np.float32),
                    names.IMAGE_SIZES: np.array([[h, w]] * batch, dtype=np.float32)},
        names.HEADER: {names.ROI_FEATURES: rng.standard_normal((rois, s, s, 256), dtype=np.float32),
                       names.ROIS: boxes},
    }


if __name__ == "__main__":
    sys.exit(main())
