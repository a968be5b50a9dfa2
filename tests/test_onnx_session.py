"""ONNX Runtime's thread count: a config's ``intra_op_thread_count``, else ``OMP_NUM_THREADS``, else
one per core (python_backend/onnx_session.py), in the served ONNX runner and the in-process pipeline."""
from __future__ import annotations

import re

import pytest

import triton_fake as fake
from evaluation.onnx_pipeline import OnnxPipeline
from exporters.repository import RepositoryOptions, read_config, write_repository
from python_backend import names
from python_backend.onnx_session import THREADS_PARAMETER, cpu_threads, open_session


def test_the_parameter_wins_over_the_variable(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads() == 3 and cpu_threads("") == 3
    assert cpu_threads("2") == 2 and cpu_threads(5) == 5
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads() == 0  # ONNX Runtime's default: one per core


@pytest.mark.parametrize("bad, error", [("two", "whole number of threads, got 'two'"), ("-1", "0 (one per core) or more")])
def test_a_bad_count_names_the_parameter(bad, error):
    with pytest.raises(ValueError, match=f"{THREADS_PARAMETER} must be .*{re.escape(error)}"):
        cpu_threads(bad)


def test_sessions_take_the_count(small_export, monkeypatch):
    settings, paths = small_export
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert open_session(paths[names.HEADER]).get_session_options().intra_op_num_threads == 1
    assert open_session(paths[names.HEADER], 2).get_session_options().intra_op_num_threads == 2
    pipeline = OnnxPipeline(paths[names.RPN], paths[names.HEADER], settings, threads=2)
    assert {s.get_session_options().intra_op_num_threads for s in (pipeline.rpn, pipeline.header)} == {2}


@pytest.mark.parametrize("parameter, want", [(None, 1), ("2", 2)])
def test_the_served_runner_reads_the_config(small_export, tmp_path, monkeypatch, parameter, want):
    settings, paths = small_export
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    repo = write_repository(tmp_path / "repo", settings, paths, RepositoryOptions(max_batch_size=2), link=True)
    cfg = read_config(repo / names.HEADER / "config.pbtxt")
    if parameter is not None:
        cfg.parameters[THREADS_PARAMETER].string_value = parameter
    instance = fake.load_model(repo / names.HEADER / "1" / "model.py", monkeypatch)()
    instance.initialize(fake.model_args(cfg, kind="CPU", repository=repo / names.HEADER))
    assert instance.session.get_session_options().intra_op_num_threads == want
