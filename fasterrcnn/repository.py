"""The repository a command serves: exported with its provenance, and checked against what was asked.

``fasterrcnn export`` and ``serve`` write ``provenance.json`` into the repository
(:mod:`exporters.provenance`: the weights, the settings, the command's options, the package).
Before serving an existing repository, ``serve`` compares it with what it was asked for:

* the options given on this command line (only those: an option left at its default takes the
  repository's recorded value, so ``fasterrcnn serve`` serves whatever ``export`` wrote);
* the checkpoint's and the class-names file's contents, even under the same paths;
* the package that wrote it (a new version or changed source: its copied ``model.py`` files and
  artifacts may not fit the code that now runs them).

Any difference exports the repository again, with the recorded options and the given ones over
them, and the differences are logged.  A repository without a manifest, or one written by the
Python API without the command's options, can't be re-exported faithfully: serving it is refused
with the reason, unless ``--rebuild`` says to export it anew.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields

from exporters import provenance
from exporters.model_options import ModelOptions

from .options import RECORDED_GROUPS, Options

log = logging.getLogger(__name__)


class StaleRepository(RuntimeError):
    """The repository can't be shown to be what was asked for; the message says what to do."""


@dataclass(frozen=True)
class Verdict:
    options: Options  # what to serve, and to export with when ``reasons`` is not empty
    reasons: tuple[str, ...]  # why the repository must be exported again; empty: serve it as it is


RECORDED = frozenset(f.name for f in fields(Options) if f.metadata["group"] in RECORDED_GROUPS) - {"repository"}


def export_repository(options: Options):
    """Export ``options``' detector into ``options.repository``, its options recorded in the manifest."""
    from exporters.export import export  # torch: only when there is something to export

    return export(options.model_options(), options.repository_options(), options.repository,
                  options_record=options.record())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _package_reason(recorded: dict) -> str | None:
    now, then = provenance.package_record(), recorded.get("package") or {}
    if now == then:
        return None
    return (f"it was written by fasterrcnn-triton {then.get('version')} (source {str(then.get('source_sha256'))[:12]}), "
            f"this is {now['version']} (source {now['source_sha256'][:12]})")


def _content_reasons(options: Options, recorded: dict) -> list[str]:
    """The checkpoint's and the class-names file's contents against what the repository was built from."""
    reasons = []
    weights = recorded.get("weights") or {}
    if options.weights not in ("coco", "random"):
        try:
            digest = ModelOptions(weights=options.weights).digest()
        except OSError:
            digest = None  # export says why the checkpoint can't be read
        if digest != weights.get("digest"):
            reasons.append(f"the checkpoint {options.weights} is not the one it was built from "
                           f"(sha256 {str(weights.get('digest'))[:12]})")
    if options.class_names:
        built = tuple((recorded.get("settings") or {}).get("class_names") or ())
        from exporters.loading import read_class_names

        try:
            names = read_class_names(options.class_names, len(built))
        except (OSError, ValueError):
            names = None
        if names != built:
            reasons.append(f"the class names in {options.class_names} are not the {len(built)} it was built with")
    return reasons


def check(options: Options, given: frozenset[str] = frozenset()) -> Verdict:
    """Whether ``options.repository`` (complete, with every model folder) is what ``options`` asks
    for.  ``given``: the Options fields set on the command line; the others take the recorded values.
    Raises :class:`StaleRepository` where that can't be told and the repository can't be re-exported
    as it was."""
    repo = options.repository
    recorded = provenance.read(repo)
    asked = sorted(RECORDED & set(given))
    if recorded is None:
        raise StaleRepository(
            f"{repo} has no {provenance.MANIFEST} (written by an older version or by hand), so what it serves can't "
            f"be checked: pass --rebuild to export it again with the weights and options you want")
    package = _package_reason(recorded)
    if recorded.get("options") is None:  # written by the Python API: no options to export it again with
        if asked:
            return Verdict(options, (f"it records no command options, and {', '.join(map(_flag, asked))} "
                                     "were given",))
        if package:
            raise StaleRepository(f"{repo} is stale ({package}) and records no command options to export it again "
                                  "with: pass --rebuild with the weights and options you want")
        return Verdict(options, ())
    kept = {f.name: getattr(options, f.name) for f in fields(Options) if f.name not in RECORDED or f.name in asked}
    effective = Options.from_record(recorded["options"], **kept)
    now = effective.record()
    reasons = [f"{_flag(k)}: it has {recorded['options'].get(k)!r}, asked {now[k]!r}"
               for k in sorted(now) if now[k] != recorded["options"].get(k)]
    reasons += _content_reasons(effective, recorded)
    if package:
        reasons.append(package)
    return Verdict(effective, tuple(reasons))


def weights_warning(repository) -> str | None:
    """A warning to print where the repository's weights are random, else None."""
    record = provenance.read(repository)
    if not provenance.random_weights(record):
        return None
    return (f"the served weights are {record['weights']['line']}; export --weights coco or a checkpoint "
            "for real detections")
