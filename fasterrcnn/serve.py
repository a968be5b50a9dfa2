"""``fasterrcnn serve``: tritonserver on the model repository until SIGTERM or SIGINT.

The signal handlers live here, in the command, not in :mod:`fasterrcnn.server`: a library that
starts a server must not take over its caller's signals.
"""
from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path

from python_backend import names

from . import repository as repository_check
from .options import Options
from .server import TritonServer

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """A stop signal arrived (raised by the handler :func:`stop_signals` installs)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


@contextlib.contextmanager
def stop_signals():
    """Inside the block SIGTERM and SIGINT raise :class:`Stopped` (wherever the main thread is, even
    in a blocking wait); :func:`ignore_stop_signals` turns them off for the cleanup."""
    previous = {s: signal.signal(s, _raise_stopped) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def ignore_stop_signals() -> None:
    """A second Ctrl-C or SIGTERM must not interrupt the stop that the first one started."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def repository_ready(path: Path) -> bool:
    return all((Path(path) / n / "config.pbtxt").is_file() for n in (names.ENSEMBLE, *names.STEPS))


def ensure_repository(options: Options, rebuild: bool = False, given: frozenset[str] = frozenset()) -> Options:
    """Export into ``options.repository`` when asked to, when it is missing, or when it is not what
    ``options`` asks for (:func:`fasterrcnn.repository.check`; ``given``: the fields set on the
    command line).  Returns the options the repository was exported with, to serve it with."""
    if rebuild or options.rebuild or not repository_ready(options.repository):
        repository_check.export_repository(options)
        return options
    verdict = repository_check.check(options, given)
    if verdict.reasons:
        log.warning("%s is not what was asked for, exporting it again: %s", options.repository,
                    "; ".join(verdict.reasons))
        repository_check.export_repository(verdict.options)
    return verdict.options


def make_server(options: Options) -> TritonServer:
    """The launcher for ``options``: Triton's CUDA memory pool on every GPU in use when a step runs on a GPU."""
    return TritonServer(options.repository, grpc_port=options.grpc_port, http_port=options.http_port,
                        metrics_port=options.metrics_port, binary=options.tritonserver,
                        cuda_pool_bytes=options.cuda_pool_bytes if options.uses_gpu else 0, gpus=options.gpus,
                        mps=options.mps, drain_timeout_s=options.drain_timeout, host=options.host,
                        log_dir=options.log_dir)


def serve(options: Options, given: frozenset[str] = frozenset()) -> int:
    """Export if needed (``given``: :func:`ensure_repository`'s), start tritonserver, wait.  Returns
    the exit code: 0 when a signal stopped it (or it exited cleanly by itself), 1 when it failed."""
    options = ensure_repository(options, given=given)
    warning = repository_check.weights_warning(options.repository)
    if warning:
        log.warning(warning)
    server = make_server(options)
    with stop_signals():
        try:
            log.info("starting tritonserver on %s (gRPC %d, HTTP %d, metrics %d)", options.repository,
                     options.grpc_port, options.http_port, options.metrics_port)
            server.start()
            log.info("server ready: %s; log: %s; stop it with Ctrl-C or SIGTERM", server.endpoints(), server.log_path)
            code = server.wait()
            if code != 0:
                log.error("tritonserver exited by itself with code %d; its log: %s", code, server.log_path)
                return 1
            log.info("tritonserver exited by itself")
            return 0
        except Stopped as e:
            log.info("%s: stopping tritonserver%s; the requests in flight get up to %d s", e,
                     " and the MPS daemon" if options.mps else "", options.drain_timeout)
            return 0
        finally:
            ignore_stop_signals()
            server.stop()
            if server.log_path is not None:
                log.info("tritonserver stopped; its log: %s", server.log_path)
