"""Serve an object store through Apache OpenDAL (memory, fs, s3, gcs, azblob, webdav, ...).

See docs/opendal.md for what is emulated, what is refused and how consistent it is.
"""

from pyvirtiofsd.backends.opendal.config import OpendalConfig, check_service
from pyvirtiofsd.backends.opendal.fs import OpendalFs

__all__ = ["OpendalConfig", "OpendalFs", "check_service"]
