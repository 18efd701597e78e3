"""Tests mirror modules: ``src/pyvirtiofsd/<dir>/<module>.py`` is tested by
``tests/<dir>/test_<module>.py``, and a test module in a mirror folder tests a module of that
name. Suites about the whole product live in the folders named for what they are (``e2e/``,
``attack/``); whole-package checks sit at the top. tests/README.md says where a test goes.
"""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "src" / "pyvirtiofsd"

#: Folders of suites that are not about one module.
SUITES = {"e2e", "attack"}
#: Checks of the whole package, at the top of tests/.
WHOLE_PACKAGE = {"test_layers.py", "test_layout.py"}


def source_modules() -> set[Path]:
    """Every module of the package, relative to it (packages' __init__ and __main__ aside)."""
    return {
        p.relative_to(PACKAGE)
        for p in PACKAGE.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }


def mirrored(module: Path) -> Path:
    return module.with_name(f"test_{module.name}")


def test_every_source_module_has_its_test_module() -> None:
    missing = sorted(
        str(mirrored(m)) for m in source_modules() if not (TESTS / mirrored(m)).is_file()
    )
    assert missing == [], f"source modules without a test module in tests/: {missing}"


def test_every_test_module_outside_the_suites_mirrors_a_source_module() -> None:
    expected = {mirrored(m) for m in source_modules()}
    strays = sorted(
        str(t)
        for t in (p.relative_to(TESTS) for p in TESTS.rglob("test_*.py"))
        if t.parts[0] not in SUITES and t not in expected and str(t) not in WHOLE_PACKAGE
    )
    assert strays == [], f"test modules that mirror no source module: {strays}"


def test_the_rule_is_checked_on_something() -> None:
    modules = source_modules()
    assert Path("fuse/server.py") in modules and Path("cli.py") in modules
    assert len(modules) > 40
