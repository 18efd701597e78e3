"""The layering rules, checked from the source's imports.

Each layer knows only the ones below it: ``fuse`` (the FUSE ABI, server and file-system
interface) knows nothing of virtio, vhost-user or transports; ``virtio`` knows nothing of FUSE
or vhost-user; ``vhost_user`` knows queues and memory, not FUSE; backends know only the
file-system interface (and their shared base) and never each other; transports and the command
line join the pieces, and nothing below the command line imports it. The test VMM
(``pyvirtiofsd.testing``) is for tests, benchmarks and the VM harness only. No module takes
part in an import cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "pyvirtiofsd"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in (SRC / PACKAGE).rglob("*.py")}


MODULES = _modules()


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    # A package's own __init__ is the package: one level up is the package itself.
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _native(name: str) -> bool:
    return SRC.joinpath(*name.split(".")).with_suffix(".c").is_file()


def _imports(name: str) -> Iterator[str]:
    """Every project module ``name`` imports (at any place in the file, type-checking-only
    imports included)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node)
            # "from . import abi" names a module; "from .abi import X" names things in one.
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            if _native(target):
                continue  # a C module (accel.NATIVE) imports nothing of the project
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                while target not in MODULES and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in MODULES and target != name:
                    yield target


GRAPH = {name: sorted(set(_imports(name))) for name in MODULES}


def _in(module: str, package: str) -> bool:
    full = f"{PACKAGE}.{package}"
    return module == full or module.startswith(full + ".")


#: package -> packages it must never import.
FORBIDDEN = {
    "fuse": ["virtio", "vhost_user", "transport", "backends", "testing", "cli", "daemon", "vm"],
    "virtio": ["fuse", "vhost_user", "transport", "backends", "testing", "cli", "daemon", "vm"],
    "vhost_user": ["fuse", "transport", "backends", "testing", "cli", "daemon", "vm"],
    "backends": ["virtio", "vhost_user", "transport", "testing", "cli", "daemon", "vm"],
    "transport": ["testing", "cli", "daemon", "vm"],
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_imports_only_below(package: str) -> None:
    wrong = [
        f"{m} imports {t}"
        for m, targets in GRAPH.items()
        if _in(m, package)
        for t in targets
        if any(_in(t, other) for other in FORBIDDEN[package])
    ]
    assert not wrong, "\n".join(wrong)


def test_backends_never_import_each_other() -> None:
    backends = {p.name for p in (SRC / PACKAGE / "backends").iterdir() if p.is_dir()}
    backends.discard("__pycache__")
    assert backends >= {"passthrough", "opendal"}
    wrong = []
    for m, targets in GRAPH.items():
        for mine in backends:
            if _in(m, f"backends.{mine}"):
                wrong += [
                    f"{m} imports {t}"
                    for t in targets
                    if _in(t, "backends")
                    and not _in(t, f"backends.{mine}")
                    and t != f"{PACKAGE}.backends.base"
                    and t != f"{PACKAGE}.backends"
                ]
    assert not wrong, "\n".join(wrong)


def test_nothing_below_the_command_line_imports_it() -> None:
    cli = f"{PACKAGE}.cli"
    importers = sorted(m for m, targets in GRAPH.items() if cli in targets)
    # The package root's serve_filesystem(fs, argv) runs the command line for library users.
    assert importers == [PACKAGE, f"{PACKAGE}.__main__"], importers


def test_the_test_vmm_is_not_part_of_the_product() -> None:
    wrong = [
        f"{m} imports {t}"
        for m, targets in GRAPH.items()
        if not _in(m, "testing")
        for t in targets
        if _in(t, "testing")
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_every_module_says_what_it_exports() -> None:
    """One style across packages: every module declares ``__all__`` (and imports absolutely,
    which ruff's TID252 checks)."""
    missing = [
        name
        for name, path in MODULES.items()
        if path.name not in ("__init__.py", "__main__.py")
        and "__all__" not in {
            t.id
            for n in ast.parse(path.read_text()).body
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
    ]
    assert not missing, missing


def test_the_graph_is_read() -> None:
    """The checks above see the imports they are about (a broken parser would pass them all)."""
    assert f"{PACKAGE}.fuse.abi" in GRAPH[f"{PACKAGE}.fuse.server"]
    assert f"{PACKAGE}.fuse.filesystem" in GRAPH[f"{PACKAGE}.backends.passthrough.fs"]
