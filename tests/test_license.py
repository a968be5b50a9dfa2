"""The licence: a BSD-3-Clause LICENSE file (torchvision's and Triton's licence) and the same
licence declared in pyproject.toml, in a form this venv's setuptools accepts."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_license_file_is_bsd_3_clause():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License\n\nCopyright (c) 2026, The fasterrcnn-triton authors\n")
    # the three clauses of the SPDX BSD-3-Clause text
    for clause in ("1. Redistributions of source code must retain the above copyright notice",
                   "2. Redistributions in binary form must reproduce the above copyright notice",
                   "3. Neither the name of the copyright holder nor the names of its"):
        assert clause in text, clause
    assert 'THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"' in text


def test_pyproject_declares_the_license_of_the_file():
    from setuptools.config.pyprojecttoml import read_configuration

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "BSD-3-Clause"
    assert project["license-files"] == ["LICENSE"]
    # setuptools validates the table (a license it does not take raises here)
    assert read_configuration(ROOT / "pyproject.toml")["project"]["license"] == "BSD-3-Clause"
