"""One options object for every command: the model, the repository, the server.

:class:`Options` is built from the command line (:func:`add_arguments`, :meth:`Options.from_args`)
or from the Docker image's environment variables (:meth:`Options.from_env`; docs/docker.md lists
them), through the same parsers.  Each field carries its flag, its variable and its help line
in its metadata, so the two surfaces can't drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from exporters.model_options import ModelOptions
from exporters.repository_options import DEVICES, ENGINE_PRECISIONS, JPEG_DECODERS, TRT_PRECISIONS, RepositoryOptions
from python_backend.settings import parse_canvases, parse_flag

from .values import at_least, between, parse_host, positive

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPOSITORY = ROOT / "model_repository"
# Deployment targets: the repository's targets, plus ONNX Runtime with its TensorRT execution provider
TARGETS = ("python", "onnxruntime", "onnxruntime-trt", "tensorrt", "torch")
# Older names of variables, read when the current one is unset: CANVAS held the one canvas of
# deployments before the canvas set (the same HEIGHTxWIDTH text is a set of one)
ENV_ALIASES = {"CANVASES": "CANVAS"}


class OptionsError(ValueError):
    """An option value that is malformed or does not fit the others.  The message names each option
    by its field (``max_batch_size must be >= 1, got 0``); ``fields`` lists them (by default the
    field the message starts with), so that each surface spells them its own way (:meth:`spelled`:
    ``--max-batch-size`` on the command line, ``MAX_BATCH_SIZE`` in Docker's environment)."""

    def __init__(self, message: str, *fields: str):
        super().__init__(message)
        if not fields:
            first = message.split(" ", 1)[0]
            fields = (first,) if first in {f.name for f in dataclasses.fields(Options)} else ()
        self.fields = fields

    def spelled(self, spell: Callable[[str], str]) -> str:
        """The message with each of :attr:`fields` written as ``spell(field)``."""
        text = str(self)
        for name in self.fields:
            text = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", spell(name), text)
        return text


def flag_name(field_name: str) -> str:
    """A field's command-line flag: ``max_batch_size`` -> ``--max-batch-size``."""
    return "--" + field_name.replace("_", "-")


# ----------------------------------------------------------------------------------------------
# Parsers: each takes the text of a flag or a variable and raises ValueError naming what it wants
# ----------------------------------------------------------------------------------------------

def parse_canvases_option(text: str) -> str | tuple[tuple[int, int], ...]:
    """``"auto"`` or ``"800x800,800x1344,..."`` (height x width each) -> "auto" or ((800, 800), ...)."""
    if str(text).strip().lower() == "auto":
        return "auto"
    return parse_canvases(text)


def parse_gpus(text: str) -> tuple[int, ...] | None:
    """``"all"`` -> None (every GPU the server sees); ``"0,1"`` -> (0, 1)."""
    if str(text).strip().lower() == "all":
        return None
    try:
        ids = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"gpus must be 'all' or GPU ids such as 0,1, got {text!r}") from None
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"gpus must be 'all' or distinct GPU ids >= 0 such as 0,1, got {text!r}")
    return ids


parse_bool = parse_flag


def parse_optional_int(text: str) -> int | None:
    return int(text) if str(text).strip() else None


def _opt(default: Any, group: str, help: str, *, parse: Callable[[str], Any] = str, env: str | None = None,
         choices=None, flag: bool = True, docker_default: Any = dataclasses.MISSING, metavar: str | None = None,
         check: Callable[[Any], str | None] | None = None):
    """A field with its command-line and environment spellings.  ``default`` is given as the text a
    user would type where ``parse`` turns text into the value (so ``--help`` shows it as typed).
    ``check``: what the value must be (:func:`at_least`, :func:`between`, :func:`positive`)."""
    value = parse(default) if isinstance(default, str) and parse is not str else default
    meta = dict(group=group, help=help, parse=parse, env=env, choices=choices, flag=flag, text_default=default,
                docker_default=docker_default, metavar=metavar, check=check)
    return field(default=value, metadata=meta)


@dataclass(frozen=True)
class Options:
    """The model (which detector), the repository (what is written, how Triton runs it) and the
    server.  ``precision="auto"`` becomes the target's default; cross-field errors raise
    :class:`OptionsError`.  :meth:`model_options` and :meth:`repository_options` are what the
    exporters take."""

    # -- model: which detector ------------------------------------------------------------------
    weights: str = _opt("random", "model", env="MODEL", docker_default="coco", metavar="coco|random|PATH",
                        help="'coco' (torchvision's COCO weights, downloaded once into torch's cache), 'random' "
                             "(seeded random weights, offline: boxes and labels are meaningless) or the path of "
                             "a state_dict checkpoint of a torchvision Faster R-CNN (--arch)")
    arch: str | None = _opt(None, "model", env="ARCH", metavar="BUILDER",
                            help="torchvision builder: fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2, "
                                 "fasterrcnn_mobilenet_v3_large_fpn or fasterrcnn_mobilenet_v3_large_320_fpn "
                                 "(default: a checkpoint's, from its keys and shapes; else fasterrcnn_resnet50_fpn)")
    num_classes: int = _opt(91, "model", parse=int, env="NUM_CLASSES", check=at_least(2, " (background included)"),
                            help="classes incl. background, for --weights random")
    seed: int = _opt(0, "model", parse=int, env="SEED", help="seed of --weights random")
    class_names: str | None = _opt(None, "model", env="CLASS_NAMES", metavar="FILE",
                                   help="text file, one class name per line, background first (default: COCO's "
                                        "names for 91 classes, else class_<i>)")
    min_size: int | None = _opt(None, "model", parse=parse_optional_int, env="MIN_SIZE", check=at_least(1),
                                help="torchvision's resize min_size (default: the model's, 800)")
    max_size: int | None = _opt(None, "model", parse=parse_optional_int, env="MAX_SIZE", check=at_least(1),
                                help="torchvision's resize max_size (default: the model's, 1333)")
    # -- repository: what is written and how Triton runs it -------------------------------------
    canvases: str | tuple[tuple[int, int], ...] = _opt(
        "auto", "repository", parse=parse_canvases_option, env="CANVASES", metavar="auto|HxW[,HxW...]",
        help="the canvases the rpn runs on (HEIGHTxWIDTH, multiples of 32); each request is padded onto the "
             "smallest that holds it; auto: the full landscape and portrait canvases of the resize (every image "
             "fits one) and those of square, 4:3 and 3:4 images (800x800,800x1088,1088x800,800x1344,1344x800 "
             "at torchvision's 800/1333)")
    target: str = _opt("python", "repository", env="TARGET", choices=TARGETS, docker_default="tensorrt",
                       help="how rpn and header are served: python (ONNX Runtime in the python backend, any "
                            "tritonserver), onnxruntime, onnxruntime-trt (ONNX Runtime's TensorRT provider), "
                            "tensorrt (engines; NVIDIA's Triton image) or torch (TorchScript in the python backend)")
    device: str = _opt("cpu", "repository", choices=DEVICES, docker_default="gpu",
                       help="where the python-backend steps run (KIND_CPU or KIND_GPU instances)")
    precision: str = _opt("auto", "repository", env="PRECISION", choices=("auto", *ENGINE_PRECISIONS),
                          help="precision of rpn and header: auto is fp16 for tensorrt and onnxruntime-trt, fp32 "
                               "otherwise; fp16 for torch and the TensorRT targets; tf32 (fp32 with TF32 tensor cores) for tensorrt "
                               "and torch")
    max_batch_size: int = _opt(8, "repository", parse=int, env="MAX_BATCH_SIZE", check=between(1, 64),
                               help="images per batch")
    instances: int = _opt(1, "repository", parse=int, env="INSTANCES", check=at_least(1),
                          help="instances of every step, on each GPU of --gpus for GPU steps")
    postprocess_instances: int = _opt(0, "repository", parse=int, env="POSTPROCESS_INSTANCES",
                                      check=at_least(0), help="instances of postprocess, the one step without a batcher; 0: one "
                                           "more than the rpn's with --device gpu, else as --instances")
    rpn_instances: int = _opt(0, "repository", parse=int, check=at_least(0),
                              help="instances of the rpn (on each GPU of --gpus); 0: as --instances, and at "
                                   "least 2 for the torch target's fp16 rpn on the GPU")
    queue_delay_us: int = _opt(0, "repository", parse=int, env="QUEUE_DELAY_US", check=at_least(0),
                               help="dynamic batcher max_queue_delay_microseconds; 0 batches what is queued when "
                                    "an instance frees")
    gpus: tuple[int, ...] | None = _opt("all", "repository", parse=parse_gpus, env="GPUS", metavar="all|0,1,...",
                                        help="GPUs the GPU steps run on: 'all' writes no gpus list (Triton puts "
                                             "the instances on every GPU it sees), '0,1' pins them to those CUDA "
                                             "ids; serve sets Triton's CUDA memory pool on each")
    workspace_gib: float = _opt(4.0, "repository", parse=float, env="WORKSPACE_GIB", check=positive,
                                help="TensorRT builder workspace in GiB (tensorrt, onnxruntime-trt)")
    channels_last: bool = _opt(True, "repository", parse=parse_bool,
                               help="torch target, fp16: the rpn in channels-last memory format")
    cuda_graphs: bool = _opt(True, "repository", parse=parse_bool,
                             help="torch target, --device gpu, fp16: replay the rpn as one CUDA graph per batch size and "
                                  "canvas")
    optimize_for_inference: bool = _opt(True, "repository", parse=parse_bool,
                                        help="torch target, --device gpu, fp16: freeze the rpn and let "
                                             "torch.jit.optimize_for_inference fuse convolution + bias + ReLU")
    unmasked_rpn: bool = _opt(True, "repository", parse=parse_bool,
                              help="torch target: also trace the rpn without extent masks at every canvas, and run "
                                   "it for batches whose every image's padded size (rounded up to 32) is the canvas "
                                   "(the masks are all ones there: the same detections, fewer passes)")
    rpn_memory_gib: float = _opt(8.0, "repository", parse=float, check=positive,
                                 help="torch target, --device gpu: the rpn process's cap on GPU memory in GiB (torch's "
                                      "caching allocator; cuDNN passes over plans whose workspace does not fit; the "
                                      "header's is 4)")
    jpeg_decoder: str = _opt("pillow", "repository", env="JPEG_DECODER", choices=JPEG_DECODERS,
                             help="--device gpu: who decodes JPEG requests: pillow (libjpeg-turbo on the CPU, as "
                                  "CPU instances always do: the pixels torchvision users decode, so their "
                                  "detections) or gpu (opt-in: nvJPEG through torchvision.io.decode_jpeg, one call "
                                  "per batch; its pixels differ from libjpeg's, and so do the detections; other "
                                  "formats and JPEGs it can't take go to Pillow)")
    decode_threads: int = _opt(0, "repository", parse=int, env="DECODE_THREADS", check=at_least(0),
                               help="threads that decode the requests of a batch side by side in each preprocess "
                                    "instance; 0: one per CPU of the serving machine, at most 8")
    repository: Path = _opt(DEFAULT_REPOSITORY, "repository", parse=Path, metavar="DIR",
                            help="the model repository to write (export) or serve")
    # -- server ----------------------------------------------------------------------------------
    host: str = _opt("0.0.0.0", "server", parse=parse_host, metavar="ADDRESS",
                     help="the address tritonserver's gRPC, HTTP and metrics endpoints listen on (its "
                          "--grpc-address and --http-address; metrics follow HTTP): 0.0.0.0 every interface, "
                          "127.0.0.1 this machine only")
    grpc_port: int = _opt(8001, "server", parse=int, check=between(1, 65535), help="tritonserver's gRPC port")
    http_port: int = _opt(8000, "server", parse=int, check=between(1, 65535),
                          help="tritonserver's HTTP port (health, metadata)")
    metrics_port: int = _opt(8002, "server", parse=int, check=between(1, 65535),
                             help="tritonserver's Prometheus metrics port")
    cuda_pool_bytes: int = _opt(4 << 30, "server", parse=int, env="CUDA_POOL_BYTES", check=at_least(0),
                                help="Triton's CUDA memory pool on every GPU in use (with GPU steps); it must hold "
                                     "the largest tensor passed between steps")
    tritonserver: str | None = _opt(None, "server", metavar="PATH",
                                    help="tritonserver binary (default: the nvidia-pytriton wheel's, then "
                                         "tritonserver on PATH)")
    mps: bool = _opt(False, "server", parse=parse_bool,
                     help="run the server under a CUDA MPS daemon of its own, so the python-backend steps' "
                          "processes share the GPU at once instead of by time slices")
    drain_timeout: int = _opt(45, "server", parse=int,
                              help="on SIGTERM or Ctrl-C, seconds the requests in flight get to finish before "
                                   "tritonserver stops anyway (its --exit-timeout-secs; deploy/'s pods allow 45)")
    log_dir: Path | None = _opt(None, "server", parse=Path, metavar="DIR",
                                help="folder for tritonserver's log, one file per start, kept after it stops "
                                     "(default: logs/ beside the repository)")
    rebuild: bool = _opt(False, "server", parse=parse_bool, env="REBUILD",
                         help="export again even if the repository exists")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, check = getattr(self, f.name), f.metadata["check"]
            problem = check(value) if check is not None and value is not None else None
            if problem:
                raise OptionsError(f"{f.name} {problem}, got {value}", f.name)
        if self.precision == "auto":
            object.__setattr__(self, "precision", "fp16" if self.target in ("tensorrt", "onnxruntime-trt") else "fp32")
        allowed = {"tensorrt": ENGINE_PRECISIONS, "onnxruntime-trt": TRT_PRECISIONS, "torch": ENGINE_PRECISIONS}
        allowed = allowed.get(self.target, ("fp32",))
        if self.precision not in allowed:
            raise OptionsError(f"precision {self.precision} does not apply to target {self.target}: "
                               f"choose one of {', '.join(allowed)}", "precision", "target")
        if self.drain_timeout < 0:
            raise OptionsError(f"drain_timeout must be >= 0 seconds, got {self.drain_timeout}")
        try:
            self.model_options()
            self.repository_options()
        except ValueError as e:
            raise OptionsError(str(e)) from None

    # -- what the library takes --------------------------------------------------------------------
    def model_options(self) -> ModelOptions:
        return ModelOptions(weights=str(self.weights), arch=self.arch, num_classes=self.num_classes, seed=self.seed,
                            class_names=self.class_names, min_size=self.min_size, max_size=self.max_size,
                            canvases=self.canvases)

    def repository_options(self, **overrides) -> RepositoryOptions:
        """The repository's options; ``overrides`` are RepositoryOptions fields (ort_trt_cache_dir, say)."""
        trt = self.target in ("tensorrt", "onnxruntime-trt")
        kw = dict(target="onnxruntime" if self.target == "onnxruntime-trt" else self.target, device=self.device,
                  max_batch_size=self.max_batch_size, instances=self.instances,
                  postprocess_instances=self.postprocess_instances, rpn_instances=self.rpn_instances,
                  queue_delay_us=self.queue_delay_us,
                  gpus=self.gpus or (), ort_tensorrt=self.target == "onnxruntime-trt",
                  trt_precision=self.precision if trt else "fp16",
                  trt_workspace_bytes=int(self.workspace_gib * 2**30),
                  torch_precision=self.precision if self.target == "torch" else "fp32",
                  torch_channels_last=self.channels_last, torch_cuda_graphs=self.cuda_graphs,
                  torch_optimize_for_inference=self.optimize_for_inference, torch_rpn_memory_gib=self.rpn_memory_gib,
                  torch_unmasked_rpn=self.unmasked_rpn,
                  jpeg_decoder=self.jpeg_decoder, decode_threads=self.decode_threads)
        kw.update(overrides)
        return RepositoryOptions(**kw)

    # -- what the repository records (exporters.provenance) ----------------------------------------
    def record(self) -> dict[str, Any]:
        """The model and repository options as JSON values: what a repository's provenance keeps."""
        out = {f.name: _record_value(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.metadata["group"] in RECORDED_GROUPS and f.name != "repository"}
        for name in ("weights", "class_names"):  # files by absolute path: the same file from any folder
            if out[name] and out[name] not in ("coco", "random"):
                out[name] = str(Path(out[name]).resolve())
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any], **values) -> "Options":
        """The options a repository's provenance recorded, with ``values`` over them.  Where the
        two don't fit together (a new ``target`` with a recorded ``precision`` it lacks, say), the
        recorded values give way: ``values`` over the defaults."""
        fields = {f.name for f in dataclasses.fields(cls)}
        recorded = {k: _from_record(k, v) for k, v in record.items() if k in fields}
        try:
            return cls(**{**recorded, **values})
        except OptionsError:
            return cls(**values)

    @property
    def uses_gpu(self) -> bool:
        """Whether any step runs on a GPU (KIND_GPU instances)."""
        return self.device == "gpu" or self.target not in ("python", "torch")

    # -- builders ----------------------------------------------------------------------------------
    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Options":
        """From a namespace that :func:`add_arguments` filled (fields it lacks keep their defaults)."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        return cls(**values)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Options":
        """From the Docker image's variables: every field with a variable, the image's own defaults
        (``docker_default``: COCO weights, the tensorrt target, GPU steps) where one is unset."""
        env = os.environ if env is None else env
        values = {}
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if meta["docker_default"] is not dataclasses.MISSING:
                values[f.name] = meta["docker_default"]
            name = meta["env"]
            if name in ENV_ALIASES and not env.get(name) and env.get(ENV_ALIASES[name]):
                name = ENV_ALIASES[name]
            text = env.get(name) if name else None
            if not text:  # unset or empty: the default
                continue
            if meta["choices"] and text not in meta["choices"]:
                raise OptionsError(f"{name} must be one of {', '.join(meta['choices'])}, got {text!r}")
            try:
                values[f.name] = meta["parse"](text)
            except ValueError as e:
                raise OptionsError(f"{name}: {e}") from None
        try:
            return cls(**values)
        except OptionsError as e:  # named by the variables
            variable = {f.name: f.metadata["env"] or f.name for f in dataclasses.fields(cls)}
            raise OptionsError(e.spelled(variable.get)) from None


RECORDED_GROUPS = ("model", "repository")


def _record_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_record_value(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _from_record(name: str, value: Any) -> Any:
    if name == "canvases" and isinstance(value, list):
        return tuple(tuple(int(x) for x in c) for c in value)
    if name == "gpus" and isinstance(value, list):
        return tuple(int(x) for x in value)
    return value


def env_variables() -> dict[str, str]:
    """{variable: help} of every field the Docker environment sets."""
    return {f.metadata["env"]: f.metadata["help"] for f in dataclasses.fields(Options) if f.metadata["env"]}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's default, unless its help already says it or it has none."""

    def _get_help_string(self, action):
        if "(default" in (action.help or "") or action.default in (None, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__.replace("parse_", "")  # argparse names it in "invalid <name> value"
    return convert


def add_arguments(parser: argparse.ArgumentParser, groups: tuple[str, ...],
                  skip: tuple[str, ...] = ()) -> None:
    """Add the flags of every field in ``groups`` (``model``, ``repository``, ``server``) except ``skip``."""
    by_group: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(Options):
        meta = f.metadata
        if meta["group"] not in groups or f.name in skip or not meta["flag"]:
            continue
        g = by_group.get(meta["group"]) or by_group.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flag = "--" + f.name.replace("_", "-")
        help_text = meta["help"]
        if meta["parse"] is parse_bool:
            if f.default:
                g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=True, help=help_text)
            else:
                g.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        kwargs = dict(dest=f.name, default=meta["text_default"], help=help_text, metavar=meta["metavar"])
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        if meta["parse"] is not str:
            kwargs["type"] = _argparse_type(meta["parse"])
        g.add_argument(flag, **kwargs)
