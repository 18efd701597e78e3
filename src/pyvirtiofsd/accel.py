"""Which build runs: pure Python, or the request hot path compiled by mypyc.

A plain install is pure Python. Installing with ``PYVIRTIOFSD_MYPYC=1`` in the environment (see
``setup.py``) also compiles the modules of :data:`COMPILED` from the same sources with mypyc, the
compiler that ships with mypy; each compiled module is an extension module next to its source,
and Python loads it in the source's place. The same build adds the C modules of :data:`NATIVE`:
each serves one Python module, which uses it when it is there and does without it otherwise, and
answers a request only as that module's Python code would (or leaves it to that code). Both
builds behave the same: CI runs the whole suite on the pure build and the unit, attack and
/dev/fuse suites again on the compiled one.
``pyvirtiofsd --version`` and the daemon's first log line say which build runs.

mypyc holds the compiled modules to their annotations at run time, so in them:

* annotations are true, including what mypy narrows them to: an attribute assigned and then read
  back after a call that may change it is assigned through a variable of the attribute's own,
  wider type; one ``except ... as`` name is never bound to two exception types in a function;
* module and class constants are ``Final`` (inlined, and a class constant stays on the class);
* a class that code outside the compiled set subclasses carries
  ``mypyc_attr(allow_interpreted_subclasses=True)``.

Code can't replace a compiled module's functions or methods at run time (calls between compiled
functions are bound when built); tests that do are marked ``pure_python`` and skipped on a
compiled build.

This module imports nothing of the package: ``setup.py`` reads :data:`COMPILED` from it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from typing import Final

__all__ = ["COMPILED", "NATIVE", "build", "compiled"]

#: The modules a compiled build compiles: the per-request path, from the ring to the backend.
COMPILED: Final = (
    "pyvirtiofsd.carried",
    "pyvirtiofsd.mutex",
    "pyvirtiofsd.virtio.chain",
    "pyvirtiofsd.virtio.queue",
    "pyvirtiofsd.virtio.memory",
    "pyvirtiofsd.fuse.abi",
    "pyvirtiofsd.fuse.records",
    "pyvirtiofsd.fuse.filesystem",
    "pyvirtiofsd.fuse.buffers",
    "pyvirtiofsd.fuse.dirents",
    "pyvirtiofsd.fuse.server",
    "pyvirtiofsd.vhost_user.runner",
    "pyvirtiofsd.vhost_user.vring",
    "pyvirtiofsd.backends.base",
    "pyvirtiofsd.backends.passthrough.credentials",
    "pyvirtiofsd.backends.passthrough.fs",
    "pyvirtiofsd.backends.passthrough.inodes",
    "pyvirtiofsd.transport.fusedev",
    "pyvirtiofsd.transport.fuse_uring",
    "pyvirtiofsd.uring",
)

#: Hand-written C modules the compiled build adds (``name.c`` beside the module that uses it).
NATIVE: Final = (
    "pyvirtiofsd._mutex",
    "pyvirtiofsd.fuse._buffers",
    "pyvirtiofsd.fuse._request",
    "pyvirtiofsd.virtio._walk",
    "pyvirtiofsd.virtio._ring",
    "pyvirtiofsd.backends.passthrough._stat",
    "pyvirtiofsd.transport._fusedev",
    "pyvirtiofsd._uring",
)


def compiled() -> list[str]:
    """The modules of :data:`COMPILED` and :data:`NATIVE` that are (or, not imported yet, will
    be) extension modules."""
    out = []
    for name in COMPILED + NATIVE:
        spec = importlib.util.find_spec(name)
        if spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            out.append(name)
    return out


def build() -> str:
    """``pure Python``, ``compiled with mypyc``, or, for a build that lost some of its
    extension modules, how many of them are left."""
    n = len(compiled())
    if n == 0:
        return "pure Python"
    if n == len(COMPILED) + len(NATIVE):
        return "compiled with mypyc"
    return f"partly compiled with mypyc ({n} of {len(COMPILED) + len(NATIVE)} modules)"
