"""A file system in a few dozen lines: /hello and /time, read-only.

    sudo python examples/hellofs.py --mount /mnt/hello          # on the host
    python examples/hellofs.py --socket-path /tmp/hello.sock    # to a VM (vhost-user-fs)
"""

import errno
import os
import stat
import sys
import time

import pyvirtiofsd
from pyvirtiofsd.fuse.abi import FOPEN_DIRECT_IO
from pyvirtiofsd.fuse.filesystem import ROOT, Attr, Entry, Filesystem, Opened

FILES = {
    b"hello": lambda: b"Hello from a Python file system!\n",
    b"time": lambda: time.strftime("%H:%M:%S\n").encode(),
}
INODES = {name: ino for ino, name in enumerate(FILES, start=ROOT + 1)}
NAMES = {ino: name for name, ino in INODES.items()}


class HelloFs(Filesystem):
    def _attr(self, ino):
        if ino == ROOT:
            return Attr(ino=ino, mode=stat.S_IFDIR | 0o755, nlink=2)
        if ino not in NAMES:
            raise OSError(errno.ENOENT, "no such inode")
        return Attr(ino=ino, mode=stat.S_IFREG | 0o444, size=len(FILES[NAMES[ino]]()))

    def lookup(self, ctx, parent, name):
        if parent != ROOT or name not in INODES:
            raise OSError(errno.ENOENT, "no such file")
        return Entry(INODES[name], self._attr(INODES[name]))

    def getattr(self, ctx, ino, fh):
        return self._attr(ino), 1.0

    def open(self, ctx, ino, flags, kill_suidgid):
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EROFS, "read-only")
        return Opened(fh=0, flags=FOPEN_DIRECT_IO)  # /time changes: don't cache it

    def read(self, ctx, ino, fh, offset, size, out):
        out.write(FILES[NAMES[ino]]()[offset : offset + size])

    def opendir(self, ctx, ino, flags):
        return Opened(fh=0)

    def readdir(self, ctx, ino, fh, offset, out):
        for index, (name, inode) in enumerate(INODES.items(), start=1):
            if index > offset and not out.add(inode, index, stat.S_IFREG >> 12, name):
                break


if __name__ == "__main__":
    sys.exit(pyvirtiofsd.serve_filesystem(HelloFs(), sys.argv[1:]))
