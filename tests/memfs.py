"""A small in-memory file system, to test the server without any host file system."""

from __future__ import annotations

import errno
import stat
import threading
import time

from pyvirtiofsd.fuse.filesystem import (
    ROOT,
    Attr,
    Context,
    DirBuffer,
    Entry,
    Filesystem,
    Opened,
    SetAttr,
    dtype_of_mode,
)


class Node:
    def __init__(self, ino: int, mode: int) -> None:
        self.ino = ino
        self.mode = mode
        self.data = bytearray()
        self.children: dict[bytes, int] = {}
        self.lookups = 0
        now = time.time_ns()
        self.mtime = now

    def attr(self) -> Attr:
        s, ns = divmod(self.mtime, 1_000_000_000)
        return Attr(
            ino=self.ino,
            size=len(self.data),
            mode=self.mode,
            nlink=2 if stat.S_ISDIR(self.mode) else 1,
            mtime=s,
            mtimensec=ns,
            atime=s,
            ctime=s,
        )


class MemFs(Filesystem):
    def __init__(self) -> None:
        self.nodes = {ROOT: Node(ROOT, stat.S_IFDIR | 0o755)}
        self.next = 2
        self.lock = threading.Lock()
        self.forgotten: list[tuple[int, int]] = []

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise OSError(errno.ENOENT, "no such inode") from None

    def _entry(self, node: Node) -> Entry:
        node.lookups += 1
        return Entry(node.ino, node.attr(), 1.0, 1.0)

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        ino = self._node(parent).children.get(name)
        if ino is None:
            raise OSError(errno.ENOENT, "no such file")
        return self._entry(self.nodes[ino])

    def forget(self, ino: int, nlookup: int) -> None:
        self.forgotten.append((ino, nlookup))

    def getattr(self, ctx: Context, ino: int, fh: int | None) -> tuple[Attr, float]:
        return self._node(ino).attr(), 1.0

    def setattr(self, ctx: Context, ino: int, changes: SetAttr) -> tuple[Attr, float]:
        node = self._node(ino)
        if changes.size is not None:
            del node.data[changes.size :]
            node.data.extend(b"\0" * (changes.size - len(node.data)))
        if changes.mode is not None:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(changes.mode)
        return node.attr(), 1.0

    def _add(self, parent: int, name: bytes, mode: int) -> Node:
        with self.lock:
            p = self._node(parent)
            if name in p.children:
                raise OSError(errno.EEXIST, "exists")
            node = Node(self.next, mode)
            self.next += 1
            self.nodes[node.ino] = node
            p.children[name] = node.ino
            return node

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        return self._entry(self._add(parent, name, stat.S_IFDIR | (mode & ~umask)))

    def create(self, ctx, parent, name, mode, flags, umask, kill_suidgid):  # type: ignore[no-untyped-def]
        node = self._add(parent, name, stat.S_IFREG | (mode & ~umask))
        return self._entry(node), Opened(node.ino)

    def open(self, ctx: Context, ino: int, flags: int, kill_suidgid: bool) -> Opened:
        self._node(ino)
        return Opened(ino)

    def read(self, ctx, ino, fh, offset, size, out):  # type: ignore[no-untyped-def]
        out.write(bytes(self._node(ino).data[offset : offset + size]))

    def write(self, ctx, ino, fh, offset, data, flags):  # type: ignore[no-untyped-def]
        node = self._node(ino)
        raw = data.tobytes()
        if len(node.data) < offset:
            node.data.extend(b"\0" * (offset - len(node.data)))
        node.data[offset : offset + len(raw)] = raw
        return len(raw)

    def flush(self, ctx, ino, fh, lock_owner):  # type: ignore[no-untyped-def]
        pass

    def opendir(self, ctx: Context, ino: int, flags: int) -> Opened:
        return Opened(ino)

    def readdir(self, ctx: Context, ino: int, fh: int, offset: int, out: DirBuffer) -> None:
        entries = sorted(self._node(ino).children.items())
        for i, (name, child) in enumerate(entries[offset:], start=offset + 1):
            node = self.nodes[child]
            if out.plus:
                if not out.fits(name):
                    return
                out.add_plus(self._entry(node), i, dtype_of_mode(node.mode), name)
            elif not out.add(child, i, dtype_of_mode(node.mode), name):
                return

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        if self._node(parent).children.pop(name, None) is None:
            raise OSError(errno.ENOENT, "no such file")

    def getxattr(self, ctx: Context, ino: int, name: bytes) -> bytes:
        if name == b"user.big":
            return b"x" * 100
        raise OSError(errno.ENODATA, "no such attribute")

    def listxattr(self, ctx: Context, ino: int) -> list[bytes]:
        return [b"user.big", b"user.other"]
