"""The image's serving Python holds what every python-backend model imports.

The serving environment is rebuilt here from the Dockerfile's own pins (tests/serving_env.py says
how: the same distributions and versions, for this machine's CPython and CPU, CUDA-only CuPy
absent), and a Python started with ``-I -S`` on it alone loads every python-backend model of a
repository exported for every deployment target (fasterrcnn.options.TARGETS) through the Triton
stand-in (tests/triton_fake.py), runs one encoded image through the ensembles whose every step is
a python-backend model (the python and torch targets; the others' rpn and header run on Triton's
own backends), and imports every module of ``python_backend``, where only a CUDA-only package may
be missing.  What a GPU host with Docker has to confirm is in docs/docker.md, "Base, CUDA and torch".
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import serving_env
import triton_fake as fake
from exporters.repository import read_config, write_repository
from python_backend import names

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def serving_site(tmp_path_factory):
    """(site folder, what went into it) for the Dockerfile's serving pins."""
    pins, project = serving_env.serving_pins()
    assert project, "the serving Python must install this project (`python3 -m pip install --no-deps .`)"
    site = tmp_path_factory.mktemp("serving") / "site-packages"
    packages = serving_env.copied_packages()
    assert "python_backend" in packages, packages
    return site, serving_env.build_site(site, pins, packages)


def _repository(target: str, small_export, small_traces, out: Path) -> Path:
    from fasterrcnn.options import Options

    settings, onnx_paths = small_export
    options = Options(target=target, device="cpu", max_batch_size=2).repository_options()
    plans = None
    if options.target == "tensorrt":  # configs and python steps only: no engine is loaded here
        plans = {}
        for name in (names.RPN, names.HEADER):
            plans[name] = out.parent / f"{target}-{name}.plan"
            plans[name].write_bytes(b"not a real engine")
    return write_repository(out, settings, onnx_paths, options, plans=plans,
                            torch_models=small_traces[1] if target == "torch" else None, link=True)


def _spec(repo: Path, target: str) -> dict:
    """The python-backend models of ``repo`` with their ``initialize`` args, and the ensemble's
    steps when every one of them is such a model."""
    models, backends = [], {}
    for config_file in sorted(repo.glob("*/config.pbtxt")):
        cfg = read_config(config_file)
        backends[cfg.name] = cfg.backend or cfg.platform
        if cfg.backend == "python":
            models.append({"name": cfg.name, "model_py": str(config_file.parent / "1" / "model.py"),
                           "args": fake.model_args(cfg, kind="CPU", repository=config_file.parent)})
    ensemble = read_config(repo / names.ENSEMBLE / "config.pbtxt")
    steps = [{"model": s.model_name, "input_map": dict(s.input_map), "output_map": dict(s.output_map)}
             for s in ensemble.ensemble_scheduling.step]
    all_python = all(backends[s["model"]] == "python" for s in steps)
    return {"target": target, "models": models, "steps": steps if all_python else []}


def test_serving_pins_are_read_from_the_dockerfile(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM base:1\n# RUN python3 -m pip install commented==1\n"
                          "RUN python3 -m pip install --no-cache-dir \\\n    numpy==2.4.6 'tritonclient[grpc]==2.73.0' \\\n"
                          "    && python3 -m pip install --no-deps . \\\n"
                          "    && /opt/export/bin/pip install onnx==1.23.2\n")
    pins, project = serving_env.serving_pins(dockerfile)
    assert [str(p) for p in pins] == ["numpy==2.4.6", "tritonclient[grpc]==2.73.0"] and project
    dockerfile.write_text("FROM base:1\nRUN python3 -m pip install numpy\n")
    with pytest.raises(serving_env.ServingEnvError, match="'numpy': every package there must be pinned"):
        serving_env.serving_pins(dockerfile)


def test_serving_python_loads_every_model_for_every_target(serving_site, small_export, small_traces, tmp_path):
    from fasterrcnn.options import TARGETS

    site, report = serving_site
    image = tmp_path / "image.png"
    pixels = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    image.write_bytes(buffer.getvalue())
    stub = tmp_path / "stub"  # only the stand-in, not the rest of tests/
    stub.mkdir()
    (stub / "triton_fake.py").symlink_to(TESTS / "triton_fake.py")
    spec = {"site": str(site), "stub": str(stub), "image": str(image), "cuda_only_modules": ["cupy"],
            "repositories": [_spec(_repository(t, small_export, small_traces, tmp_path / t), t) for t in TARGETS]}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))

    child = subprocess.run([sys.executable, "-I", "-S", str(TESTS / "serving_env_child.py"), str(spec_file)],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert child.returncode == 0, child.stderr[-4000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert not result["failures"], (
        "the image's serving Python (the Dockerfile's `python3 -m pip install` pins) can't serve:\n  "
        + "\n  ".join(result["failures"]) + f"\nits environment: {report}")
    assert sorted(r.split(":")[0] for r in result["ran"]) == ["python", "torch"], result["ran"]
    for ran in result["ran"]:
        assert names.NUM_DETECTIONS in ran, ran
    # what only a GPU instance imports, and nothing else, needs the CUDA-only packages
    assert all(m.startswith("python_backend.cuda") for m in result["cuda_only"]), result["cuda_only"]
