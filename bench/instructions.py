"""Instructions per request, counted by valgrind: figures a noisy machine can't blur.

    sudo .venv/bin/python bench/instructions.py [--workload getattr] [--depth 16] [--requests 4000]

Each daemon serves the project front-end's guest-shaped requests (those of bench/frontend.py) under
valgrind's cachegrind, which counts every instruction it runs in user space. It runs twice per
workload, serving a few requests and then ``--requests`` more after the same start; the
difference, divided by the extra requests, is the instructions per request, without start-up and
shutdown. The count is the same from run to run, whatever else the machine does, so it shows
what a change to the request path saves where CPU time (bench/frontend.py) varies by a third
between runs. It leaves out what the kernel does for the daemon (system calls, scheduling),
which CPU time counts: issue 10's targets stay in CPU time, and this is the instrument for the
code between the system calls. Under valgrind the daemon runs some fifty times slower, so a
queue of 16 is always full; at Q1 every request wakes it. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import compiled
import frontend
from common import Progress
from report import LABELS, PY, PYC, VIRTIOFSD, Row, table, write_json_if

TITLE = "daemon alone, under valgrind: user-space instructions per request"
#: Requests served in the short run, whose count is taken from the long one's.
BASE = 500
_REFS = re.compile(rb"I\s+refs:\s+([\d,]+)")
#: Counting instructions only: no cache simulation, no output file.
VALGRIND = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]


def count(name: str, workload: str, depth: int, requests: int, tree: Path | None) -> int:
    """Instructions the daemon ran in all, serving ``requests`` requests of ``workload``."""
    work = Path(tempfile.mkdtemp(prefix="pyvirtiofsd-bench-"))
    try:
        share = work / "share"
        share.mkdir()
        (share / "data").write_bytes(os.urandom(frontend.FILE_SIZE))
        d = frontend.start_daemon(name, share, work, tree, VALGRIND)
        try:
            cycles = [frontend.cycle(workload, d.files, s, 1000 + s) for s in range(depth)]
            frontend.ChainSet(d.queue, cycles).run(float("inf"), requests)
        finally:
            frontend.stop_daemon(d)
        found = _REFS.search((work / f"{name}.log").read_bytes())
        if found is None:
            raise RuntimeError(f"{name}: valgrind gave no count")
        return int(found.group(1).replace(b",", b""))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workload", action="append", choices=list(frontend.WORKLOADS))
    p.add_argument("--daemon", action="append", choices=[PY, VIRTIOFSD, PYC])
    p.add_argument("--depth", type=int, action="append", choices=frontend.DEPTHS)
    p.add_argument("--requests", type=int, default=4000, help="counted requests per run")
    p.add_argument("--json", type=Path, help="write the results here")
    compiled.add_arguments(p)
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind not found: apt-get install valgrind")
    if args.requests <= 0:
        p.error("--requests must be positive")
    workloads = args.workload or ["getattr", "lookup", "read4k", "write4k"]
    depths = args.depth or [16]
    names, tree, why_not = compiled.select(args, args.daemon or [PY, VIRTIOFSD, PYC], PYC)
    path = tree.path if tree else None
    progress = Progress()
    for w in workloads:
        for depth in depths:
            for n in names:
                progress.plan(f"instr/{n}/{w}/{depth}", f"instr/{n}", 60.0)
    rows = []
    for w in workloads:
        for depth in depths:
            row = Row(
                "instructions",
                f"{w}-q{depth}-instructions",
                f"{frontend.WORKLOADS[w]} Q{depth}",
                "instr/req",
                "lower",
                VIRTIOFSD,
            )
            for n in names:
                key = f"instr/{n}/{w}/{depth}"
                progress.start(key, f"{LABELS[n]}: {frontend.WORKLOADS[w]} at depth {depth}")
                short = count(n, w, depth, BASE, path)
                long = count(n, w, depth, BASE + args.requests, path)
                row.add(n, (long - short) / args.requests)
                progress.finish(key)
            rows.append(row)
    progress.close()
    print(table(rows, {"instructions": TITLE}))
    write_json_if(args.json, rows, "instructions", vars(args), tree, why_not)


if __name__ == "__main__":
    main()
