"""Build TensorRT engines (plans) for the rpn and header networks from their ONNX.

TensorRT is imported lazily (:func:`import_tensorrt`); where it or a GPU is missing the
functions raise :class:`TensorRTUnavailable` naming what is missing.  Written against the
TensorRT 10 Python API (NGC ``tritonserver:25.10-py3``, the Docker image's base, ships TensorRT 10.13.3).
"""
from __future__ import annotations

import ctypes
import logging
import re
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from python_backend.settings import DetectorSettings

from .cache import plan_deserializes, read_timing_cache, timing_cache_file, write_timing_cache
from .gpus import GpuInfo, PlanTarget, cuda_device_count, use_device
from .precision import Fp32Constraints, LayerInfo, constrainable, fp32_constraints, select_fp32_layers
from .profiles import Profile, check_profiles, optimization_profiles
from .progress import BuildProgress, progress_monitor

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "fp16")
DEFAULT_WORKSPACE_BYTES = 4 << 30
MIN_TENSORRT_MAJOR = 10  # execute_async_v3, set_memory_pool_limit, IProgressMonitor
INSTALL_HINT = (
    "run inside nvcr.io/nvidia/tritonserver:25.10-py3 with `pip install tensorrt-cu13-bindings==10.13.3.9` "
    "(see Dockerfile and docs/docker.md); TensorRT can't be installed on the CPU/CI machines"
)
_LIBRARY = "libnvinfer.so"


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing; the message says which and how to get it."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX or build the engine; the message lists TensorRT's errors."""


# ----------------------------------------------------------------------------------------------
# TensorRT, its library version, the GPU
# ----------------------------------------------------------------------------------------------

def _major(version: str) -> int:
    m = re.match(r"\d+", version)
    return int(m.group()) if m else 0


def import_tensorrt():
    """The ``tensorrt`` module, or the ``tensorrt_bindings`` module of the ``tensorrt-cu13-bindings``
    wheel (the Docker image's choice: it links the image's own libnvinfer).  Raises
    :class:`TensorRTUnavailable` naming what is missing."""
    errors = []
    for module in ("tensorrt", "tensorrt_bindings"):
        try:
            trt = __import__(module)
        except (ImportError, OSError) as e:  # OSError: the bindings found, a shared library not
            errors.append(f"import {module}: {e}")
            continue
        version = getattr(trt, "__version__", "0")
        if _major(version) < MIN_TENSORRT_MAJOR:
            raise TensorRTUnavailable(f"TensorRT {version} is too old: this code needs TensorRT >= "
                                      f"{MIN_TENSORRT_MAJOR} (execute_async_v3, IProgressMonitor); {INSTALL_HINT}")
        return trt
    raise TensorRTUnavailable(
        "the TensorRT Python package is not importable (" + "; ".join(errors) + f"); {INSTALL_HINT}")


def require_tensorrt():
    """TensorRT and a CUDA GPU, or :class:`TensorRTUnavailable` saying which is missing."""
    trt = import_tensorrt()
    if cuda_device_count() < 1:
        raise TensorRTUnavailable(
            f"TensorRT {trt.__version__} is installed but no CUDA GPU is visible (libcuda.so.1 missing or "
            "cuInit/cuDeviceGetCount found no device): run on a GPU machine, in Docker with `--gpus`"
        )
    return trt


def library_version(lib) -> str:
    """``"10.5.0.18"`` from a loaded libnvinfer: ``getInferLibMajorVersion`` ... ``BuildVersion``
    (``include/NvInferRuntime.h``), or ``getInferLibVersion()`` ((major * 100 + minor) * 100 + patch,
    ``include/NvInferRuntimeBase.h``) where those are missing; both headers are in
    https://github.com/NVIDIA/TensorRT (the Python bindings expose neither)."""
    try:
        parts = [getattr(lib, f"getInferLib{p}Version")() for p in ("Major", "Minor", "Patch", "Build")]
    except AttributeError:
        v = int(lib.getInferLibVersion())
        return f"{v // 10000}.{v // 100 % 100}.{v % 100}"
    return ".".join(str(int(p)) for p in parts)


def mapped_library(maps_text: str, stem: str = _LIBRARY) -> str | None:
    """The path of the first file named ``<stem>`` or ``<stem>.*`` in ``/proc/<pid>/maps`` text."""
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            name = Path(fields[5]).name
            if name == stem or name.startswith(stem + "."):
                return fields[5]
    return None


def loaded_tensorrt_version(trt, maps_path: str | Path = "/proc/self/maps",
                            load: Callable[[str], object] = ctypes.CDLL) -> str:
    """The version of the libnvinfer this process actually loaded (the bindings' ``__version__``
    is fixed when the wheel is built and says nothing about the library found at run time).

    The library is the one mapped into this process (``maps_path``), else its soname
    ``libnvinfer.so.<major>`` (``dlopen`` returns an already loaded library by soname)."""
    maps = Path(maps_path)
    path = mapped_library(maps.read_text()) if maps.is_file() else None
    return library_version(load(path or f"{_LIBRARY}.{_major(trt.__version__)}"))


# ----------------------------------------------------------------------------------------------
# The network's layers, for the fp32 policy (exporters.tensorrt.precision)
# ----------------------------------------------------------------------------------------------

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
    outs, floats, shapes = [], [], []
    for i in range(layer.num_outputs):
        t = layer.get_output(i)
        outs.append(t.name)
        if _enum_name(t.dtype) in ("FLOAT", "HALF"):
            floats.append(i)
        # Polygraphy's precision tool tests ``is_execution_tensor``; a shape tensor may be both
        if getattr(t, "is_shape_tensor", False) or not getattr(t, "is_execution_tensor", True):
            shapes.append(i)
    return LayerInfo(layer.name, kind, op, ins, tuple(outs), tuple(floats), tuple(shapes))


def _layers(network, trt=None) -> list[LayerInfo]:
    return [layer_info(network.get_layer(i), trt) for i in range(network.num_layers)]


def fp32_layer_names(network, trt=None) -> list[str]:
    """:func:`~exporters.tensorrt.precision.select_fp32_layers` over a ``trt.INetworkDefinition``."""
    return select_fp32_layers(_layers(network, trt))


def network_fp32_constraints(network, trt=None) -> Fp32Constraints:
    """:func:`~exporters.tensorrt.precision.fp32_constraints` over a ``trt.INetworkDefinition``."""
    return fp32_constraints(_layers(network, trt))


def constrain_fp32(network, layer_names: Iterable[str], trt,
                   output_types: Mapping[str, Sequence[int]] | None = None) -> int:
    """Pin the named layers to fp32 (precision and every output's type), and type the outputs
    ``output_types`` names ({layer: output indices}) fp32 without a layer precision; returns how
    many layers were touched.  A named layer that can't take a precision (a CONSTANT or SHAPE
    layer, or one with an integer, boolean or shape-tensor output: :func:`precision.constrainable`)
    is left alone, so the builder is never asked for what it can't obey.  Needs
    ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS`` to be binding."""
    wanted = set(layer_names)
    typed = {name: tuple(indices) for name, indices in (output_types or {}).items()}
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name in wanted:
            info = layer_info(layer)
            if not constrainable(info):
                log.warning("not pinning %s to fp32: a %s layer with outputs that can't take a type", layer.name,
                            info.kind)
                continue
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            count += 1
        elif layer.name in typed:
            info = layer_info(layer)
            for j in typed[layer.name]:
                if j not in info.float_outputs or j in info.shape_outputs:
                    raise ValueError(f"output {j} of {layer.name} ({info.kind}) is not a float activation: "
                                     f"its type can't be set to fp32")
                layer.set_output_type(j, trt.float32)
            count += 1
    return count


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------

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


def _timing_cache(trt, config, path: str | Path | None, printer: Callable[[str], None]):
    """The builder config's timing cache, from ``path`` when TensorRT accepts that file."""
    cache = config.create_timing_cache(read_timing_cache(path))
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        printer(f"[trt] timing cache {path} is unreadable or from another GPU or TensorRT; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def build_engine(onnx_path: str | Path, plan_path: str | Path, profiles: Sequence[Profile], precision: str = "fp32",
                 workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, timing_cache_path: str | Path | None = None,
                 verbose: bool = False, printer: Callable[[str], None] = print,
                 device_index: int | None = None) -> Path:
    """Parse ``onnx_path``, build one engine with ``profiles`` (optimization profiles 0, 1, ... in
    that order) on CUDA device ``device_index`` (None: the current device) and write it to ``plan_path``.

    precision: ``fp32`` (TF32 off: the ONNX Runtime reference's numbers), ``tf32`` (TensorRT's
    default), ``fp16`` (FP16 with :func:`fp32_layer_names` pinned to fp32 and
    ``OBEY_PRECISION_CONSTRAINTS``).  The timing cache at ``timing_cache_path`` is loaded when
    present and replaced atomically after the build (it makes rebuilds on the same GPU fast).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} does not exist")
    trt = require_tensorrt()
    with use_device(device_index):
        logger = _capturing_logger(trt, verbose)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  "
                                   + "\n  ".join(parser_errors(parser)))
        inputs = {network.get_input(i).name for i in range(network.num_inputs)}
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        for profile in profiles:
            if inputs != set(profile):
                raise EngineBuildError(f"profile inputs {sorted(profile)} do not match the network inputs "
                                       f"{sorted(inputs)}")
            opt_profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profile.items():
                opt_profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(opt_profile)
        if precision == "fp32":
            config.clear_flag(trt.BuilderFlag.TF32)
        elif precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            constraints = network_fp32_constraints(network, trt)
            pinned = constrain_fp32(network, constraints.layers, trt, constraints.outputs)
            printer(f"[trt] fp16 with {pinned} of {network.num_layers} layers pinned to fp32 "
                    f"({len(constraints.outputs)} by their output types only)")
        _timing_cache(trt, config, timing_cache_path, printer)
        # TensorRT keeps a raw pointer: the monitor (like the logger) must outlive the build
        monitor = progress_monitor(trt, BuildProgress(printer))
        config.progress_monitor = monitor
        device = "the current device" if device_index is None else f"device {device_index}"
        printer(f"[trt] building {plan_path.name} from {onnx_path.name} ({precision}, TensorRT {trt.__version__}, "
                f"{device})")
        start = time.monotonic()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            errors = logger.errors or ["(no error logged; rerun with verbose=True)"]
            raise EngineBuildError(f"TensorRT could not build {onnx_path}:\n  " + "\n  ".join(errors))
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        plan_path.write_bytes(bytes(serialized))
        if timing_cache_path:
            write_timing_cache(timing_cache_path, bytes(config.get_timing_cache().serialize()))
    printer(f"[trt] wrote {plan_path} ({plan_path.stat().st_size / 2**20:.1f} MiB) in {time.monotonic() - start:.0f} s")
    return plan_path


def build_plans(onnx_paths: Mapping[str, Path], out_dir: str | Path, settings: DetectorSettings,
                max_batch_size: int, precision: str = "fp16", workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                timing_cache_path: str | Path | None = None, header_opt_rois: int | None = None,
                verbose: bool = False, printer: Callable[[str], None] = print,
                device_index: int | None = None) -> dict[str, Path]:
    """Build ``rpn.plan`` and ``header.plan`` in ``out_dir`` on CUDA device ``device_index``:
    ``{"rpn": path, "header": path}``, the ``plans=`` argument of
    :func:`~exporters.repository.write_repository` for the tensorrt target.

    ``max_batch_size``: images per batch, the model repository's ``max_batch_size``."""
    profiles = optimization_profiles(settings, max_batch_size, header_opt_rois)
    missing = [n for n in profiles if n not in onnx_paths]
    if missing:
        raise ValueError(f"onnx_paths lacks {missing}; expected {{'rpn': path, 'header': path}}")
    import onnx

    out_dir = Path(out_dir)
    plans = {}
    for name, model_profiles in profiles.items():
        check_profiles(model_profiles, onnx.load(str(onnx_paths[name]), load_external_data=False))
        plans[name] = build_engine(onnx_paths[name], out_dir / f"{name}.plan", model_profiles, precision,
                                   workspace_bytes, timing_cache_path, verbose, printer, device_index)
    return plans


def build_plans_per_gpu(onnx_paths: Mapping[str, Path], out_dir: str | Path, settings: DetectorSettings,
                        max_batch_size: int, targets: Sequence[PlanTarget], precision: str = "fp16",
                        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES, timing_cache_dir: str | Path | None = None,
                        header_opt_rois: int | None = None, verbose: bool = False,
                        printer: Callable[[str], None] = print) -> dict[str, dict[str, Path]]:
    """:func:`build_plans` once per target of :func:`~exporters.tensorrt.gpus.plan_targets` (one per
    GPU model, each of its own compute capability), each on its own device, into
    ``out_dir/cc<cc>``: ``{model: {plan file name: path}}``, the files each model's version folder
    gets (with :func:`~exporters.tensorrt.gpus.set_cc_model_filenames` mapping them in its config).  Each GPU model keeps its own timing cache in ``timing_cache_dir``."""
    trt_version = loaded_tensorrt_version(require_tensorrt()) if timing_cache_dir else ""
    out: dict[str, dict[str, Path]] = {}
    for t in targets:
        cache = (timing_cache_file(timing_cache_dir, GpuInfo(t.device_index, t.gpu_names[0], t.compute_capability),
                                   trt_version) if timing_cache_dir else None)
        plans = build_plans(onnx_paths, Path(out_dir) / f"cc{t.compute_capability}", settings, max_batch_size,
                            precision, workspace_bytes, cache, header_opt_rois, verbose, printer, t.device_index)
        for model, path in plans.items():
            out.setdefault(model, {})[t.filename] = path
    return out


def plan_check(targets: Sequence[PlanTarget]) -> Callable[[Path], bool]:
    """``plan path -> bool``: does TensorRT deserialize this cached plan on a device of its compute
    capability (found by its file name among ``targets``)?  The ``plan_ok`` argument of
    :func:`~exporters.tensorrt.cache.why_rebuild`."""
    trt = require_tensorrt()
    devices = {t.filename: t.device_index for t in targets}

    def ok(plan: Path) -> bool:
        index = devices.get(Path(plan).name)
        if index is None:
            return False  # a file no target builds: from another host's GPU set
        with use_device(index):
            runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
            return plan_deserializes(plan, runtime.deserialize_cuda_engine)

    return ok
