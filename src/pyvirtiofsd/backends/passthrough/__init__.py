"""Serve a host directory (like virtiofsd's passthrough), confined to it."""

from pyvirtiofsd.backends.passthrough.config import FileHandles, PassthroughConfig
from pyvirtiofsd.backends.passthrough.fs import PassthroughFs
from pyvirtiofsd.fuse.policy import CachePolicy

__all__ = ["CachePolicy", "FileHandles", "PassthroughConfig", "PassthroughFs"]
