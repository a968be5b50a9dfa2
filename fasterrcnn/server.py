"""Start a tritonserver on a model repository and wait until it is ready.

Finds the binary in this order: an explicit path, the nvidia-pytriton wheel's tritonserver
(python backend + ensembles), ``tritonserver`` on PATH (NVIDIA's Triton image).

The server runs in a process group of its own; :meth:`TritonServer.stop` stops the group, so the
python-backend stub processes go with it, and the CUDA MPS daemon if one was started.  Signals are
the command line's business (``fasterrcnn serve``), not this module's.  The server's output goes to
a log file of its own under ``log_dir`` (default ``logs/`` beside the repository), kept after it stops.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from exporters.tensorrt.gpus import cuda_devices

from .drain import drain

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The server could not be started or did not become ready; the message says why."""


@dataclass
class TritonBinary:
    path: Path
    backend_dir: Path | None  # None: the binary's default (/opt/tritonserver/backends)


def _wheel_binary() -> TritonBinary | None:
    try:
        import pytriton
    except ImportError:
        return None
    root = Path(pytriton.__file__).parent / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    backends = root / "backends"
    _install_python_stub(root)
    return TritonBinary(binary, backends)


def _install_python_stub(root: Path) -> None:
    """The wheel ships one python-backend stub per Python version; the backend wants the one
    matching the Python that runs the models, next to libtriton_python.so."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    target = root / "backends" / "python" / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the nvidia-pytriton wheel has no python backend stub for Python {version}")
    if not target.is_file() or target.stat().st_size != stub.stat().st_size:
        shutil.copy2(stub, target)


def find_tritonserver(explicit: str | os.PathLike | None = None) -> TritonBinary:
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise ServerError(f"tritonserver binary {p} does not exist")
        return TritonBinary(p, Path(os.environ["TRITON_BACKEND_DIR"]) if os.environ.get("TRITON_BACKEND_DIR") else None)
    if os.environ.get("TRITONSERVER_BIN"):
        return find_tritonserver(os.environ["TRITONSERVER_BIN"])
    found = _wheel_binary()
    if found:
        return found
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonBinary(Path(on_path), None)
    raise ServerError("no tritonserver found: pip install nvidia-pytriton==0.7.0, put tritonserver on PATH, "
                      "or pass --tritonserver PATH")


class MpsDaemon:
    """A CUDA MPS control daemon of our own (its pipe and log folders in a temporary folder).

    Every python-backend model instance is a process with its own CUDA context; without MPS the
    GPU time-slices between those contexts, so a CuPy step's small kernels wait for the torch
    step's time slice and the other way round.  Under MPS the processes' kernels share the GPU
    at once (NVIDIA's MPS overview: https://docs.nvidia.com/deploy/mps/).  Processes join it
    through the environment (:meth:`env`).  Needs ``nvidia-cuda-mps-control`` (NVIDIA driver
    utilities) and the right to start it.
    """

    def __init__(self) -> None:
        self.binary = shutil.which("nvidia-cuda-mps-control")
        self.folder: Path | None = None

    def env(self) -> dict[str, str]:
        assert self.folder is not None, "start() first"
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(self.folder / "log")}

    def start(self) -> "MpsDaemon":
        if not self.binary:
            raise ServerError("--mps: nvidia-cuda-mps-control is not on PATH (it comes with the NVIDIA driver's "
                              "utilities; in a container, run it with the 'utility' driver capability)")
        self.folder = Path(tempfile.mkdtemp(prefix="fasterrcnn-mps-"))
        env = self.env()
        for d in env.values():
            Path(d).mkdir()
        proc = subprocess.run([self.binary, "-d"], env={**os.environ, **env}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ServerError(f"--mps: nvidia-cuda-mps-control -d failed ({proc.returncode}): "
                              f"{(proc.stdout + proc.stderr).strip()[-500:]}")
        return self

    def stop(self) -> None:
        if self.folder is None:
            return
        try:
            subprocess.run([self.binary], input="quit\n", env={**os.environ, **self.env()}, capture_output=True,
                           text=True, timeout=15)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for child ``pid`` to exit, without reaping it; True if it did."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def wait_ready(grpc_url: str, exited: Callable[[], bool], timeout: float) -> bool | None:
    """Poll a starting server's gRPC readiness: True once ready, False as soon as ``exited()`` says
    its process is gone, None after ``timeout`` s."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exited():
            return False
        try:
            if client.is_server_ready():
                return True
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.5)
    return None


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # every interface -> this machine's loopback


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def dial_address(host: str, port: int) -> str:
    """The HOST:PORT a client on this machine dials for a server bound to ``host``."""
    return host_port(WILDCARDS.get(host, host), port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TritonServer:
    """A running tritonserver process; use as a context manager or call :meth:`stop`."""

    repository: Path
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    binary: str | None = None
    # Triton's CUDA memory pool on each GPU of ``gpus`` (0: Triton's 64 MiB default).  Tensors passed
    # between steps that don't fit are staged through host memory, so the GPU path needs room
    # for the FPN maps and RoI features of a full batch on every GPU it uses.
    cuda_pool_bytes: int = 0
    gpus: Sequence[int] | None = None  # GPU ids the pools are set on; None: every visible GPU
    log_verbose: int = 0
    mps: bool = False  # run the server's processes under a CUDA MPS daemon of its own (MpsDaemon)
    # the address gRPC and HTTP bind to (--grpc-address, --http-address; metrics follow HTTP's, as
    # tritonserver --help says); tritonserver's own default, every interface
    host: str = "0.0.0.0"
    # stop() gives the requests in flight up to this many seconds (fasterrcnn.drain), and tritonserver
    # as many again after SIGTERM (--exit-timeout-secs)
    drain_timeout_s: int = 45
    # where tritonserver's log goes, a file per start, kept after it stops; None: logs/ beside the
    # repository (a user's next to their model_repository, a test's in its temporary folder)
    log_dir: Path | None = None
    process: subprocess.Popen | None = field(default=None, init=False)
    _mps: MpsDaemon | None = field(default=None, init=False)
    log_path: Path | None = field(default=None, init=False)

    @property
    def grpc_url(self) -> str:
        return dial_address(self.host, self.grpc_port)

    def endpoints(self) -> str:
        """Where the server listens: ``gRPC 0.0.0.0:8001 (every interface; from this machine
        127.0.0.1:8001), HTTP 0.0.0.0:8000, metrics 0.0.0.0:8002``."""
        grpc = f"gRPC {host_port(self.host, self.grpc_port)}"
        if self.host in WILDCARDS:
            grpc += f" (every interface; from this machine {self.grpc_url})"
        return f"{grpc}, HTTP {host_port(self.host, self.http_port)}, metrics {host_port(self.host, self.metrics_port)}"

    def start(self, timeout: float = 300.0) -> "TritonServer":
        for name, port in (("gRPC", self.grpc_port), ("HTTP", self.http_port), ("metrics", self.metrics_port)):
            if not port_free(port, self.host):
                raise ServerError(f"{name} port {port} is already in use; pick another with --{name.lower()}-port "
                                  "or stop what holds it")
        if not Path(self.repository).is_dir():
            raise ServerError(f"model repository {self.repository} does not exist")
        cmd = self.command(find_tritonserver(self.binary))
        env = dict(os.environ)
        # CUDA numbers GPUs fastest first unless told otherwise, nvidia-smi by PCI bus: with this a GPU
        # id means the same GPU to Triton's instance groups, to --gpus and to nvidia-smi
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        # The python backend stub finds its environment through the first python3 on PATH.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        fd, self.log_path = self._open_log()
        if self.mps:
            try:
                self._mps = MpsDaemon().start()
            except BaseException:
                os.close(fd)
                raise
            env.update(self._mps.env())
        try:
            self.process = subprocess.Popen(cmd, stdout=fd, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except BaseException:
            self.stop()  # the MPS daemon
            raise
        finally:
            os.close(fd)
        self._wait_ready(timeout)
        return self

    def logs_folder(self) -> Path:
        """``log_dir``, or ``logs/`` beside the repository."""
        return Path(self.log_dir) if self.log_dir is not None else Path(self.repository).resolve().parent / "logs"

    def _open_log(self) -> tuple[int, Path]:
        """A new log file ``tritonserver-<date>-<time>-<random>.log`` in :meth:`logs_folder`: its
        descriptor (for the server's stdout and stderr) and its path."""
        folder = self.logs_folder()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=time.strftime("tritonserver-%Y%m%d-%H%M%S-"), suffix=".log",
                                        dir=folder)
        except OSError as e:
            raise ServerError(f"cannot write tritonserver's log in {folder}: {e.strerror or e}; "
                              "choose a writable folder with --log-dir") from None
        return fd, Path(name)

    def command(self, binary: TritonBinary) -> list[str]:
        """The tritonserver command line, a CUDA memory pool argument for every GPU in use."""
        cmd = [str(binary.path), f"--model-repository={Path(self.repository).resolve()}",
               f"--grpc-port={self.grpc_port}", f"--http-port={self.http_port}",
               f"--metrics-port={self.metrics_port}", f"--grpc-address={self.host}", f"--http-address={self.host}",
               "--exit-on-error=true", "--strict-readiness=true",
               f"--exit-timeout-secs={self.drain_timeout_s}", f"--log-verbose={self.log_verbose}",
               # explicit control, every model loaded: stop() can unload the ensembles to drain them
               "--model-control-mode=explicit", "--load-model=*"]
        if binary.backend_dir:
            cmd.append(f"--backend-directory={binary.backend_dir}")
        if self.cuda_pool_bytes:
            gpus = [d.index for d in cuda_devices()] if self.gpus is None else self.gpus
            cmd += [f"--cuda-memory-pool-byte-size={g}:{self.cuda_pool_bytes}" for g in gpus]
        return cmd

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def _load_errors(self) -> str:
        lines = [ln for ln in self.log_text().splitlines()
                 if "failed to load" in ln or "UNAVAILABLE" in ln or "Error" in ln or "error:" in ln]
        return "\n".join(lines[-15:]) or self.log_text()[-3000:]

    def _wait_ready(self, timeout: float) -> None:
        ready = wait_ready(self.grpc_url, lambda: _wait_exit(self.process.pid, 0), timeout)
        if ready:
            return
        self.stop(drain_first=False)  # the process group and the MPS daemon, if any
        if ready is False:
            raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting; "
                              f"model errors:\n{self._load_errors()}\n(full log: {self.log_path})")
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s:\n{self._load_errors()}\n"
                          f"(full log: {self.log_path})")

    def wait(self) -> int:
        """Block until tritonserver exits; its exit code (minus the signal that killed it).  The
        process is not reaped here, so :meth:`stop` can still clear its process group."""
        info = os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOWAIT)
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def stop(self, timeout: float | None = None, drain_first: bool = True) -> None:
        """Drain the server (:func:`fasterrcnn.drain.drain`: the requests in flight are answered;
        ``drain_first``), SIGTERM to tritonserver (it unloads its models and stops their stub
        processes), then SIGKILL to its whole process group, for what is left or for a server still
        running after ``timeout`` s (default: the drain timeout and 30 s to unload); then the MPS
        daemon.  Safe to call twice.

        The drain doesn't wait for :meth:`start` to have seen the server ready: clients (a load
        balancer's probe, a test) may see it ready first and send requests before a stop signal."""
        timeout = self.drain_timeout_s + 30.0 if timeout is None else timeout
        proc = self.process
        try:
            if proc is not None and proc.returncode is None:
                if drain_first and not _wait_exit(proc.pid, 0):
                    drained = drain(dial_address(self.host, self.http_port), self.drain_timeout_s)
                    if not drained:
                        log.warning("the drain did not end within %d s (requests still in flight, or the server "
                                    "did not answer); stopping anyway", self.drain_timeout_s)
                os.kill(proc.pid, signal.SIGTERM)
                _wait_exit(proc.pid, timeout)
                # not reaped yet, so the pid (the group's id, start_new_session) can't have been reused
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        finally:
            if self._mps is not None:
                self._mps.stop()
                self._mps = None

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
