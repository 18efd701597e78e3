"""The back-end -> front-end channel (the socket from SET_BACKEND_REQ_FD).

Requests on it come from request handlers on any worker thread (e.g. FUSE SETUPMAPPING
asking the front-end to map a file into the DAX window). One lock covers the whole
send-then-wait-for-reply exchange, so replies can't be taken by the wrong thread.

With REPLY_ACK negotiated every request carries NEED_REPLY and :meth:`BackendChannel.request`
returns the front-end's u64 status (0 = success). Without it the front-end sends no reply
and ``request`` returns 0 once the message is sent.

Messages go through :mod:`.wire`, which never changes the flags of the socket (its open file
description came from the front-end) and takes its timeouts from poll(). A reply must be the
u64 answer to the request just sent; fds attached to it are closed. After a timeout or a
garbled reply the channel is closed for good: the stream is out of step.
:meth:`BackendChannel.close` shuts the socket down first, so that a request waiting for its
reply ends at once rather than holding the channel until its timeout.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Sequence

from pyvirtiofsd.vhost_user.messages import (
    BackendReq,
    MessageError,
    MMapRequest,
    ProtocolFeature,
    decode_u64,
    encode_message,
)
from pyvirtiofsd.vhost_user.wire import deadline_after, recv_message, send_with_fds

__all__ = ["BackendChannel", "BackendChannelError"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0


class BackendChannelError(OSError):
    """The front-end did not answer, answered nonsense, or the channel is closed."""


class BackendChannel:
    """Send back-end requests to the front-end and wait for their status."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        reply_ack: bool,
        send_fds: bool,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self._sock = sock
        self._timeout = timeout
        self.reply_ack = reply_ack
        self.send_fds = send_fds
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_fd(cls, fd: int, protocol_features: int) -> BackendChannel:
        """Wrap the fd of SET_BACKEND_REQ_FD given the negotiated protocol features."""
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX:
            sock.detach()
            raise ValueError("the back-end channel must be a Unix socket")
        return cls(
            sock,
            reply_ack=bool(protocol_features >> ProtocolFeature.REPLY_ACK & 1),
            send_fds=bool(protocol_features >> ProtocolFeature.BACKEND_SEND_FD & 1),
        )

    def request(self, msg_id: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        """Send one request; return the front-end's u64 reply (0 without REPLY_ACK)."""
        if fds and not self.send_fds:
            raise BackendChannelError("BACKEND_SEND_FD was not negotiated")
        for fd in fds:
            os.fstat(fd)  # fail here, with the caller's fd in the message, not in sendmsg
        data = encode_message(msg_id, payload, need_reply=self.reply_ack)
        with self._lock:
            if self._closed:
                raise BackendChannelError("the back-end channel is closed")
            deadline = deadline_after(self._timeout)
            try:
                send_with_fds(self._sock, data, fds, deadline=deadline)
                if not self.reply_ack:
                    return 0
                return self._read_reply(msg_id, deadline)
            except TimeoutError:
                self._fail()
                raise BackendChannelError(f"front-end did not answer request {msg_id}") from None
            except (OSError, MessageError) as e:
                self._fail()
                if isinstance(e, BackendChannelError):
                    raise
                raise BackendChannelError(f"back-end channel: {e}") from None

    def _read_reply(self, msg_id: int, deadline: float | None) -> int:
        reply = recv_message(self._sock, deadline=deadline)
        if reply is None:
            raise BackendChannelError("front-end closed the back-end channel")
        reply.close_fds()  # a reply carries none
        if reply.request != msg_id or not reply.is_reply:
            raise BackendChannelError(
                f"expected the reply to request {msg_id}, "
                f"got request {reply.request} flags {reply.flags:#x}"
            )
        try:
            return decode_u64(reply.payload)
        except MessageError:
            raise BackendChannelError(f"reply to request {msg_id} has no u64") from None

    def _fail(self) -> None:
        # After a timeout or a garbled reply the stream is out of step for good.
        self._closed = True
        self._sock.close()

    def shmem_map(
        self, shmid: int, fd: int, fd_offset: int, shm_offset: int, length: int, writable: bool
    ) -> int:
        """Ask the front-end to map ``fd`` into shared memory region ``shmid``."""
        msg = MMapRequest(
            shmid, fd_offset, shm_offset, length, MMapRequest.WRITABLE if writable else 0
        )
        return self.request(BackendReq.SHMEM_MAP, msg.encode(), (fd,))

    def shmem_unmap(self, shmid: int, shm_offset: int, length: int) -> int:
        """Ask the front-end to unmap a range it mapped with :meth:`shmem_map`."""
        msg = MMapRequest(shmid, 0, shm_offset, length, 0)
        return self.request(BackendReq.SHMEM_UNMAP, msg.encode())

    def close(self) -> None:
        # Wake a request waiting for its reply (it fails) before taking the lock it holds.
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self._lock:
            if not self._closed:
                self._closed = True
                self._sock.close()

    @property
    def closed(self) -> bool:
        return self._closed

