"""The compiled build (mypyc) as a daemon of the benchmarks: where its tree comes from, and the
proof that a daemon started from it runs compiled code.

A compiled tree is a directory that, as the only entry of PYTHONPATH, makes
``python -m pyvirtiofsd`` the mypyc build: what ``.ci/build-compiled DIR`` lays out, or the
unpacked wheel of ``PYVIRTIOFSD_MYPYC=1 pip wheel .``. The tree a run uses is the first of:

1. ``--compiled DIR``, as given (if its sources differ from this checkout's ``src/``, the run
   says so: its figures are of other code than the pure column's);
2. ``build/compiled`` at the top of this checkout, if it was compiled from the same sources as
   ``src/`` (CI's ``.ci/test`` builds it before the tests);
3. ``$PYVIRTIOFSD_CACHE/bench/compiled-<hash of the sources>``, built there by pip the first
   time (the steps of ``.ci/build-compiled``, from a copy of the sources, so that the checkout
   gets no build directories and an edit made meanwhile cannot slip in). A build takes one to
   two minutes on two cores; the newest few trees are kept, so a rerun of unchanged sources
   builds nothing.

Rules: a tree is used only once ``python -m pyvirtiofsd --version``, run exactly as the daemon
will be, says "compiled with mypyc" (a build that lost modules or was made for another
interpreter says otherwise), and a daemon started from it is measured only once its
``/proc/PID/maps`` shows the tree's extension modules loaded. A tree that can't be had raises
:class:`Unavailable` with the reason (no C compiler, no Python headers, the build's error): the
compiled column is then not measured and the run goes on without it. The results say how the
tree was had (:meth:`Tree.describe`), not where it is on this machine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyvirtiofsd.vm import assets

CHECKOUT = Path(__file__).resolve().parents[1]
PACKAGE = "pyvirtiofsd"
COMPILED = "compiled with mypyc"
#: Compiled trees kept in the cache (the least recently used go first).
KEEP = 3
BUILD_TIMEOUT = 20 * 60


class Unavailable(Exception):
    """No compiled tree can be had; the message says why."""


@dataclass
class Tree:
    path: Path
    origin: str  # "--compiled DIR", "build/compiled", "cache" or "built"
    version: str  # what `python -m pyvirtiofsd --version` says with it
    same_sources: bool  # compiled from the sources of this checkout's src/
    build_seconds: float | None = None

    def describe(self) -> dict[str, Any]:
        """For the results: how the tree was found, never where it is."""
        return {
            "origin": self.origin,
            "version": self.version,
            "same_sources": self.same_sources,
            "build_seconds": None if self.build_seconds is None else round(self.build_seconds),
        }

    def summary(self) -> str:
        how = {
            "--compiled DIR": "the tree given with --compiled",
            "build/compiled": "build/compiled",
            "cache": "the cached build of these sources",
            "built": f"built for this run in {round(self.build_seconds or 0)} s",
        }[self.origin]
        note = "" if self.same_sources else "; its sources DIFFER from src/"
        return f"{self.version}, {how}{note}"


def command() -> list[str]:
    """The command that runs pyvirtiofsd from the tree on PYTHONPATH (:func:`environ`): -P keeps
    the working directory off sys.path, where a ``pyvirtiofsd`` directory would shadow it."""
    return [sys.executable, "-P", "-m", PACKAGE]


def environ(tree: Path) -> dict[str, str]:
    """The environment of a daemon run from ``tree``: the tree alone on PYTHONPATH (the
    benchmark itself runs with src/ there)."""
    return os.environ | {"PYTHONPATH": str(tree)}


def build_of(tree: Path) -> str:
    """What ``pyvirtiofsd --version`` says run from ``tree``: its whole first line."""
    try:
        out = subprocess.run(
            [*command(), "--version"],
            env=environ(tree),
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"did not run: {exc}"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if out.returncode == 0 and lines else f"failed: {lines[-1] if lines else ''}"


def _sources(package: Path) -> dict[str, bytes]:
    """Relative path -> digest of every module of the package, the test helpers aside (a wheel
    has none; ``.ci/build-compiled`` copies them in)."""
    out = {}
    for p in package.rglob("*.py"):
        rel = p.relative_to(package)
        if rel.parts[0] == "testing" or "__pycache__" in rel.parts:
            continue
        out[rel.as_posix()] = hashlib.sha256(p.read_bytes()).digest()
    return out


def same_sources(tree: Path) -> bool:
    """Whether ``tree`` holds the modules of src/ as they are now (a wheel carries the sources
    of its compiled modules beside them)."""
    return _sources(tree / PACKAGE) == _sources(CHECKOUT / "src" / PACKAGE)


def stamp() -> str:
    """What a build depends on: the package's modules, the build files and the interpreter."""
    h = hashlib.sha256()
    for rel, digest in sorted(_sources(CHECKOUT / "src" / PACKAGE).items()):
        h.update(rel.encode() + b"\0" + digest)
    for name in ("setup.py", "pyproject.toml"):
        h.update(name.encode() + b"\0" + (CHECKOUT / name).read_bytes())
    h.update(str(sysconfig.get_config_var("EXT_SUFFIX")).encode())
    return h.hexdigest()[:16]


def cannot_compile() -> str | None:
    """Why this machine can't build the compiled variant, or None if it looks as if it can."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc}): apt-get install gcc"
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.exists():
        return f"no Python headers ({header}): apt-get install python3-dev"
    return None


def _check(tree: Path) -> str:
    version = build_of(tree)
    if COMPILED not in version:
        raise Unavailable(f"the tree is not the compiled build: its --version says {version!r}")
    return version


def _cache() -> Path:
    """Where built trees are kept: beside the VM assets, or the user's cache if that is not
    writable (the front-end part runs without root)."""
    return assets.writable_cache("bench")


def _build(dest: Path, log: Callable[[str], None]) -> tuple[str, float]:
    """Build the wheel from a copy of the sources and unpack it into ``dest``: its version and
    the seconds taken."""
    reason = cannot_compile()
    if reason is not None:
        raise Unavailable(f"cannot build it: {reason}")
    log(f"building the compiled daemon (mypyc, a minute or two) into {dest} ...")
    t0 = time.monotonic()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=dest.parent) as tmp:
        work = Path(tmp)
        snapshot = work / "src-tree"
        snapshot.mkdir()
        shutil.copytree(
            CHECKOUT / "src",
            snapshot / "src",
            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so"),
        )
        for name in ("setup.py", "pyproject.toml", "README.md"):
            shutil.copy2(CHECKOUT / name, snapshot / name)
        wheels = work / "wheel"
        try:
            run = subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels),
                 str(snapshot)],
                env=os.environ | {"PYVIRTIOFSD_MYPYC": "1"},
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            raise Unavailable(f"the build did not run: {exc}") from None
        if run.returncode != 0:
            raise Unavailable(f"the build failed: {_build_error(run.stderr or run.stdout)}")
        [wheel] = wheels.glob("*.whl")
        unpacked = work / "tree"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(unpacked)
        version = _check(unpacked)
        try:
            unpacked.rename(dest)
        except OSError:
            # Another run built the same sources meanwhile: its tree is as good.
            if not dest.is_dir():
                raise
    return version, time.monotonic() - t0


def _build_error(output: str) -> str:
    """The lines of pip's output that say what went wrong (the first errors, where a compiler's
    or a resolver's message is, and pip's last word), not its boxes and notes."""
    lines = [line.strip() for line in output.strip().splitlines()]
    errors = [
        line
        for line in lines
        if "error" in line.lower()
        and "subprocess-exited-with-error" not in line
        and "originates from a subprocess" not in line
    ]
    picked = list(dict.fromkeys(errors[:2] + errors[-1:])) or lines[-3:]
    text = " | ".join(picked)
    return text if len(text) <= 500 else text[:497] + "..."


def _prune(cache: Path, keep: Path) -> None:
    trees = sorted(cache.glob("compiled-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [t for t in trees if t != keep][KEEP - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def find(explicit: Path | None = None, log: Callable[[str], None] = print) -> Tree:
    """The compiled tree to measure (see the module's docstring for the order); raises
    :class:`Unavailable` with the reason when there is none."""
    if explicit is not None:
        tree = explicit.resolve()
        if not (tree / PACKAGE).is_dir():
            raise Unavailable(f"--compiled {explicit}: no {PACKAGE} package in it")
        return Tree(tree, "--compiled DIR", _check(tree), same_sources(tree))
    local = CHECKOUT / "build" / "compiled"
    if (local / PACKAGE).is_dir() and same_sources(local):
        version = build_of(local)
        if COMPILED in version:
            return Tree(local, "build/compiled", version, True)
    cache = _cache()
    dest = cache / f"compiled-{stamp()}"
    if (dest / PACKAGE).is_dir():
        version = build_of(dest)
        if COMPILED in version:
            os.utime(dest)  # the least recently used trees are pruned first
            return Tree(dest, "cache", version, same_sources(dest))
        shutil.rmtree(dest, ignore_errors=True)  # a broken tree: build it again
    version, seconds = _build(dest, log)
    _prune(cache, dest)
    return Tree(dest, "built", version, same_sources(dest), seconds)


def check_running(pid: int, tree: Path) -> None:
    """Raise RuntimeError unless process ``pid`` has the tree's extension modules mapped (a
    daemon that imported the pure modules from elsewhere has none)."""
    root = os.path.realpath(tree) + os.sep
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)  # address, perms, offset, dev, inode[, path]
            path = fields[5].rstrip() if len(fields) == 6 else ""
            if path.startswith(root) and path.endswith(".so"):
                return
    raise RuntimeError(f"the compiled daemon (pid {pid}) has none of its tree's modules loaded")


# --- the options, shared by compare.py, frontend.py and fusedev.py -------------------------------


def add_arguments(ap: argparse.ArgumentParser) -> None:
    group = ap.add_mutually_exclusive_group()
    group.add_argument(
        "--compiled",
        type=Path,
        metavar="DIR",
        help="the compiled (mypyc) build's tree to measure (default: build/compiled if it is "
        "compiled from src/ as it is, else a build of src/ cached in $PYVIRTIOFSD_CACHE/bench, "
        "made on first use)",
    )
    group.add_argument(
        "--no-compiled", action="store_true", help="leave the compiled build out of the run"
    )


def select(
    args: argparse.Namespace, daemons: list[str], name: str
) -> tuple[list[str], Tree | None, str | None]:
    """The daemons to run (``name``, the compiled one, left out when it can't be had), its tree
    and why not (see :func:`resolve`); the tree is looked for only when ``name`` is asked for."""
    tree, why_not = resolve(args) if name in daemons else (None, None)
    return [d for d in daemons if d != name or tree is not None], tree, why_not


def resolve(args: argparse.Namespace) -> tuple[Tree | None, str | None]:
    """The tree the options ask for: (tree, None), (None, why not), or (None, None) when the
    compiled build was left out. Says on stderr which tree it is, or why there is none."""
    if args.no_compiled:
        return None, None

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        tree = find(args.compiled, log)
    except Unavailable as exc:
        log(f"compiled build: not measured: {exc}")
        return None, str(exc)
    log(f"compiled build: {tree.summary()}")
    return tree, None
