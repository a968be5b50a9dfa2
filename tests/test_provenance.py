"""A repository records what built it, and ``serve`` never serves one that is not what it was asked for.

The repositories here are written from the session's small export (``conftest.small_export``)
with the manifest an export writes; re-exports are recorded by a stand-in, so no test exports twice.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from exporters import provenance
from exporters.export import ModelOptions
from exporters.repository import read_config, write_repository
from fasterrcnn import repository as repository_check
from fasterrcnn import serve as serve_mod
from fasterrcnn.__main__ import given_options
from fasterrcnn.options import Options
from python_backend import names

SIZES = dict(min_size=256, max_size=320)


def _write(folder: Path, small_export, options: Options, record: bool = True) -> Path:
    """A repository as ``export_repository(options)`` writes it (manifest included), from the small export."""
    settings, paths = small_export
    model = options.model_options()
    write_repository(folder, settings, paths, options.repository_options(), link=True,
                     weights=model.weights_record(), options_record=options.record() if record else None)
    return folder


@pytest.fixture
def exported(small_export, tmp_path):
    """(options, repository) of ``fasterrcnn export --weights random --min-size 256 --max-size 320``."""
    options = Options(weights="random", repository=tmp_path / "repo", **SIZES)
    return options, _write(options.repository, small_export, options)


@pytest.fixture
def checkpoint(tmp_path):
    """A 5-class checkpoint file and its class names file."""
    path = tmp_path / "my5class.pt"
    torch.save({"w": torch.arange(5.0)}, path)  # the manifest records its bytes' digest, not its contents
    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join(["__background__", "a", "b", "c", "d"]) + "\n")
    return path, names_file


def test_the_manifest_records_weights_settings_options_and_package(exported):
    options, repo = exported
    record = json.loads((repo / provenance.MANIFEST).read_text())
    assert record["weights"]["source"] == "random" and record["weights"]["digest"] == "random-91-0"
    assert "seed 0" in record["weights"]["line"] and "meaningless" in record["weights"]["line"]
    assert record["settings"]["min_size"] == 256 and record["settings"]["max_size"] == 320
    assert len(record["settings"]["class_names"]) == 91 and record["settings"]["class_names"][1] == "person"
    assert record["options"]["max_batch_size"] == 8 and record["options"]["target"] == "python"
    assert record["repository"]["max_batch_size"] == 8
    assert record["package"]["version"] and len(record["package"]["source_sha256"]) == 64
    # every config carries the weights line, for clients and metadata readers
    for model in (names.ENSEMBLE, *names.STEPS):
        cfg = read_config(repo / model / "config.pbtxt")
        assert cfg.parameters[provenance.WEIGHTS_PARAMETER].string_value == record["weights"]["line"]


def test_a_checkpoint_is_recorded_by_its_contents(checkpoint):
    path, _ = checkpoint
    record = ModelOptions(weights=str(path)).weights_record()
    assert record["source"] == str(path.resolve())
    assert record["digest"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "random" not in record["line"] and record["digest"][:12] in record["line"]


def test_nothing_given_serves_the_repository_as_recorded(exported):
    options, repo = exported
    # a plain `fasterrcnn serve --repository R`: the defaults (min/max size None) are not asked for
    verdict = repository_check.check(Options(repository=repo), given=frozenset({"repository"}))
    assert verdict.reasons == ()
    assert verdict.options.min_size == 256 and verdict.options.weights == "random"


def test_another_checkpoint_and_class_list_are_exported_again(exported, checkpoint):
    """The stale-repository report: export --weights random, then serve a 5-class checkpoint."""
    _, repo = exported
    path, names_file = checkpoint
    argv = ["serve", "--weights", str(path), "--class-names", str(names_file), "--repository", str(repo)]
    given = given_options(argv)
    assert given == {"weights", "class_names", "repository"}
    asked = Options(weights=str(path), class_names=str(names_file), repository=repo)
    verdict = repository_check.check(asked, given)
    text = " ".join(verdict.reasons)
    assert "--weights" in text and "--class-names" in text
    # re-exported with the recorded sizes and the given weights
    assert verdict.options.weights == str(path) and verdict.options.min_size == 256


@pytest.mark.parametrize("change", ["checkpoint bytes", "class names", "package", "option"])
def test_a_changed_input_under_the_same_name_is_noticed(small_export, tmp_path, checkpoint, monkeypatch, change):
    path, names_file = checkpoint
    options = Options(weights=str(path), class_names=str(names_file), num_classes=5, repository=tmp_path / "r",
                      **SIZES)
    settings, paths = small_export
    # the repository of the 5-class checkpoint (the networks' class count does not matter to the check)
    five = type(settings)(**{**settings.__dict__, "num_classes": 5,
                             "class_names": ("__background__", "a", "b", "c", "d")})
    write_repository(options.repository, five, paths, options.repository_options(), link=True,
                     weights=options.model_options().weights_record(), options_record=options.record())
    given = frozenset({"repository"})
    assert repository_check.check(options, given).reasons == ()
    if change == "checkpoint bytes":
        torch.save({"w": torch.arange(6.0)}, path)
    elif change == "class names":
        names_file.write_text("\n".join(["__background__", "a", "b", "c", "e"]) + "\n")
    elif change == "package":
        monkeypatch.setattr(provenance, "package_record", lambda: {"version": "9.9", "source_sha256": "0" * 64})
    else:
        options = Options(**{**options.__dict__, "max_batch_size": 4})
        given = given | {"max_batch_size"}
    reasons = repository_check.check(options, given).reasons
    expected = {"checkpoint bytes": "checkpoint", "class names": "class names", "package": "9.9",
                "option": "--max-batch-size"}[change]
    assert len(reasons) == 1 and expected in reasons[0], reasons


def test_a_repository_without_a_manifest_is_refused(exported):
    options, repo = exported
    (repo / provenance.MANIFEST).unlink()
    with pytest.raises(repository_check.StaleRepository, match="--rebuild"):
        repository_check.check(Options(repository=repo), frozenset())


def test_an_api_repository_is_served_unless_options_are_given(small_export, tmp_path):
    options = Options(repository=tmp_path / "api", **SIZES)
    _write(options.repository, small_export, options, record=False)
    assert repository_check.check(Options(repository=options.repository), frozenset()).reasons == ()
    verdict = repository_check.check(Options(repository=options.repository, max_batch_size=2),
                                     frozenset({"max_batch_size"}))
    assert verdict.reasons and "--max-batch-size" in verdict.reasons[0]


def test_serve_exports_again_with_the_asked_weights(exported, checkpoint, monkeypatch):
    """ensure_repository hands the re-export the checkpoint, class names and the recorded sizes."""
    _, repo = exported
    path, names_file = checkpoint
    exports = []
    monkeypatch.setattr(repository_check, "export_repository", exports.append)
    asked = Options(weights=str(path), class_names=str(names_file), repository=repo)
    served = serve_mod.ensure_repository(asked, given=frozenset({"weights", "class_names", "repository"}))
    assert len(exports) == 1
    assert exports[0].weights == str(path) and exports[0].class_names == str(names_file)
    assert exports[0].min_size == 256 and served == exports[0]
    # and the same repository, asked for nothing new, is not exported again
    exports.clear()
    serve_mod.ensure_repository(Options(repository=repo), given=frozenset({"repository"}))
    assert exports == []


def test_random_weights_are_said(exported, checkpoint, small_export, tmp_path):
    _, repo = exported
    warning = repository_check.weights_warning(repo)
    assert warning and "random (seed 0, 91 classes)" in warning and "meaningless" in warning
    path, _ = checkpoint
    other = _write(tmp_path / "ckpt_repo", small_export, Options(weights=str(path), **SIZES))
    assert repository_check.weights_warning(other) is None


def test_an_unreadable_manifest_names_the_file(exported):
    _, repo = exported
    (repo / provenance.MANIFEST).write_text("{not json")
    with pytest.raises(provenance.ProvenanceError, match="provenance.json"):
        provenance.read(repo)


def test_the_options_record_round_trips():
    options = Options(canvases=((256, 256), (256, 320)), gpus=(0, 1), target="torch", precision="fp16",
                      device="gpu", **SIZES)
    record = json.loads(json.dumps(options.record()))
    again = Options.from_record(record)
    assert again.record() == options.record()
    assert again.canvases == ((256, 256), (256, 320)) and again.gpus == (0, 1)
    # a given target that the recorded precision doesn't fit: the given options over the defaults
    assert Options.from_record(record, target="python").precision == "fp32"
