"""pyvirtiofsd: a virtio-fs device back-end (vhost-user) and FUSE server in Python.

To serve a file system of your own, subclass :class:`pyvirtiofsd.fuse.filesystem.Filesystem` and
hand it to :func:`serve_filesystem`, which takes the daemon's command line (``--mount DIR`` for
the host, ``--socket-path PATH`` for a VM). Without a command line, build the configs yourself
and call :func:`pyvirtiofsd.daemon.serve_filesystem`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyvirtiofsd.version import __version__

if TYPE_CHECKING:
    from pyvirtiofsd.fuse.filesystem import Filesystem


def serve_filesystem(fs: Filesystem, argv: list[str] | None = None) -> int:
    """Serve ``fs`` as the command line ``argv`` (default: ``sys.argv[1:]``) says; the exit
    status."""
    from pyvirtiofsd.cli import main

    return main(argv, fs=fs)


__all__ = ["__version__", "serve_filesystem"]
