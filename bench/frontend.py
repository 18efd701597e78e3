"""Daemon-alone benchmark: the project's own vhost-user front-end drives pyvirtiofsd and the Rust
virtiofsd 1.14 on one share, with requests shaped as a Linux guest sends them, and reports each
daemon's CPU time per request and its request rate, side by side.

    .venv/bin/python bench/frontend.py                      # every workload, 5 rounds
    .venv/bin/python bench/frontend.py --rounds 3 --seconds 1 --workload read4k
    .venv/bin/python bench/frontend.py --json results.json
    (bench/compare.py runs it with the other benchmarks: see docs/benchmarks.md)

Needs the VM assets for virtiofsd 1.14 (`.ci/install-vm-assets`; `--daemon pyvirtiofsd` runs
without them), and for the compiled column gcc and Python's headers (or a compiled tree).
There is no guest kernel: the front-end is a Python process with its own guest RAM (a memfd)
and split virtqueues, so what is measured is the daemon's own work per request.

Request shapes follow the Linux virtio-fs driver. It puts every argument of a FUSE request in a
scatter-gather element of its own and, once VIRTIO_F_INDIRECT_DESC is negotiated, sends any
chain of more than one element as one indirect table. So a GETATTR is a table of four
descriptors (in header, getattr_in | out header, attr_out); a 1 MiB READ is in header and
read_in, then the out header and 256 page-sized buffers (259 descriptors); a 1 MiB WRITE is in
header, write_in and 256 pages, then out header and write_out (260). The pages of a big request
are scattered through guest RAM, one page apart, as a guest's page cache hands them out, so
nothing can be gained by merging neighbours. ``openclose`` is what a program reading a file
sends (grep over a tree, say): OPEN, a 4 KiB READ, FLUSH and RELEASE, each sent once the one
before is answered, the handle the OPEN answers written into the three after it; its figures
are per request, the four together, and every answer is checked.

The compiled build (mypyc) runs as a third daemon, ``pyvirtiofsd compiled``: the same command
with a compiled tree alone on PYTHONPATH (bench/compiled.py finds or builds it; ``--compiled
DIR`` names one, ``--no-compiled`` leaves it out), measured only once its /proc maps show the
compiled modules loaded.

Each workload runs at queue depth 1 (one request in flight: submit, kick, wait) and 16 (16
chains kept in flight; every completed chain is resubmitted at once). Daemons take turns within
each round (the order alternates between rounds), each for ``--seconds``; the figures are the
medians over ``--rounds``. CPU is the daemon's utime+stime from /proc over the same span.
With ``--profile DIR``, py-spy samples pyvirtiofsd's GIL holder during each of its spans
(``py-spy record --gil --format raw``) and the run ends with where its time went per workload;
the sampling costs CPU, so figures come from runs without it. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import compiled
from common import (
    Progress,
    cpu_seconds,
    prepare_profile,
    print_profile,
    rounds_order,
    start_profiler,
    stop_profiler,
)
from report import CPU_TARGET, LABELS, PY, PYC, VIRTIOFSD, Row, table, write_json_if

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.filesystem import ROOT
from pyvirtiofsd.testing.frontend import DriverQueue, Frontend
from pyvirtiofsd.testing.fuse_client import FuseClient
from pyvirtiofsd.virtio.chain import DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT
from pyvirtiofsd.virtio.chain import VRING_DESC_F_WRITE as WRITE_FLAG
from pyvirtiofsd.vm import assets

PAGE = 4096
FILE_SIZE = 64 << 20
DEPTHS = (1, 16)
QUEUE_SIZE = 1024

#: name -> label; the order of the table.
WORKLOADS = {
    "getattr": "GETATTR",
    "lookup": "LOOKUP",
    "read4k": "4 KiB READ",
    "write4k": "4 KiB WRITE",
    "read1m": "1 MiB READ (259 desc)",
    "write1m": "1 MiB WRITE (260 desc)",
    "openclose": "OPEN, 4 KiB READ, FLUSH, RELEASE",
}
#: The daemons, in their turns' order within a round.
DAEMONS = {d: LABELS[d] for d in (PY, VIRTIOFSD, PYC)}
#: Issue 10: at Q16, at least 0.8x virtiofsd's 4 KiB READs per second.
RATE_TARGET = 0.8
TITLE = "daemon alone: project front-end, guest-shaped chains (CPU per request and rate)"


# --- chains shaped as the guest sends them ------------------------------------------------------


@dataclass
class Shape:
    """One request as the guest lays it out: readable parts (bytes), writable part sizes."""

    readable: list[bytes]
    writable: list[int]
    #: The reply carries a file handle: the fh of the OPEN_OUT in the second writable part.
    fh_out: bool = False
    #: The request names the file handle: the first field of its second readable part.
    fh_in: bool = False


@dataclass
class Files:
    """What the workloads need from the share, found once through a FUSE session."""

    file_ino: int
    fh: int
    name: bytes


def shape(workload: str, files: Files, slot: int, unique: int) -> Shape:
    """The request of ``workload`` for chain ``slot`` (each slot reads its own offsets)."""

    def header(opcode: int, nodeid: int, body_len: int) -> bytes:
        return abi.IN_HEADER.pack(
            abi.IN_HEADER.size + body_len, opcode, unique, nodeid, 0, 0, 1, 0, 0
        )

    pages_1m = (1 << 20) // PAGE
    offset_4k = (slot * 7919 * PAGE) % FILE_SIZE
    offset_1m = (slot << 20) % FILE_SIZE
    if workload == "getattr":
        body = abi.GETATTR_IN.struct.pack(0, 0, 0)
        return Shape([header(abi.Opcode.GETATTR, files.file_ino, len(body)), body], [16, 104])
    if workload == "lookup":
        body = files.name + b"\0"
        return Shape([header(abi.Opcode.LOOKUP, ROOT, len(body)), body], [16, 128])
    if workload in ("read4k", "read1m"):
        size = PAGE if workload == "read4k" else 1 << 20
        offset = offset_4k if workload == "read4k" else offset_1m
        body = abi.READ_IN.struct.pack(files.fh, offset, size, 0, 0, 0, 0)
        count = 1 if workload == "read4k" else pages_1m
        return Shape(
            [header(abi.Opcode.READ, files.file_ino, len(body)), body], [16] + [PAGE] * count
        )
    if workload in ("write4k", "write1m"):
        size = PAGE if workload == "write4k" else 1 << 20
        offset = offset_4k if workload == "write4k" else offset_1m
        body = abi.WRITE_IN.struct.pack(files.fh, offset, size, 0, 0, 0, 0)
        count = size // PAGE
        page = bytes([slot & 0xFF]) * PAGE
        head = header(abi.Opcode.WRITE, files.file_ino, len(body) + size)
        return Shape([head, body] + [page] * count, [16, 8])
    raise ValueError(workload)


def cycle(workload: str, files: Files, slot: int, unique: int) -> list[Shape]:
    """The requests chain ``slot`` sends in turn, each once the one before is answered: one
    for most workloads; for ``openclose`` what a program reading a file sends (OPEN, a 4 KiB
    READ, FLUSH, RELEASE), the handle OPEN answers written into the three after it."""
    if workload != "openclose":
        return [shape(workload, files, slot, unique)]

    def request(opcode: int, body: bytes, writable: list[int], **kw: bool) -> Shape:
        head = abi.IN_HEADER.pack(
            abi.IN_HEADER.size + len(body), opcode, unique, files.file_ino, 0, 0, 1, 0, 0
        )
        return Shape([head, body], writable, **kw)

    offset = (slot * 7919 * PAGE) % FILE_SIZE
    return [
        request(abi.Opcode.OPEN, abi.OPEN_IN.struct.pack(os.O_RDONLY, 0), [16, 16], fh_out=True),
        request(
            abi.Opcode.READ,
            abi.READ_IN.struct.pack(0, offset, PAGE, 0, 0, 0, 0),
            [16, PAGE],
            fh_in=True,
        ),
        request(abi.Opcode.FLUSH, abi.FLUSH_IN.struct.pack(0, 0, 0, slot), [16], fh_in=True),
        request(abi.Opcode.RELEASE, abi.RELEASE_IN.struct.pack(0, 0, 0, 0), [16], fh_in=True),
    ]


def indirect_table(s: Shape, gpas: list[int]) -> bytearray:
    """The indirect table of request ``s`` whose buffers are at ``gpas``, filled as Linux fills
    one (``virtqueue_add_split`` into a table from ``alloc_indirect_split``): entries in order,
    readable first, NEXT on all but the last, and ``next`` = i + 1 in every entry, the last one
    included (where NEXT is clear and the field means nothing)."""
    lengths = [(len(data), 0) for data in s.readable] + [(n, WRITE_FLAG) for n in s.writable]
    table = bytearray(16 * len(lengths))
    for i, ((n, writable), gpa) in enumerate(zip(lengths, gpas, strict=True)):
        more = VRING_DESC_F_NEXT if i + 1 < len(lengths) else 0
        DESC.pack_into(table, 16 * i, gpa, n, writable | more, i + 1)
    return table


class ChainSet:
    """Chains built once in guest RAM, each an indirect table, published again and again: each
    slot's :func:`cycle` in turn, the next once the last is answered.

    Buffers are laid out one page apart (every other page left unused), so no two buffers of a
    chain are adjacent in guest memory."""

    def __init__(self, q: DriverQueue, cycles: list[list[Shape]]) -> None:
        self.q = q
        #: The first chain of each slot, published to start.
        self.heads: list[int] = []
        self.blocks: list[int] = []
        #: head -> the head published when it is answered (itself for a cycle of one).
        self._next: dict[int, int] = {}
        #: head -> where its reply starts (the out header, then the file handle), and where
        #: the slot's next requests take the handle.
        self._fh: dict[int, tuple[int, int, list[int]]] = {}
        #: head -> its reply's out header, for the chains of cycles of several requests, whose
        #: answers are checked: a failed step would have the rest measure error paths.
        self._checked: dict[int, int] = {}
        ram = q.ram
        for steps in cycles:
            heads = []
            fh_out = None
            fh_in = []
            for s in steps:
                count = len(s.readable) + len(s.writable)
                table_gpa = self._alloc(16 * count)
                gpas = [self._alloc(2 * PAGE) for _ in range(count)]
                for gpa, data in zip(gpas, s.readable, strict=False):
                    ram.write(gpa, data)
                ram.write(table_gpa, bytes(indirect_table(s, gpas)))
                head = q.reserve_descs(1)[0]
                q.write_desc(head, table_gpa, 16 * count, VRING_DESC_F_INDIRECT, 0)
                heads.append(head)
                if len(steps) > 1:
                    self._checked[head] = gpas[len(s.readable)]
                if s.fh_out:
                    fh_out = (head, gpas[len(s.readable)], gpas[len(s.readable) + 1])
                if s.fh_in:
                    fh_in.append(gpas[1])
            for i, head in enumerate(heads):
                self._next[head] = heads[(i + 1) % len(heads)]
            if fh_out is not None:
                self._fh[fh_out[0]] = (fh_out[1], fh_out[2], fh_in)
            self.heads.append(heads[0])

    def _alloc(self, size: int) -> int:
        addr = self.q.arena.alloc(size, PAGE)
        self.blocks.append(addr)
        return addr

    def run(self, seconds: float, requests: int | None = None) -> int:
        """Keep every slot's chain in flight for ``seconds``, or until ``requests`` have been
        sent; the requests completed."""
        q = self.q
        poll = select.poll()
        poll.register(q.call_fd, select.POLLIN)
        for head in self.heads:
            q.publish(head, track=False)
        q.kick(force=True)
        done = 0
        deadline = time.perf_counter() + seconds
        outstanding = len(self.heads)
        draining = False
        while outstanding:
            heads = self._reap()
            if not heads:
                if poll.poll(1000):
                    try:
                        os.eventfd_read(q.call_fd)
                    except BlockingIOError:
                        pass
                continue
            done += len(heads)
            if not draining and (
                time.perf_counter() >= deadline
                or (requests is not None and done + outstanding >= requests)
            ):
                draining = True
            if draining:
                outstanding -= len(heads)
                continue
            for head in heads:
                reply = self._checked.get(head)
                if reply is not None:
                    _, error, _ = abi.OUT_HEADER.unpack(q.ram.read(reply, abi.OUT_HEADER.size))
                    if error:
                        raise RuntimeError(f"a bench request failed: {os.strerror(-error)}")
                handle = self._fh.get(head)
                if handle is not None:
                    _, out, takers = handle
                    fh = q.ram.read(out, 8)
                    for gpa in takers:
                        q.ram.write(gpa, fh)
                q.publish(self._next[head], track=False)
            q.kick()
        return done

    def _reap(self) -> list[int]:
        q = self.q
        before = q.last_used
        q.reap()
        heads = list(q.stray_used)
        q.stray_used.clear()
        assert len(heads) == (q.last_used - before) & 0xFFFF
        return [h for h, _ in heads]


# --- daemons ------------------------------------------------------------------------------------


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen[bytes]
    frontend: Frontend
    queue: DriverQueue
    files: Files
    chains: dict[tuple[str, int], ChainSet] = field(default_factory=dict)


def start_daemon(
    name: str,
    share: Path,
    work: Path,
    tree: Path | None = None,
    wrap: list[str] | None = None,
) -> Daemon:
    """Start daemon ``name`` on ``share`` and open the data file through it; ``tree`` is the
    compiled tree that the compiled daemon runs from; ``wrap`` runs it under a tool (valgrind,
    for bench/instructions.py)."""
    sock = str(work / f"{name}.sock")
    env = None
    if name == PY:
        argv = [sys.executable, "-m", "pyvirtiofsd", "--log-level", "error"]
    elif name == PYC:
        if tree is None:
            raise ValueError("the compiled daemon needs a compiled tree")
        argv = [*compiled.command(), "--log-level", "error"]
        env = compiled.environ(tree)
    else:
        command = assets.rust_virtiofsd_command()
        argv = [*command.argv, "--sandbox", "none", "--log-level", "error"]
        env = command.environ()
    argv += ["--socket-path", sock, "--shared-dir", str(share)]
    if wrap:
        if name == VIRTIOFSD:
            argv += ["--seccomp", "none"]  # a filter of its own would refuse the tool's calls
        argv = [*wrap, *argv]
    log = open(work / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the daemon
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + (120 if wrap else 20)
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start: {(work / f'{name}.log').read_text()}")
        time.sleep(0.02)
    frontend = Frontend.connect(sock)
    queues = frontend.setup(
        queues=(0, 1), queue_size=QUEUE_SIZE, ram_size=512 << 20, arena_size=160 << 20
    )
    q = queues[1]
    client = FuseClient(lambda req, size: q.request([req], [size] if size else [], timeout=20))
    client.init()
    entry = client.lookup(ROOT, b"data")
    opened = client.open(entry.nodeid, os.O_RDWR)
    files = Files(entry.nodeid, opened.fh, b"data")
    if name == PYC:
        assert tree is not None
        compiled.check_running(proc.pid, tree)  # before any figure is trusted
    return Daemon(name, proc, frontend, q, files)


def stop_daemon(d: Daemon) -> None:
    d.frontend.close()
    try:
        d.proc.wait(10)
    except subprocess.TimeoutExpired:
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(10)


def measure(d: Daemon, workload: str, depth: int, seconds: float) -> tuple[float, float]:
    """(µs of daemon CPU per request, requests per second) for one span."""
    chains = d.chains.get((workload, depth))
    if chains is None:
        # Built once and kept: every round publishes the same chains again.
        cycles = [cycle(workload, d.files, slot, 1000 + slot) for slot in range(depth)]
        chains = d.chains[(workload, depth)] = ChainSet(d.queue, cycles)
    cpu0 = cpu_seconds(d.proc.pid)
    t0 = time.perf_counter()
    count = chains.run(seconds)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(d.proc.pid) - cpu0
    return cpu / count * 1e6, count / wall


# --- the run -----------------------------------------------------------------------------------


def rows_for(workloads: list[str]) -> list[Row]:
    """Two rows per workload and depth: CPU per request, and requests per second."""
    rows = []
    for w in workloads:
        for depth in DEPTHS:
            rows.append(
                Row("frontend", f"{w}-q{depth}-cpu", f"{WORKLOADS[w]} Q{depth} CPU", "us/req",
                    "lower", VIRTIOFSD, CPU_TARGET)
            )  # fmt: skip
            rate_target = RATE_TARGET if (w, depth) == ("read4k", 16) else None
            rows.append(
                Row("frontend", f"{w}-q{depth}-rate", f"{WORKLOADS[w]} Q{depth} rate", "req/s",
                    "higher", VIRTIOFSD, rate_target)
            )  # fmt: skip
    return rows


def plan(progress: Progress, workloads: list[str], names: list[str], rounds: int,
         seconds: float) -> None:  # fmt: skip
    for r in range(rounds):
        for w in workloads:
            for depth in DEPTHS:
                for n in names:
                    progress.plan(
                        f"frontend/{r}/{n}/{w}/{depth}", f"frontend/{n}/{w}/{depth}", seconds + 0.3
                    )


def run(
    workloads: list[str],
    names: list[str],
    rounds: int,
    seconds: float,
    progress: Progress,
    profile: Path | None = None,
    tree: Path | None = None,
) -> list[Row]:
    """Every workload at each depth on each daemon, in interleaved rounds; the rows.

    Call :func:`plan` with the same arguments first so that the progress line knows the run.
    With ``profile`` (a directory), py-spy samples pyvirtiofsd during each of its spans;
    ``tree`` is the compiled tree, needed when ``names`` has the compiled daemon."""
    rows = {r.key: r for r in rows_for(workloads)}
    with tempfile.TemporaryDirectory(prefix="pyvirtiofsd-frontend-bench-") as tmp:
        work = Path(tmp)
        share = work / "share"
        share.mkdir()
        with open(share / "data", "wb") as f:
            f.truncate(FILE_SIZE)
            f.write(os.urandom(1 << 20) * (FILE_SIZE >> 20))
        daemons: list[Daemon] = []
        try:
            for n in names:
                daemons.append(start_daemon(n, share, work, tree))
            for r in range(rounds):
                for w in workloads:
                    for depth in DEPTHS:
                        for d in rounds_order(daemons, r):
                            key = f"frontend/{r}/{d.name}/{w}/{depth}"
                            progress.start(
                                key,
                                f"front-end bench, round {r + 1}/{rounds}: {DAEMONS[d.name]}, "
                                f"{WORKLOADS[w]} at depth {depth}",
                            )
                            spy = None
                            if profile is not None and d.name == PY:
                                out = profile / f"frontend-{w}-q{depth}-r{r}.txt"
                                spy = start_profiler(d.proc.pid, out, gil=True)
                            try:
                                us, rate = measure(d, w, depth, seconds)
                            finally:
                                if spy is not None:
                                    stop_profiler(spy)
                            progress.finish(key)
                            rows[f"{w}-q{depth}-cpu"].add(d.name, us)
                            rows[f"{w}-q{depth}-rate"].add(d.name, rate)
        finally:
            for d in daemons:
                stop_daemon(d)
    return list(rows.values())


def print_profiles(directory: Path | None, workloads: list[str]) -> None:
    """Where pyvirtiofsd's time went, per workload and depth (after a run with a profile)."""
    for w in workloads:
        for depth in DEPTHS:
            print_profile(directory, f"frontend-{w}-q{depth}-*.txt", f"{WORKLOADS[w]} Q{depth}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="per daemon, workload and round")
    p.add_argument("--workload", action="append", choices=list(WORKLOADS))
    p.add_argument("--daemon", action="append", choices=list(DAEMONS))
    p.add_argument("--json", type=Path, help="write the results here (docs/benchmarks.md)")
    compiled.add_arguments(p)
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample pyvirtiofsd with py-spy (GIL holder) into DIR and print where its time went",
    )
    args = p.parse_args()
    workloads = args.workload or list(WORKLOADS)
    names, tree, why_not = compiled.select(args, args.daemon or list(DAEMONS), PYC)
    progress = Progress()
    plan(progress, workloads, names, args.rounds, args.seconds)
    profile = prepare_profile(args.profile)
    path = tree.path if tree else None
    rows = run(workloads, names, args.rounds, args.seconds, progress, profile, path)
    progress.close()
    print(table(rows, {"frontend": TITLE}))
    print(f"medians of {args.rounds} rounds of {args.seconds:g} s per daemon and workload")
    print_profiles(profile, workloads)
    write_json_if(args.json, rows, "frontend", vars(args), tree, why_not)


if __name__ == "__main__":
    main()
