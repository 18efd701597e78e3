"""Serve a host directory (like virtiofsd's passthrough), confined to it."""

from ...fuse.policy import CachePolicy
from .config import FileHandles, PassthroughConfig
from .fs import PassthroughFs

__all__ = ["CachePolicy", "FileHandles", "PassthroughConfig", "PassthroughFs"]
