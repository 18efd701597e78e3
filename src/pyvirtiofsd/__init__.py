"""pyvirtiofsd: a virtio-fs device back-end and FUSE server in Python."""

__version__ = "0.1.0"
