"""Random mutations of well-formed requests against the passthrough: every one gets a well-formed
reply (or none, where FUSE has none), nothing raises, nothing outside the share changes."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.backends.passthrough import PassthroughConfig, PassthroughFs
from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.filesystem import ROOT
from pyvirtiofsd.fuse.server import Server
from pyvirtiofsd.testing.fuse_client import FuseClient, decode_reply, direct, encode_request


def _seeds(fh: int, ino: int, dir_fh: int) -> list[tuple[int, int, bytes]]:
    z = b"\0"
    return [
        (abi.Opcode.LOOKUP, ROOT, b"file" + z),
        (abi.Opcode.GETATTR, ino, abi.GETATTR_IN.pack(0, 0, 0)),
        (abi.Opcode.SETATTR, ino, abi.SETATTR_IN.pack(valid=abi.FATTR_SIZE, size=3)),
        (abi.Opcode.MKDIR, ROOT, abi.MKDIR_IN.pack(0o755, 0) + b"d" + z),
        (abi.Opcode.SYMLINK, ROOT, b"l" + z + b"/etc/passwd" + z),
        (abi.Opcode.RENAME2, ROOT, abi.RENAME2_IN.pack(ROOT, 0, 0) + b"file" + z + b"f2" + z),
        (abi.Opcode.LINK, ROOT, abi.LINK_IN.pack(ino) + b"hard" + z),
        (
            abi.Opcode.CREATE,
            ROOT,
            abi.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o644, 0, 0) + b"c" + z,
        ),
        (abi.Opcode.READ, ino, abi.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0)),
        (abi.Opcode.WRITE, ino, abi.WRITE_IN.pack(fh, 0, 5, 0, 0, 0, 0) + b"hello"),
        (abi.Opcode.READDIRPLUS, ROOT, abi.READ_IN.pack(dir_fh, 0, 4096, 0, 0, 0, 0)),
        (abi.Opcode.SETXATTR, ino, abi.SETXATTR_IN.pack(3, 0, 0, 0) + b"user.x" + z + b"abc"),
        (abi.Opcode.GETXATTR, ino, abi.GETXATTR_IN.pack(100, 0) + b"user.x" + z),
        (abi.Opcode.SETLK, ino, abi.LK_IN.pack(fh, 7, 0, 10, 1, 1, 0, 0)),
        (abi.Opcode.FALLOCATE, ino, abi.FALLOCATE_IN.pack(fh, 0, 4096, 0, 0)),
        (abi.Opcode.LSEEK, ino, abi.LSEEK_IN.pack(fh, 0, 3, 0)),
        (abi.Opcode.BATCH_FORGET, 0, abi.BATCH_FORGET_IN.pack(1, 0) + abi.FORGET_ONE.pack(ino, 1)),
        (abi.Opcode.UNLINK, ROOT, b"c" + z),
        (abi.Opcode.STATFS, ROOT, b""),
    ]


@pytest.fixture
def small_share(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs: a mutated FALLOCATE or WRITE may ask for terabytes, and gets ENOSPC."""
    if os.geteuid() != 0:
        pytest.skip("mounting the tmpfs needs root")
    share = tmp_path / "share"
    share.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(share)], check=True)
    try:
        yield share
    finally:
        subprocess.run(["umount", "-l", str(share)], check=False)


def test_mutated_requests(tmp_path: Path, small_share: Path) -> None:
    share = small_share
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (share / "file").write_text("data")
    fs = PassthroughFs(PassthroughConfig(str(share), xattr=True))
    server = Server(fs)
    client = FuseClient(direct(server))
    client.init()
    ino = client.lookup(ROOT, b"file").nodeid
    fh = client.open(ino, os.O_RDWR).fh
    dir_fh = client.opendir(ROOT).fh
    seeds = _seeds(fh, ino, dir_fh)
    rng = random.Random(20261122)
    ok_count = 0
    for i in range(4000):
        opcode, nodeid, payload = rng.choice(seeds)
        request = bytearray(encode_request(opcode, nodeid, payload, unique=i + 1))
        for _ in range(rng.randint(1, 4)):
            kind = rng.random()
            if kind < 0.5 and request:
                request[rng.randrange(len(request))] = rng.randrange(256)
            elif kind < 0.7:
                del request[rng.randrange(len(request) + 1) :]
            elif kind < 0.85:
                request += os.urandom(rng.randint(1, 64))
            else:
                pos = rng.randrange(len(request) + 1)
                request[pos:pos] = b"\0/..\0"[: rng.randint(1, 5)]
        out = bytearray(8192)
        n = server.handle([memoryview(bytes(request))], [memoryview(out)])
        assert n >= 0
        if n:
            length, error, _ = abi.OUT_HEADER.unpack(out)[:3]
            assert length == n and -4095 <= error <= 0
            decode_reply(bytes(out[:n]))
            ok_count += error == 0
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_text() == "secret"
    for dirpath, _, files in os.walk(share):
        for name in files:
            assert not os.path.realpath(os.path.join(dirpath, name)).startswith(str(outside))
    assert ok_count > 100  # mutations that stayed valid were served
    # still serving
    assert client.getattr(ROOT).mode
    fs.shutdown()
