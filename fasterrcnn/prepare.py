"""Prepare the Docker image's model repository: cached in a volume, safe to share between containers.

``fasterrcnn prepare`` (docker/entrypoint.sh runs it, then execs tritonserver) reads the image's
environment (:meth:`fasterrcnn.options.Options.from_env`), loads the detector, and returns the
repository for this GPU, TensorRT version, settings and weights, building it on the first start:

    $CACHE_DIR/repos/<key>/                 one deployment (key: exporters engine_cache_key)
        current -> <generation>             symlink, switched atomically to a finished generation
        <generation>/model_repository/      what tritonserver serves
        <generation>/onnx/, plans/          the exported networks and TensorRT engines
        <generation>/complete.json          written last
        .lock                               held (fcntl.flock) while preparing this key
    $CACHE_DIR/leases/<host>.<random>       one per server: the generation it serves, flock-held
                                            for as long as the server lives

A generation is never changed or deleted while a server may use it: a rebuild (REBUILD=1, a
broken cache) writes a new generation and switches ``current``; old generations are deleted only
when no live lease names them.  A lease is live while its file is locked: the entrypoint opens
the file on a descriptor that this command locks and that tritonserver inherits through ``exec``,
so the lock lasts exactly as long as the server (flock(2): the lock belongs to the open file
description, shared by every copy of the descriptor).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from exporters import loading
from exporters.export import export_loaded, load_model, serving_devices
from exporters.tensorrt.cache import COMPLETE_MARKER, engine_cache_key, why_rebuild
from exporters.tensorrt.gpus import CudaError, GpuInfo, plan_targets
from python_backend.settings import format_canvases

from .options import HelpFormatter, Options, OptionsError

log = logging.getLogger(__name__)

CURRENT = "current"
DEAD_LEASE_AGE_S = 24 * 3600  # unlocked lease files older than this are removed


class PrepareError(RuntimeError):
    """The repository could not be prepared; the message says why and what to do."""


@dataclass(frozen=True)
class Prepared:
    repository: Path  # the model repository to serve
    generation: Path  # the folder holding it
    reused: bool


def serving_gpus(options: Options, override: str | None = None) -> str | list[GpuInfo]:
    """The GPUs this deployment runs on, as the cache key names them: ``override`` (GPU_NAME) as
    given, else the CUDA devices of ``options.gpus`` (all when None) with their model and compute
    capability (the tensorrt target builds one engine per distinct compute capability)."""
    if override:
        return override
    try:
        devices = serving_devices(options.gpus or ())
    except (ValueError, CudaError) as e:
        raise PrepareError(f"GPUS={','.join(map(str, options.gpus or ()))}: {e}") from None
    if not devices:
        raise PrepareError("no GPU visible (no CUDA driver, or it lists no device): start the container with "
                           "--gpus all (NVIDIA Container Toolkit)")
    return devices


def tensorrt_version(options: Options) -> str:
    if options.target != "tensorrt":
        return "none"
    from exporters.tensorrt.build import loaded_tensorrt_version, require_tensorrt

    return loaded_tensorrt_version(require_tensorrt())


def _lock(path: Path):
    """An exclusive flock on ``path`` (created), released when the context ends."""
    @contextlib.contextmanager
    def held():
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock
    return held()


# What a non-blocking lock request that meets another holder's lock fails with: EWOULDBLOCK
# locally (flock(2)); on NFS, where flock is emulated with fcntl byte-range locks (flock(2),
# NOTES), EACCES or EAGAIN (fcntl(2), F_SETLK).
_HELD_ERRNOS = frozenset({errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES})


def _locked_by_someone(path: Path) -> bool:
    """Whether another open file description holds a flock on ``path``.

    The probe's descriptor is open read-write: on NFS an exclusive lock needs a descriptor open
    for writing (flock(2), NOTES), and a read-only one fails with EBADF.
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError as e:
        if e.errno in _HELD_ERRNOS:
            return True
        raise
    finally:
        os.close(fd)


def _current(slot: Path) -> Path | None:
    link = slot / CURRENT
    return slot / os.readlink(link) if link.is_symlink() else None


def _switch(slot: Path, generation: Path) -> None:
    """Point ``slot/current`` at ``generation`` in one rename (readers see the old or the new link)."""
    tmp = slot / f".{CURRENT}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(generation.name)
    os.replace(tmp, slot / CURRENT)


def live_generations(leases: Path) -> set[Path]:
    """Generations named by a lease that a live server still holds; dead leases older than a day go."""
    live = set()
    for lease in leases.glob("*"):
        with contextlib.suppress(FileNotFoundError):  # another key's preparation removed it meanwhile
            if _locked_by_someone(lease):
                text = lease.read_text().strip()
                if text:
                    live.add(Path(text))
            elif time.time() - lease.stat().st_mtime > DEAD_LEASE_AGE_S:
                lease.unlink()
    return live


def collect_garbage(slot: Path, leases: Path, keep: Path) -> list[Path]:
    """Delete this key's generations that are neither ``keep`` (current) nor leased, and unfinished
    builds (only ever seen here under the key's lock, so their builder is gone).  Returns them."""
    live = live_generations(leases)
    removed = []
    for folder in sorted(p for p in slot.iterdir() if p.is_dir() and not p.is_symlink()):
        if folder == keep or folder in live:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _take_lease(lease_fd: int, generation: Path) -> None:
    """Lock the lease (shared, on the caller's descriptor) and name ``generation`` in it.  The
    descriptor must be open read-write (the entrypoint's ``exec 9<>``): on NFS a shared lock
    needs it open for reading, and the name is written through it."""
    fcntl.flock(lease_fd, fcntl.LOCK_SH)
    data = f"{generation}\n".encode()
    os.ftruncate(lease_fd, 0)
    os.pwrite(lease_fd, data, 0)


def _plan_check(options: Options, gpus: str | list[GpuInfo]):
    """The tensorrt target's ``plan_ok`` for :func:`why_rebuild`: cached engines must deserialize here."""
    if options.target != "tensorrt":
        return None
    from exporters.tensorrt.build import plan_check

    return plan_check(plan_targets(serving_devices(options.gpus or ()) if isinstance(gpus, str) else gpus))


def prepare(options: Options, cache_dir: str | Path, gpus: str | list[GpuInfo], rebuild: bool = False,
            lease_fd: int | None = None, printer: Callable[[str], None] = log.info) -> Prepared:
    """Reuse or build this deployment's repository under ``cache_dir`` (see the module docstring).

    ``gpus``: :func:`serving_gpus`.  ``lease_fd``: an open descriptor of a file in
    ``cache_dir/leases`` that outlives this call for as long as the repository is served; None
    opens one held by this process.
    """
    cache = Path(cache_dir).resolve()
    leases = cache / "leases"
    leases.mkdir(parents=True, exist_ok=True)
    if lease_fd is None:
        lease_fd = os.open(leases / f"{os.uname().nodename}.{os.getpid()}", os.O_RDWR | os.O_CREAT, 0o644)
    model_options = options.model_options()
    detector, settings = load_model(model_options)  # before the lock: a COCO download may take minutes
    repo_options = options.repository_options(
        ort_trt_cache_dir=str(cache / "ort_trt") if options.target == "onnxruntime-trt" else "")
    trt_version = tensorrt_version(options)
    key = engine_cache_key(settings, repo_options, options.precision, gpus, trt_version, model_options.digest())
    slot = cache / "repos" / key
    slot.mkdir(parents=True, exist_ok=True)
    with _lock(slot / ".lock"):
        current = _current(slot)
        why = ("first start" if current is None else "REBUILD=1" if rebuild
               else why_rebuild(current, _plan_check(options, gpus)))
        if why is None:
            printer(f"reusing {current}")
            generation, reused = current, True
        else:
            printer(f"preparing {slot.name} ({why})" + ("; TensorRT engine builds take minutes"
                                                        if options.target == "tensorrt" else ""))
            generation, reused = slot / time.strftime(f"%Y%m%dT%H%M%S-{os.getpid()}"), False
            partial = slot / f".partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            export_loaded(detector, settings, model_options, repo_options, partial / "model_repository",
                          work_dir=partial, timing_cache_dir=cache / "timing",
                          devices=None if isinstance(gpus, str) else gpus, printer=printer)
            (partial / COMPLETE_MARKER).write_text(json.dumps(
                {"gpus": key.split("__")[0], "tensorrt": trt_version, "model": model_options.digest(), "target": options.target,
                 "precision": options.precision}, indent=1))
            os.rename(partial, generation)
            _switch(slot, generation)
            printer(f"ready: {generation}")
        _take_lease(lease_fd, generation)
        for folder in collect_garbage(slot, leases, keep=generation):
            printer(f"removed {folder.name}, which no server uses")
    return Prepared(generation / "model_repository", generation, reused)


def main(argv=None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=HelpFormatter,
        description="Prepare the model repository the Docker image serves, from its environment variables\n"
                    "(docs/docker.md): reuse the cached one for these GPUs, TensorRT, settings and weights,\n"
                    "or build it. Prints the repository's path as the last line.")
    parser.add_argument("--cache-dir", type=Path, default=os.environ.get("CACHE_DIR", "/cache"),
                        help="the volume for repositories, engines and timing caches (variable CACHE_DIR)")
    parser.add_argument("--lease-fd", type=int,
                        help="an open descriptor of a file in CACHE_DIR/leases, kept open by the server for as "
                             "long as it serves the repository (the entrypoint's); default: none, the "
                             "repository is protected only while this command runs")
    args = parser.parse_args(argv)
    # stdout carries only the result; progress (the exporter's too) goes to stderr
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="prepare: %(message)s")
    say = log.info
    try:
        options = Options.from_env()
        say(f"MODEL={options.weights} TARGET={options.target} PRECISION={options.precision} "
            f"CANVASES={options.canvases if isinstance(options.canvases, str) else format_canvases(options.canvases)} "
            f"MAX_BATCH_SIZE={options.max_batch_size} "
            f"GPUS={'all' if options.gpus is None else ','.join(map(str, options.gpus))}")
        prepared = prepare(options, args.cache_dir, serving_gpus(options, os.environ.get("GPU_NAME")),
                           rebuild=options.rebuild, lease_fd=args.lease_fd, printer=say)
    except (OptionsError, PrepareError, loading.CheckpointError, OSError, ValueError, RuntimeError) as e:
        say(f"{type(e).__name__}: {e}")
        return 1
    print(prepared.repository)
    return 0
