"""Serve a host directory (like virtiofsd's passthrough), confined to it."""

from .config import CachePolicy, FileHandles, PassthroughConfig
from .fs import PassthroughFs

__all__ = ["CachePolicy", "FileHandles", "PassthroughConfig", "PassthroughFs"]
