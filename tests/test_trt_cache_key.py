"""The engine cache key changes with the code that writes the repository (exporters/tensorrt/cache.py):
a new image with the same settings must not reuse the ONNX, plans, configs and ``model.py`` copies
of an older one."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

from exporters.repository import RepositoryOptions
from exporters.tensorrt import cache
from exporters.tensorrt.gpus import GpuInfo
from python_backend.settings import DetectorSettings

H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", "9.0")


def _key() -> str:
    settings = DetectorSettings(num_classes=5, min_size=256, max_size=320)
    return cache.engine_cache_key(settings, RepositoryOptions(target="tensorrt"), "fp16", [H100], "10.5.0.18", "abc")


def _fake_tree(root: Path) -> Path:
    for package in cache.SOURCE_PACKAGES:
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text(f'"""{package}"""\n')
    (root / "python_backend" / "triton_models").mkdir()
    (root / "python_backend" / "triton_models" / "roi.py").write_text("def execute(): pass\n")
    return root


def test_the_key_changes_with_the_package_version(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.0")
    old = _key()
    assert old == _key()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.2.0")
    assert _key() != old


def test_the_key_changes_with_a_source_file(monkeypatch, tmp_path):
    """A rebuilt development image keeps its version number; an edited model.py still changes the key."""
    root = _fake_tree(tmp_path)
    monkeypatch.setattr(cache, "_SOURCE_ROOT", root)
    old = _key()
    assert old == _key()
    (root / "python_backend" / "triton_models" / "roi.py").write_text("def execute(): return 1\n")
    assert _key() != old
    edited = _key()
    (root / "fasterrcnn" / "prepare.py").write_text("x = 1\n")  # a new file counts too
    assert _key() != edited


def test_source_digest_covers_the_packages_and_cuda_sources_only(tmp_path):
    root = _fake_tree(tmp_path)
    digest = cache.source_digest(root)
    assert digest == cache.source_digest(root)
    (root / "README.md").write_text("docs\n")  # outside the packages
    (root / "exporters" / "__pycache__").mkdir()
    (root / "exporters" / "__pycache__" / "x.py").write_text("stale\n")
    assert cache.source_digest(root) == digest
    (root / "python_backend" / "kernel.cu").write_text("__global__ void k() {}\n")
    assert cache.source_digest(root) != digest


def test_the_installed_package_is_found():
    assert cache.package_version() not in ("", "unknown")  # pyproject.toml's version, installed with -e
    assert len(cache.source_digest()) == 64
