"""Serve a host directory (like virtiofsd's passthrough), confined to it."""

from pyvirtiofsd.backends.passthrough.config import FileHandles, PassthroughConfig, SecurityLabel
from pyvirtiofsd.backends.passthrough.fs import PassthroughFs
from pyvirtiofsd.backends.passthrough.xattrmap import XattrMap
from pyvirtiofsd.fuse.policy import CachePolicy

__all__ = [
    "CachePolicy",
    "FileHandles",
    "PassthroughConfig",
    "PassthroughFs",
    "SecurityLabel",
    "XattrMap",
]
