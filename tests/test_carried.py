"""A request that carries its own buffers, as the server takes it."""

from __future__ import annotations

from pyvirtiofsd.carried import Carried
from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.server import Server
from pyvirtiofsd.testing.fuse_client import FuseClient, decode_reply, direct, encode_request
from pyvirtiofsd.virtio.chain import Chain
from tests.memfs import MemFs


def test_the_server_serves_a_carried_request_from_its_four_fields() -> None:
    server = Server(MemFs())
    FuseClient(direct(server)).init()
    getattr_in = abi.GETATTR_IN.pack(0, 0, 0)
    request = encode_request(abi.Opcode.GETATTR, abi.ROOT_ID, getattr_in, unique=7)
    out = bytearray(abi.OUT_HEADER.size + abi.ATTR_OUT.size)
    carried = Carried()
    carried.readable = [memoryview(request)]
    carried.writable = [memoryview(out)]
    carried.readable_len = len(request)
    carried.writable_len = len(out)
    assert server.handle_carried(carried) == len(out)
    error, unique, _ = decode_reply(bytes(out))
    assert (error, unique) == (0, 7)


def test_a_chain_is_a_carried_request() -> None:
    chain = Chain(3, [memoryview(b"ab")], [memoryview(bytearray(5))])
    assert isinstance(chain, Carried)
    assert (chain.readable_len, chain.writable_len) == (2, 5)
