"""Micro-benchmark of :meth:`Server.handle` alone: a GETATTR and a 4 KiB READ against the
passthrough on a scratch directory, through the in-process ``direct`` path (no transport).

    PYTHONPATH=src .venv/bin/python bench/server_handle.py [--requests 20000] [--repeat 7]

Prints microseconds per request, the best of ``--repeat`` rounds. Run it against two trees
(interleaved, on a quiet machine) to see what a change to the request path costs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import timeit

from pyvirtiofsd.backends.passthrough import PassthroughConfig, PassthroughFs
from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.server import Server
from pyvirtiofsd.testing.fuse_client import FuseClient, direct, encode_request


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    share = tempfile.mkdtemp(prefix="pyvirtiofsd-bench-")
    try:
        with open(os.path.join(share, "f"), "wb") as f:
            f.write(os.urandom(1 << 16))
        fs = PassthroughFs(PassthroughConfig(shared_dir=share))
        server = Server(fs)
        client = FuseClient(direct(server))
        client.init()
        node = client.lookup(abi.ROOT_ID, b"f").nodeid
        fh = client.open(node).fh
        requests = {
            "GETATTR": encode_request(abi.Opcode.GETATTR, node, abi.GETATTR_IN.pack(0, 0, 0)),
            "READ 4K": encode_request(
                abi.Opcode.READ, node, abi.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0)
            ),
        }
        out = [memoryview(bytearray(abi.OUT_HEADER.size + 4096))]
        handle = server.handle
        for name, raw in requests.items():
            request = [memoryview(raw)]
            assert handle(request, out) > abi.OUT_HEADER.size
            best = min(
                timeit.repeat(
                    lambda request=request: handle(request, out),
                    number=args.requests,
                    repeat=args.repeat,
                )
            )
            print(f"{name}: {best / args.requests * 1e6:.2f} us/request")
        fs.shutdown()
    finally:
        shutil.rmtree(share, ignore_errors=True)


if __name__ == "__main__":
    main()
