"""DAX windows for backend tests: a client whose server offers one, and a window that says which
files a request told it about."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.server import Server, TransportCaps
from pyvirtiofsd.testing.fuse_client import FuseClient, direct


def dax_client(fs: Any, window: Any) -> FuseClient:
    """A client of ``fs`` through a server whose transport offers ``window`` (4 KiB alignment),
    its INIT done."""
    c = FuseClient(direct(Server(fs, caps=TransportCaps(dax_window=window, map_alignment=12))))
    c.init(abi.InitFlag.MAP_ALIGNMENT)
    return c


class OwnerWindow:
    """A DAX window that maps every file and notes which files (owners) it is told about:
    flushed before I/O, or resized after it."""

    size = 64 << 20

    def __init__(self) -> None:
        self.told: set[object] = set()

    def setup(
        self, fd: int, foffset: int, moffset: int, length: int, writable: bool, owner: object
    ) -> None:
        pass

    def remove(self, ranges: object) -> None:
        pass

    def holds(self, owner: object) -> bool:
        return True

    def resized(self, owner: object, size: int) -> None:
        self.told.add(owner)

    def flush(self, owner: object) -> None:
        self.told.add(owner)


def owners_told(window: OwnerWindow, requests: dict[str, Callable[[], object]]) -> dict:
    """For each named request, run alone, the files it told ``window`` about."""
    out = {}
    for name, request in requests.items():
        window.told.clear()
        request()
        out[name] = set(window.told)
    return out
