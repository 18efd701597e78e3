"""The object-storage file system served in-process and driven through raw FUSE requests
(``FuseClient(direct(Server(fs)))``), on a real Operator wrapped so that a test can hold a
chosen store call until it lets it go, and so see the interleaving it wants.

The wrapper forwards every call to the real Operator (memory, fs, or s3 against moto_server);
it only delays calls, or hides a capability to take the path a service without it takes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyvirtiofsd.backends.opendal import OpendalConfig, OpendalFs
from pyvirtiofsd.fuse.policy import CachePolicy
from pyvirtiofsd.fuse.server import Server
from pyvirtiofsd.testing.fuse_client import FuseClient, direct
from tests.opendal_fixtures import Service, StoreView

#: Operator methods whose first argument is the path they act on.
_PATH_CALLS = frozenset({"stat", "read", "write", "delete", "rename", "copy", "list", "open"})


def wait_until(cond: Callable[[], bool], what: str = "condition", limit: float = 60.0) -> None:
    """Poll ``cond`` until it holds; the limit only keeps a broken test from hanging CI."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.001)


class Gate:
    """Holds matching store calls (before or after they reach the store), at most ``limit`` of
    them, each until it is let go (``release(i)`` for the i-th to arrive, ``open()`` for all,
    now and later)."""

    def __init__(self, method: str, path: str, after: bool, limit: int | None) -> None:
        self.method = method
        self.path = path
        self.after = after
        self.limit = limit
        self._held: list[threading.Event] = []
        self._open = False
        self._lock = threading.Lock()

    @property
    def arrivals(self) -> int:
        return len(self._held)

    def claim(self) -> threading.Event | None:
        """A place at the gate for a call, or None when it passes freely."""
        with self._lock:
            if self._open or (self.limit is not None and len(self._held) >= self.limit):
                return None
            ev = threading.Event()
            self._held.append(ev)
            return ev

    def release(self, i: int) -> None:
        self._held[i].set()

    def open(self) -> None:
        with self._lock:
            self._open = True
            held = list(self._held)
        for ev in held:
            ev.set()


def _hold(gate: Gate, ev: threading.Event) -> None:
    if not ev.wait(60):
        raise TimeoutError(f"gate {gate.method} {gate.path!r} never opened")


class _Caps:
    def __init__(self, real: Any, override: dict[str, Any]) -> None:
        self._real = real
        self._override = override

    def __getattr__(self, name: str) -> Any:
        if name in self._override:
            return self._override[name]
        return getattr(self._real, name)


class GatedOperator:
    """A real Operator; ``gate(method, path)`` holds that call on that path until opened."""

    def __init__(self, op: Any, caps: dict[str, Any] | None = None) -> None:
        self.real = op
        self._caps = caps or {}
        self._gates: list[Gate] = []
        self._lock = threading.Lock()

    def capability(self) -> Any:
        return _Caps(self.real.capability(), self._caps)

    def gate(self, method: str, path: str, after: bool = False, limit: int | None = None) -> Gate:
        g = Gate(method, path, after, limit)
        with self._lock:
            self._gates.append(g)
        return g

    def open_all(self) -> None:
        with self._lock:
            gates, self._gates = self._gates, []
        for g in gates:
            g.open()

    def _match(self, method: str, path: object) -> tuple[Gate, threading.Event] | None:
        with self._lock:
            gates = [g for g in self._gates if g.method == method and g.path == path]
        for g in gates:
            ev = g.claim()
            if ev is not None:
                return g, ev
        return None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if name not in _PATH_CALLS:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            held = self._match(name, args[0] if args else kwargs.get("path"))
            if held is not None and not held[0].after:
                _hold(*held)
            result = attr(*args, **kwargs)
            if held is not None and held[0].after:
                _hold(*held)
            return result

        return call


class OperatorView(StoreView):
    """The memory service seen through the raw Operator: not through the file system."""

    def __init__(self, op: Any) -> None:
        self.op = op

    def names(self) -> set[str]:
        out: set[str] = set()
        for entry in self.op.scan(""):
            if entry.path and entry.path != "/":
                out.add(entry.path)
        return out

    def get(self, key: str) -> bytes:
        return bytes(self.op.read(key))

    def put(self, key: str, data: bytes) -> None:
        self.op.write(key, data)


@dataclass
class Direct:
    """One in-process file system on ``service``, its gated Operator and a FUSE client."""

    fs: OpendalFs
    op: GatedOperator
    client: FuseClient
    view: StoreView

    def client_for(self) -> FuseClient:
        """Another client on the same server (its own request ids), for another thread."""
        c = FuseClient(self._transact)
        c.max_write = self.client.max_write
        return c

    @property
    def _transact(self) -> Any:
        return self.client._transact

    def lock_waiters(self, path: str) -> int:
        """Threads waiting for the name lock of ``path`` (0 where there is no such lock)."""
        names = getattr(self.fs, "names", None)
        return names.waiting(path) if names is not None else 0

    def exists(self, key: str) -> bool:
        return key in self.view.files()

    def store(self, key: str) -> bytes | None:
        return self.view.get(key) if self.exists(key) else None


@contextlib.contextmanager
def serve(
    service: Service,
    cache_dir: Path,
    caps: dict[str, Any] | None = None,
    cache: CachePolicy = CachePolicy.AUTO,
    **cfg: Any,
) -> Iterator[Direct]:
    config = OpendalConfig(
        service.scheme, dict(service.options), cache=cache, cache_dir=str(cache_dir), **cfg
    )
    real = config.build_operator()
    op = GatedOperator(real, caps)
    fs = OpendalFs(config, op)
    client = FuseClient(direct(Server(fs)))
    client.init()
    # memory has no store outside the daemon: the raw Operator is the second read path.
    view = OperatorView(real) if service.scheme == "memory" else service.view
    d = Direct(fs, op, client, view)
    try:
        yield d
    finally:
        op.open_all()
        fs.shutdown()
