"""The test device's handler, and its ``python -m`` entry point serving a front-end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pyvirtiofsd.testing.frontend import Frontend
from pyvirtiofsd.testing.testdevice import UppercaseDevice
from pyvirtiofsd.virtio.chain import Chain


def _chain(readable: list[bytes], writable: list[bytearray]) -> Chain:
    return Chain(0, [memoryview(b) for b in readable], [memoryview(b) for b in writable])


def test_upper_cases_into_the_writable_buffers() -> None:
    handle = UppercaseDevice().handler(1)
    out = [bytearray(3), bytearray(10)]
    assert handle(_chain([b"hello, ", b"world"], out)) == 12
    assert bytes(out[0] + out[1]) == b"HELLO, WORLD\0"
    small = bytearray(4)
    assert handle(_chain([b"truncated"], [small])) == 4 and small == b"TRUN"
    assert handle(_chain([b"!forget"], [bytearray(8)])) == 0


def test_served_with_python_m(tmp_path: Path) -> None:
    sock = str(tmp_path / "dev.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvirtiofsd.testing.testdevice", sock, "--queues", "2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        with Frontend.connect(sock) as fe:
            q = fe.setup(queues=(1,), queue_size=16)[1]
            assert q.request([b"over the socket"], [32]) == b"OVER THE SOCKET"
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert out.startswith("served [0, 1]")
