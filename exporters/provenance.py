"""What built a model repository: ``provenance.json`` at its root, written by every export.

The manifest records the weights (``random`` with its seed, torchvision's COCO weights, or a
checkpoint's path and SHA-256), the settings read from the model (class names included), every option that shapes the artifacts and the
package that wrote them (version and a digest of its source files, whose ``model.py`` adapters are
copied into the repository).  ``fasterrcnn serve`` reads it back and exports again when what it
is asked to serve differs (``fasterrcnn/serve.py``); ``detect`` reads the weights line that every
``config.pbtxt`` carries as the parameter ``weights``.

Layout (``FORMAT`` 1)::

    {"format": 1,
     "package": {"version": "0.1.0", "source_sha256": "..."},
     "weights": {"source": "random" | "coco" | "<checkpoint path>", "digest": "...",
                 "line": "random (seed 0, 91 classes): boxes and labels are meaningless"} | null,
     "settings": {DetectorSettings fields: class names, sizes, canvases, thresholds, ...},
     "repository": {RepositoryOptions fields},
     "options": {the command's model and repository options} | null}

``weights`` is null and ``options`` null where a repository was written by the Python API
without them (:func:`exporters.repository.write_repository` alone).
"""
from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from .tensorrt.cache import package_version, source_digest

MANIFEST = "provenance.json"
WEIGHTS_PARAMETER = "weights"  # every config.pbtxt: parameters { key: "weights" ... }
FORMAT = 1


class ProvenanceError(ValueError):
    """A manifest that cannot be read; the message names the file and what is wrong."""


def package_record() -> dict[str, str]:
    return {"version": package_version(), "source_sha256": _source_digest()}


@lru_cache(maxsize=1)
def _source_digest() -> str:
    return source_digest()


def weights_line(source: str, digest: str, seed: int | None = None, num_classes: int | None = None) -> str:
    """One line a person reads: which weights, and whether the detections mean anything."""
    if source == "random":
        return f"random (seed {seed}, {num_classes} classes): boxes and labels are meaningless"
    if source == "coco":
        return f"torchvision COCO ({digest})"
    return f"checkpoint {source} (sha256 {digest[:12]})"


def weights_record(source: str, digest: str, seed: int | None = None, num_classes: int | None = None) -> dict:
    return {"source": source, "digest": digest, "line": weights_line(source, digest, seed, num_classes)}


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def manifest(settings, repository_options, weights: dict | None = None, options: dict | None = None) -> dict:
    """The manifest of a repository written from ``settings`` (DetectorSettings) and
    ``repository_options`` (RepositoryOptions); ``weights``: :func:`weights_record`; ``options``:
    the command's options (``fasterrcnn.options.Options.record``)."""
    return {
        "format": FORMAT,
        "package": package_record(),
        "weights": weights,
        "settings": _jsonable(settings),
        "repository": _jsonable(repository_options),
        "options": _jsonable(options) if options is not None else None,
    }


def write(out: str | Path, record: dict) -> Path:
    path = Path(out) / MANIFEST
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def read(repository: str | Path) -> dict | None:
    """The manifest of ``repository``; None where it has none."""
    path = Path(repository) / MANIFEST
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ProvenanceError(f"{path} cannot be read ({e}): export the repository again (--rebuild)") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ProvenanceError(f"{path} is not a format-{FORMAT} manifest: export the repository again (--rebuild)")
    return record


def random_weights(record: dict | None) -> bool:
    return bool(record and record.get("weights") and record["weights"].get("source") == "random")
