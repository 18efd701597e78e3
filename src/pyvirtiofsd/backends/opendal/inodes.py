"""Inode numbers for object paths, with the kernel's lookup counts.

Only what the kernel holds a reference to is kept: a :class:`Node` is made by a lookup (or a
create, or a READDIRPLUS entry) and freed when FORGET brings its count to zero and no file is
open on it. A listing of a million objects therefore costs nothing here, and a tree the guest has
walked and forgotten leaves nothing behind. A node is a few slots: its path (directories end in
"/", the root is ""), its type, the counts, and the attributes last fetched with their expiry.

Numbers are never reused (a 64-bit counter), so a stale number can't reach a different object.
A node is bound to a path *and* a type: if a name turns from a file into a directory behind our
back, the new directory gets a new number, because the kernel refuses an inode that changes its
type.

Nothing here talks to the store; FORGET (served on the virtio-fs hiprio queue) only takes the
table lock, which is never held across a store call.
"""

from __future__ import annotations

import errno
import stat
import threading
import time

from pyvirtiofsd.backends.opendal.attrs import Meta

ROOT_INO = 1
_PINNED = 1 << 62


class Node:
    __slots__ = ("expires", "ino", "kind", "marker", "meta", "nlookup", "opens", "path")

    def __init__(self, ino: int, path: str, kind: int, meta: Meta, expires: float) -> None:
        self.ino = ino
        #: "a/b/f" for objects, "a/b/" for directories, "" for the root; "" with a kind other
        #: than S_IFDIR never happens (the root is the only node with an empty path).
        self.path = path
        self.kind = kind
        self.nlookup = 0
        self.opens = 0
        #: Attributes as last fetched from the store, and until when they may be trusted.
        self.meta = meta
        self.expires = expires
        #: Directories: the store has a marker object for it (None: not known). Without one, a
        #: directory vanishes with its last entry; we put one in before that can happen.
        self.marker: bool | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    def fresh(self, now: float) -> bool:
        return self.expires > now

    def __repr__(self) -> str:
        return f"Node({self.ino}, {self.path!r}, nlookup={self.nlookup}, opens={self.opens})"


class InodeTable:
    def __init__(self, root_meta: Meta) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[int, Node] = {}
        #: Linked nodes by path; an unlinked node (removed while still known to the kernel)
        #: stays in ``_nodes`` only.
        self._by_path: dict[str, Node] = {}
        self._next = ROOT_INO + 1
        root = Node(ROOT_INO, "", stat.S_IFDIR, root_meta, 0.0)
        root.nlookup = _PINNED
        root.marker = True
        self._nodes[ROOT_INO] = root
        self._by_path[""] = root
        self.root = root

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, ino: int) -> Node:
        try:
            return self._nodes[ino]
        except KeyError:
            raise OSError(errno.ESTALE, f"unknown inode {ino}") from None

    def find(self, path: str) -> Node | None:
        return self._by_path.get(path)

    def ref(self, path: str, kind: int, meta: Meta, expires: float, count: int = 1) -> Node:
        """The node of ``path`` with ``count`` more lookups, made if new; ``meta`` refreshes
        its cached attributes."""
        with self._lock:
            node = self._by_path.get(path)
            if node is not None and node.kind != kind:
                # Same name, another type: a new inode; the old one lives on unlinked.
                del self._by_path[path]
                node.path = _unlinked(node.path)
                node = None
            if node is None:
                node = Node(self._next, path, kind, meta, expires)
                self._next += 1
                self._nodes[node.ino] = node
                self._by_path[path] = node
            else:
                node.meta = meta
                node.expires = expires
            if node.nlookup < _PINNED:
                node.nlookup += count
            return node

    def forget(self, ino: int, count: int) -> None:
        with self._lock:
            node = self._nodes.get(ino)
            if node is None or node.nlookup >= _PINNED:
                return
            node.nlookup -= min(count, node.nlookup)
            if node.nlookup == 0 and node.opens == 0:
                self._free(node)

    def opened(self, node: Node) -> None:
        with self._lock:
            node.opens += 1

    def closed(self, node: Node) -> None:
        with self._lock:
            node.opens -= 1
            if node.nlookup == 0 and node.opens <= 0:
                self._free(node)

    def _free(self, node: Node) -> None:
        # pop: a hostile guest may FORGET an inode a request is still opening or closing.
        self._nodes.pop(node.ino, None)
        if self._by_path.get(node.path) is node:
            del self._by_path[node.path]

    def unlink(self, path: str) -> Node | None:
        """``path`` was removed: its node (if any) stays reachable by number only."""
        with self._lock:
            node = self._by_path.pop(path, None)
            if node is not None:
                node.path = _unlinked(path)
            return node

    def rename(self, old: str, new: str) -> None:
        """Follow a rename of ``old`` to ``new`` (both directory paths for a directory, in
        which case every node under it moves along: a scan of the table, which holds only
        what the kernel has referenced)."""
        with self._lock:
            target = self._by_path.pop(new, None)
            if target is not None:
                target.path = _unlinked(new)
            node = self._by_path.pop(old, None)
            if node is not None:
                _moved(node, new)
                self._by_path[new] = node
            if old.endswith("/"):
                moved = [n for p, n in self._by_path.items() if p.startswith(old)]
                for n in moved:
                    del self._by_path[n.path]
                for n in moved:
                    _moved(n, new + n.path[len(old) :])
                    stale = self._by_path.get(n.path)
                    if stale is not None:
                        stale.path = _unlinked(stale.path)
                    self._by_path[n.path] = n

    def expire(self, node: Node) -> None:
        node.expires = 0.0

    def nodes_under(self, dirpath: str) -> list[Node]:
        with self._lock:
            return [n for p, n in self._by_path.items() if p.startswith(dirpath) and p]


def _moved(node: Node, path: str) -> None:
    node.path = path
    # The object's version there is another (a rename by copy, as on S3, gives it a new
    # modification time): one kept would pass for another client's change at the next stat.
    if node.meta.version is not None:
        node.meta = node.meta._replace(version=None)


def _unlinked(path: str) -> str:
    # Unlinked nodes keep a path no object can have ("\0" is not allowed in names), so that
    # nothing ever looks them up by path or uploads under it.
    return "\0" + path


def now() -> float:
    return time.monotonic()


def is_unlinked(node: Node) -> bool:
    return node.path.startswith("\0")


__all__ = ["ROOT_INO", "InodeTable", "Node", "is_unlinked", "now"]
