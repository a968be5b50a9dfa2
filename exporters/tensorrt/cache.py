"""Caching engines across container starts: the cache key, the reuse check, the timing cache.

Pure functions (no TensorRT import): the TensorRT version and the plan deserializer are
arguments, so the rules are tested on the CPU.

* A plan is valid only for the TensorRT library that built it and the GPU model, so the key
  names the *loaded* library's version (:func:`exporters.tensorrt.build.loaded_tensorrt_version`,
  not the bindings' ``__version__``) and every distinct GPU model; the hash covers what else shapes
  the engines and the repository, this code included (:func:`code_version`: the package's version
  and a digest of its source files), so a new image never reuses the ONNX, plans, configs and
  ``model.py`` copies an older one wrote, even where its version number did not change.
* Even under a matching key, a cached plan is reused only after it deserializes
  (:func:`why_rebuild`), so a plan TensorRT no longer loads is rebuilt instead of failing the
  server at load time.
* The timing cache is replaced atomically (:func:`write_timing_cache`): a reader sees the old
  file or the new one, never a truncated one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from python_backend.settings import DetectorSettings

from .gpus import GpuInfo

COMPLETE_MARKER = "complete.json"  # written last into a finished preparation folder
REPOSITORY_PLANS = "model_repository/*/*/*.plan"  # <repository>/<model>/<version>/<file>.plan
_DIGEST_CHARS = 16
DISTRIBUTION = "fasterrcnn-triton"  # pyproject.toml's project name
# the packages whose code writes the repository or runs in it (python_backend's model.py adapters and
# CUDA sources included); they sit side by side, in the checkout or in site-packages
SOURCE_PACKAGES = ("exporters", "python_backend", "fasterrcnn")
_SOURCE_SUFFIXES = (".py", ".cu", ".cuh")
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "unknown"


def gpus_slug(gpus: Sequence[GpuInfo] | str) -> str:
    """``NVIDIA-H100-80GB-HBM3-cc9.0`` (distinct models joined by ``+``, in device order); a plain
    string is a GPU model name given without its compute capability (an operator's override)."""
    if isinstance(gpus, str):
        return _slug(gpus)
    if not gpus:
        raise ValueError("the engine cache key needs at least one GPU, got none")
    models = dict.fromkeys(f"{_slug(g.name)}-cc{g.compute_capability}" for g in sorted(gpus, key=lambda g: g.index))
    return "+".join(models)


def package_version(distribution: str = DISTRIBUTION) -> str:
    """The installed distribution's version (``importlib.metadata``), ``"unknown"`` when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def source_digest(root: str | Path | None = None, packages: Sequence[str] = SOURCE_PACKAGES) -> str:
    """SHA-256 over the relative path and bytes of every ``.py``, ``.cu`` and ``.cuh`` file of
    ``packages`` under ``root`` (default: where this package is installed), in sorted order."""
    root = Path(root) if root is not None else _SOURCE_ROOT
    h = hashlib.sha256()
    for package in packages:
        files = sorted(p for p in (root / package).rglob("*")
                       if p.suffix in _SOURCE_SUFFIXES and p.is_file() and "__pycache__" not in p.parts)
        for path in files:
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def code_version() -> str:
    """``<package version>+<source digest>``: changes with a release and with any edit of the code."""
    return f"{package_version()}+{source_digest()[:_DIGEST_CHARS]}"


def engine_cache_key(settings: DetectorSettings, options, precision: str, gpus: Sequence[GpuInfo] | str,
                     trt_version: str, model_digest: str = "", code: str | None = None) -> str:
    """Folder name for cached engines: ``<gpus>__trt<version>__<precision>__<hash>``.

    ``gpus``: the devices that will serve (:func:`exporters.tensorrt.gpus.cuda_devices`), or a
    GPU model name (see :func:`gpus_slug`).
    ``options``: the repository options (a dataclass, e.g. ``RepositoryOptions``, or a mapping).
    ``trt_version``: the loaded library's version, or ``"none"`` for targets without engines.
    ``code``: this code's version, by default :func:`code_version`.
    The hash covers the settings, the options, the weights' digest and the code.
    """
    fields = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)
    payload = json.dumps({"settings": settings.to_parameters(), "options": fields, "precision": precision,
                          "model": model_digest, "code": code_version() if code is None else code},
                         sort_keys=True, default=str)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:_DIGEST_CHARS]
    return f"{gpus_slug(gpus)}__trt{_slug(trt_version)}__{precision}__{digest}"


def plan_deserializes(plan: str | Path | bytes, deserialize: Callable[[bytes], object]) -> bool:
    """True when ``deserialize(plan bytes)`` returns an engine; False when it returns None or raises
    (TensorRT returns None for a plan of another version or GPU), or the file can't be read."""
    try:
        blob = plan if isinstance(plan, bytes) else Path(plan).read_bytes()
        return deserialize(blob) is not None
    except Exception:  # noqa: BLE001 - any failure means "don't reuse", and why_rebuild says which file
        return False


def why_rebuild(root: str | Path, plan_ok: Callable[[Path], bool] | None, marker: str = COMPLETE_MARKER,
                plans: str = REPOSITORY_PLANS) -> str | None:
    """None when ``root`` holds a finished preparation that may be reused, else the reason it may not.

    Finished: ``root / marker`` exists.  Reusable: every plan matching the glob ``plans`` under
    ``root`` (by default the engines of a model repository in ``root/model_repository``) passes
    ``plan_ok``, for example :func:`exporters.tensorrt.build.plan_check`; ``plan_ok=None`` skips
    the check (targets without engines).
    """
    root = Path(root)
    if not (root / marker).is_file():
        return f"no finished preparation in {root}"
    if plan_ok is not None:
        for plan in sorted(root.glob(plans)):
            if not plan_ok(plan):
                return f"cached engine {plan} does not deserialize with this TensorRT and GPU"
    return None


def timing_cache_file(folder: str | Path, gpu: GpuInfo, trt_version: str) -> Path:
    """The timing cache of one GPU model and TensorRT version: ``<folder>/<gpu>-cc<cc>__trt<version>.cache``."""
    return Path(folder) / f"{gpus_slug([gpu])}__trt{_slug(trt_version)}.cache"


def read_timing_cache(path: str | Path | None) -> bytes:
    """The cache's bytes, or ``b""`` when there is none yet."""
    if path is None or not Path(path).is_file():
        return b""
    return Path(path).read_bytes()


def write_timing_cache(path: str | Path, data: bytes | bytearray | memoryview) -> Path:
    """Replace ``path`` with ``data`` atomically: written to a temporary file in the same folder,
    flushed to disk, then renamed over ``path`` (``os.replace``).  A failure or interruption
    before the rename leaves the old file as it was and removes the temporary one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

