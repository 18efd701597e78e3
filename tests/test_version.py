"""The package version (:mod:`pyvirtiofsd.version`): the one pyproject.toml declares, shown by the
package root, and importable without the command line."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pyvirtiofsd
from pyvirtiofsd.version import __version__

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_version_is_pyprojects() -> None:
    with PYPROJECT.open("rb") as f:
        declared = tomllib.load(f)["project"]["version"]
    assert __version__ == declared
    assert pyvirtiofsd.__version__ == __version__


def test_version_imports_no_command_line() -> None:
    """The command line shows the version; the version must not pull the command line in."""
    probe = "import sys, pyvirtiofsd.version; print(sorted(m for m in sys.modules if 'cli' in m))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "[]"
