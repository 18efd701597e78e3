"""Build hook: with PYVIRTIOFSD_MYPYC=1 in the environment, compile the request hot path with
mypyc and build the C modules of accel.NATIVE (see src/pyvirtiofsd/accel.py); without it, the
package is pure Python and needs no compiler. Everything else about the package is in
pyproject.toml.

    PYVIRTIOFSD_MYPYC=1 pip install .        # needs a C compiler and Python's headers

pip brings mypy into the isolated build environment itself (setup_requires below); a build
without isolation needs mypy installed (the ``accel`` extra).
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path

from setuptools import Extension, setup

MYPY = "mypy>=2.4,<3"
HERE = Path(__file__).resolve().parent


def accel_names(which: str) -> tuple[str, ...]:
    return runpy.run_path(str(HERE / "src" / "pyvirtiofsd" / "accel.py"))[which]


def native_extensions() -> list[Extension]:
    """The hand-written C modules, each one source file beside the module it serves."""
    return [
        Extension(
            name,
            [os.path.join("src", *name.split(".")) + ".c"],
            depends=[os.path.join("src", "pyvirtiofsd", "_cio.h")],  # what some include
            extra_compile_args=["-O2"],
        )
        for name in accel_names("NATIVE")
    ]


def compiled_extensions() -> list:
    try:
        from mypyc.build import mypycify
    except ImportError:
        # The first pass of a PEP 517 build, before setup_requires are installed.
        return []
    modules = accel_names("COMPILED")
    paths = [os.path.join("src", *name.split(".")) + ".py" for name in modules]
    # mypy checks the modules it compiles; what they import is read for its types only (the
    # object-storage backend's module may even be missing at build time: it is not compiled).
    return mypycify([*paths, "--follow-imports=silent", "--ignore-missing-imports"], opt_level="3")


if os.environ.get("PYVIRTIOFSD_MYPYC", "") not in ("", "0"):
    setup(setup_requires=[MYPY], ext_modules=compiled_extensions() + native_extensions())
else:
    setup()
