"""The miniature FUSE client: request framing, reply checks, errors as OSError."""

from __future__ import annotations

import errno

import pytest

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.testing.fuse_client import FuseClient, decode_reply, encode_request


def reply(unique: int, payload: bytes = b"", error: int = 0) -> bytes:
    return abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(payload), -error, unique) + payload


def test_request_header() -> None:
    req = encode_request(abi.Opcode.GETATTR, 5, b"body", unique=9, uid=1, gid=2, pid=3)
    header = abi.IN_HEADER.struct.unpack_from(req)
    assert header[:7] == (len(req), abi.Opcode.GETATTR, 9, 5, 1, 2, 3)
    assert req[abi.IN_HEADER.size :] == b"body"


def test_reply_checks() -> None:
    assert decode_reply(reply(4, b"data")) == (0, 4, b"data")
    assert decode_reply(reply(4, error=errno.ENOENT)).error == errno.ENOENT
    with pytest.raises(ValueError, match="no header"):
        decode_reply(b"short")
    with pytest.raises(ValueError, match="header says"):
        decode_reply(reply(4, b"data")[:-1])


def test_client_matches_replies_and_raises_errnos() -> None:
    sent: list[bytes] = []
    answers = [reply(1, b"ok"), reply(2, error=errno.EACCES), reply(7)]

    def transact(request: bytes, reply_size: int) -> bytes:
        sent.append(request)
        return answers.pop(0)

    client = FuseClient(transact, uid=1000, gid=100)
    assert client.call(abi.Opcode.STATFS, 1) == b"ok"
    with pytest.raises(PermissionError):
        client.call(abi.Opcode.STATFS, 1)
    with pytest.raises(ValueError, match="expected 3"):
        client.call(abi.Opcode.STATFS, 1)
    assert [abi.IN_HEADER.struct.unpack_from(r)[4:6] for r in sent] == [(1000, 100)] * 3
