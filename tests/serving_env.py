"""The Docker image's serving Python, rebuilt on this machine from the Dockerfile's own pins.

Triton's python-backend stub embeds the image's ``python3`` and imports each ``model.py`` with
what the Dockerfile installed into it: the ``pip install`` commands run by ``python3`` itself
(``python3 -m pip``, ``pip3``), not those of the exporter's venv.  :func:`serving_pins` reads them;
:func:`build_site` makes one folder that holds exactly those distributions and their dependency
closure (``importlib.metadata`` requirements, markers evaluated for this Python), so a Python
started with ``-I -S`` and that folder alone imports what the image's would:

* a pinned distribution is linked from this venv where its version is the pin, and otherwise
  installed from PyPI at the pin (``pip install --target --no-deps``);
* torch and torchvision are large and come from this venv only: their version must be the pin
  (the image then serves with the torch the tests run), or :class:`ServingEnvError` says so;
* CUDA-only distributions (``cupy-cuda*``) have no CPU wheel and stay absent: only GPU instances
  import them, and the loader run in that Python reports every module that needs one;
* an unpinned dependency is linked from this venv, or installed from PyPI where the venv lacks it;
* ``pip install .`` installs this project: the packages the Dockerfile COPYs are linked from
  the checkout.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path, PurePosixPath

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
# wheels too large to fetch in CI: this venv's copy stands in, at the pinned version only
FROM_VENV_ONLY = {"torch", "torchvision"}
CUDA_ONLY = re.compile(r"cupy-cuda\d+x?")
_INTERPRETERS = ("python3", "/usr/bin/python3")
_OPTIONS_WITH_VALUE = {"--index-url", "-i", "--extra-index-url", "-r", "--requirement", "-c", "--constraint",
                       "-f", "--find-links", "--target", "-t", "--prefix"}


class ServingEnvError(AssertionError):
    """The Dockerfile's serving pins can't be turned into an environment here; the message says why."""


def _run_arguments(dockerfile: Path) -> list[str]:
    """The shell text of each RUN, continuation lines joined and comment lines dropped."""
    runs, current = [], None
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            continue
        if current is None:
            word, _, rest = stripped.partition(" ")
            if word.upper() != "RUN":
                continue
            current, stripped = "", rest
        if stripped.endswith("\\"):
            current += " " + stripped[:-1]
        else:
            runs.append((current + " " + stripped).strip())
            current = None
    return runs


def _serving_install(words: list[str]) -> list[str] | None:
    """The arguments after ``install`` when ``words`` is a pip install run by the image's python3."""
    if words[:3] in ([i, "-m", "pip"] for i in _INTERPRETERS):
        rest = words[3:]
    elif words[:1] in (["pip3"], ["pip"]):
        rest = words[1:]
    else:
        return None
    return rest[1:] if rest[:1] == ["install"] else None


def serving_pins(dockerfile: Path = DOCKERFILE) -> tuple[list[Requirement], bool]:
    """(the pinned requirements the image's python3 installs, whether it installs this project)."""
    pins, project = [], False
    for run in _run_arguments(dockerfile):
        commands = [[]]
        for word in shlex.split(run):
            commands.append([]) if word in ("&&", ";", "||") else commands[-1].append(word)
        for words in commands:
            args = _serving_install(words) if words else None
            skip = False
            for a in args or ():
                if skip or a in _OPTIONS_WITH_VALUE:
                    skip = not skip
                    continue
                if a == ".":
                    project = True
                elif not a.startswith("-"):
                    req = Requirement(a)
                    pinned = [s for s in req.specifier if s.operator == "=="]
                    if len(pinned) != 1:
                        raise ServingEnvError(f"the serving install has {a!r}: every package there must be pinned (==)")
                    pins.append(req)
    if not pins:
        raise ServingEnvError(f"{dockerfile} has no `python3 -m pip install` of pinned packages")
    return pins, project


def copied_packages(dockerfile: Path = DOCKERFILE) -> list[str]:
    """The project's packages the image holds: COPY sources that are Python packages here."""
    packages = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if len(words) >= 3 and words[0].upper() == "COPY":
            packages += [a.rstrip("/") for a in words[1:-1]
                         if not a.startswith("--") and (ROOT / a / "__init__.py").is_file()]
    return packages


def _pin(req: Requirement) -> Version:
    return Version(next(iter(req.specifier)).version)


def _public(version: str) -> Version:
    """The version without its local label (2.14.1+cu130 -> 2.14.1)."""
    return Version(Version(version).public)


def _venv_dist(name: str) -> md.Distribution | None:
    try:
        return md.distribution(name)
    except md.PackageNotFoundError:
        return None


def _site_dists(site: Path) -> dict[str, md.Distribution]:
    return {canonicalize_name(d.metadata["Name"]): d for d in md.distributions(path=[str(site)])}


def _pip_install(site: Path, specs: list[str]) -> None:
    if not specs:
        return
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--target", str(site), *specs]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise ServingEnvError(f"pip could not install {specs} here: {result.stderr[-2000:]}")


def _link_dist(dist: md.Distribution, site: Path) -> None:
    """Symlink the site-packages entries of ``dist`` (a venv distribution) into ``site``: its
    top-level modules, packages and .dist-info, and inside a namespace folder that several
    distributions fill (nvidia/, cuda/: no ``__init__.py``) only its own subfolders."""
    for f in dist.files or ():
        parts = PurePosixPath(f).parts
        if not parts or parts[0] in ("..", "__pycache__"):
            continue  # console scripts live outside site-packages
        top = Path(dist.locate_file(parts[0]))
        namespace = len(parts) > 1 and top.is_dir() and not (top / "__init__.py").exists()
        depth = 2 if namespace else 1
        rel = Path(*parts[:depth])
        dest = site / rel
        if dest.is_symlink() or dest.exists():
            continue
        source = Path(dist.locate_file(rel))
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source, dest)


def build_site(site: Path, pins: list[Requirement], packages: list[str]) -> dict[str, list[str]]:
    """Fill ``site`` with the serving environment and this project's ``packages``; returns
    {"linked", "installed", "absent"} distribution names."""
    site.mkdir(parents=True, exist_ok=True)
    report = {"linked": [], "installed": [], "absent": []}
    wanted: dict[str, set[str]] = {}  # canonical name -> extras
    to_install = []
    for req in pins:
        name = canonicalize_name(req.name)
        wanted[name] = set(req.extras)
        venv = _venv_dist(req.name)
        if CUDA_ONLY.fullmatch(name):
            report["absent"].append(f"{req.name}=={_pin(req)} (CUDA only)")
        elif venv is not None and _public(venv.version) == _pin(req):
            continue  # linked with the closure below
        elif name in FROM_VENV_ONLY:
            found = venv.version if venv else "not installed"
            raise ServingEnvError(f"the image pins {req.name}=={_pin(req)} but this venv has {found}: the serving "
                                  f"torch must be the one the tests run (or install it here first)")
        else:
            to_install.append(f"{req.name}=={_pin(req)}")
    _pip_install(site, to_install)
    report["installed"] += to_install

    done = set()
    queue = [n for n in wanted if not CUDA_ONLY.fullmatch(n)]
    for _ in range(10):  # a dependency found missing is installed, then its own are walked
        missing = []
        while queue:
            name = queue.pop()
            if name in done:
                continue
            dist = _site_dists(site).get(name) or _venv_dist(name)
            if dist is None:
                missing.append(name)
                continue
            done.add(name)
            if name not in _site_dists(site):
                _link_dist(dist, site)
                report["linked"].append(f"{name}=={dist.version}")
            for text in dist.requires or ():
                dep = Requirement(text)
                extras = wanted.get(name, set()) or {""}
                if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                    dep_name = canonicalize_name(dep.name)
                    wanted.setdefault(dep_name, set()).update(dep.extras)
                    if CUDA_ONLY.fullmatch(dep_name):
                        report["absent"].append(f"{dep.name} (CUDA only)")
                    else:
                        queue.append(dep_name)
        if not missing:
            break
        _pip_install(site, sorted(missing))
        report["installed"] += sorted(missing)
        queue = missing
    for package in packages:
        os.symlink(ROOT / package, site / package)
    return report
