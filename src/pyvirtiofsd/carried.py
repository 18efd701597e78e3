"""A request that carries its own buffers: what a transport hands the FUSE server.

A virtqueue's descriptor chain is one (:class:`~pyvirtiofsd.virtio.chain.Chain` derives from
:class:`Carried`); :meth:`~pyvirtiofsd.fuse.server.Server.handle_carried` takes any.

Rules: it is a class, not a protocol, and it stays in the compiled set
(:data:`~pyvirtiofsd.accel.COMPILED`), so that a compiled server reads its four fields directly
rather than looking each one up by name, once per request. It imports nothing of the package:
both ``fuse`` and ``virtio`` import it, and neither may import the other.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Carried"]


class Carried:
    """One request's buffers: those the server reads, those it writes its reply into, and
    how many bytes each side holds."""

    __slots__ = ("readable", "readable_len", "writable", "writable_len")

    #: Views of the request, or a copy of it (bytes) when it is small.
    readable: Sequence[memoryview | bytes]
    writable: Sequence[memoryview]
    readable_len: int
    writable_len: int
