"""Session fixtures: one small exported model shared by the alignment, config and Triton tests.

``make test`` runs the tests in two processes (pytest-xdist, a file per process at a time); the
export and the traces are made once, by whichever process asks first, and read by the other.
"""
from __future__ import annotations

import os
import pickle

import pytest
from filelock import FileLock


def pytest_configure(config):
    """Under pytest-xdist each test process gets its share of the cores for torch's and ONNX
    Runtime's threads (``OMP_NUM_THREADS``, which python_backend/onnx_session.py reads too), and so
    do the servers and commands it starts: by default every process starts a thread per core, and
    the processes together ask for several times the cores there are, spinning threads included.
    Set here, in the process that starts the workers, so that each of them has it before it imports
    torch, and one count holds for a test and the servers it compares with (torch's resize rounds
    differently with another number of threads)."""
    workers = getattr(config.option, "numprocesses", None)
    if workers and "PYTEST_XDIST_WORKER" not in os.environ:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))


# Small sizes keep CI fast.  min/max sizes are torchvision transform settings; the model and the
# exported artifacts read them from the same model object.  Its canvases are the default ones
# ("auto") of this resize: 256x256, 256x320 (landscape) and 320x256 (portrait), the same logic
# that gives 800x800, 800x1088, 1088x800, 800x1344 and 1344x800 at torchvision's 800/1333.
SMALL = dict(num_classes=91, seed=0, min_size=256, max_size=320)
SMALL_CANVASES = ((256, 256), (256, 320), (320, 256))


@pytest.fixture(scope="session")
def small_model():
    from exporters.loading import random_model

    return random_model(**SMALL)


def shared(name: str, tmp_path_factory, make):
    """``make(folder)``'s value, made once per run: by this process alone, or, under pytest-xdist,
    by the first worker to ask (the others wait on a lock, then read its pickled value)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return make(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent  # the run's folder, above every worker's own
    done = root / f"{name}.pickle"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            folder = root / name
            folder.mkdir()
            done.write_bytes(pickle.dumps(make(folder)))
    return pickle.loads(done.read_bytes())


@pytest.fixture(scope="session")
def small_export(small_model, tmp_path_factory):
    """(settings, {"rpn": path, "header": path}) with the default canvases of the small resize."""
    from exporters.loading import read_class_names, settings_from_model
    from exporters.onnx_export import export_all

    def make(folder):
        settings = settings_from_model(small_model, "auto", read_class_names(None, 91))
        assert settings.canvases == SMALL_CANVASES
        return settings, export_all(small_model, settings, folder)

    return shared("onnx", tmp_path_factory, make)


@pytest.fixture(scope="session")
def small_traces(small_model, small_export, tmp_path_factory):
    """(settings, {"header": path, "rpn_<h>x<w>": path, "rpn_<h>x<w>_unmasked": path for each
    canvas}) traced on the CPU in fp32, the rpn at each of the default canvases of the small resize,
    with and without extent masks (export_torch's default)."""
    from exporters import torch_export

    settings, _ = small_export
    return shared("torch", tmp_path_factory,
                  lambda folder: (settings, torch_export.export_torch(small_model, settings, folder, device="cpu")))


# The files with the most work (minutes on a 2-core machine), run first: with a file per process
# (pytest-xdist --dist loadfile) a long file started last would run alone at the end
LONGEST_FIRST = ("test_builders", "test_torch_target", "test_docker", "test_triton", "test_client",
                 "test_step_isolation", "test_evaluate", "test_alignment", "test_cli", "test_drain",
                 "test_docker_drain", "test_serve_lifecycle")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))
