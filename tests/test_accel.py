"""The optional compiled build (:mod:`pyvirtiofsd.accel`): the daemon says which build runs, CI
runs the build it means to, and the compiled modules keep the rules mypyc needs.

CI runs the suite twice (``.ci/test``): on the pure build with ``PYVIRTIOFSD_TEST_BUILD=pure``
and on the compiled one with ``PYVIRTIOFSD_TEST_BUILD=mypyc``, so that a build that silently
fell back to pure Python fails instead of passing as compiled.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyvirtiofsd import accel
from pyvirtiofsd.version import __version__


def test_version_says_which_build_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pyvirtiofsd", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert out == f"pyvirtiofsd {__version__} ({accel.build()})\n"


def test_the_build_ci_asked_for_runs() -> None:
    wanted = os.environ.get("PYVIRTIOFSD_TEST_BUILD")
    if wanted is None:
        pytest.skip("PYVIRTIOFSD_TEST_BUILD not set (CI sets it to pure or mypyc)")
    assert wanted in ("pure", "mypyc")
    assert accel.compiled() == ([] if wanted == "pure" else [*accel.COMPILED, *accel.NATIVE])
    assert accel.build() == ("pure Python" if wanted == "pure" else "compiled with mypyc")


def test_each_c_module_lies_beside_the_python_module_that_uses_it() -> None:
    """A C module is an accelerator of one Python module, which does without it: its source is
    ``name.c`` in that module's package, and that module imports it (so a pure build runs)."""
    root = Path(__file__).resolve().parents[1] / "src"
    for name in accel.NATIVE:
        package, _, leaf = name.rpartition(".")
        source = root.joinpath(*name.split(".")).with_suffix(".c")
        assert source.is_file(), source
        users = [
            p
            for p in root.joinpath(*package.split(".")).glob("*.py")
            if f"from {package}.{leaf} import" in p.read_text()
        ]
        assert len(users) == 1, (name, users)
        assert "except ImportError" in users[0].read_text(), users[0]


def _sources() -> list[tuple[str, ast.Module]]:
    out = []
    for name in accel.COMPILED:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        # The source next to the module (its extension module, on a compiled build).
        path = Path(spec.origin)
        source = path.with_name(path.name.split(".")[0] + ".py")
        out.append((name, ast.parse(source.read_text())))
    return out


def test_compiled_modules_bind_each_except_name_to_one_type() -> None:
    """mypyc gives an ``except ... as NAME`` variable the first clause's type for the whole
    function: a second clause binding another type to the same name fails at run time."""
    wrong = []
    for name, tree in _sources():
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            bound: dict[str, set[str]] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.ExceptHandler) and node.name and node.type:
                    bound.setdefault(node.name, set()).add(ast.unparse(node.type))
            wrong += [f"{name}.{fn.name}: {v} <- {t}" for v, t in bound.items() if len(t) > 1]
    assert wrong == []


def test_compiled_classes_keep_constants_final() -> None:
    """A plain assignment in a compiled class's body becomes an instance attribute's default,
    gone from the class: constants are Final."""
    wrong = []
    for name, tree in _sources():
        for cls in ast.walk(tree):
            if not isinstance(cls, ast.ClassDef):
                continue
            if any("Enum" in ast.unparse(b) or "Flag" in ast.unparse(b) for b in cls.bases):
                continue  # enums stay Python classes
            for stmt in cls.body:
                if isinstance(stmt, ast.Assign) and ast.unparse(stmt.targets[0]) != "__slots__":
                    wrong.append(f"{name}.{cls.name}: {ast.unparse(stmt)}")
    assert wrong == []
