"""Host /dev/fuse benchmark: pyvirtiofsd's mount beside the plain source directory and libfuse's
passthrough_ll example, in one run.

    sudo .venv/bin/python bench/fusedev.py [--size-mib 512] [--files 2000] [--rounds 3]

Needs root, /dev/fuse, gcc and Debian's libfuse3-dev (whose examples include passthrough_ll.c);
the example is compiled once into the cache directory. The daemon is mounted plainly, with
--fuse-passthrough, and as the compiled build (mypyc: the same command with a compiled tree
alone on PYTHONPATH, found or built by bench/compiled.py; ``--compiled DIR`` names one,
``--no-compiled`` leaves it out; measured only once its /proc maps show the compiled modules
loaded); the source directory itself is measured too, as the ceiling. The targets
take turns within each round (the order reversed every other round), each on a fresh mount of
a new, empty ext4 file system (common.fresh_share); figures are MB/s and operations/s,
medians of ``--rounds``, with each daemon's CPU seconds per workload in the JSON. Nothing here
asserts on speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import compiled
from common import (
    BLOCK,
    SHARE_DIR,
    SHARE_FS,
    Progress,
    cpu_seconds,
    drop_caches,
    fresh_share,
    fresh_share_possible,
    rounds_order,
    seq_write,
)
from report import LABELS, PY, PYC, THROUGHPUT_TARGET, Row, label, table, write_json_if

CACHE = Path(os.environ.get("PYVIRTIOFSD_CACHE", "/var/cache/pyvirtiofsd"))
EXAMPLE = Path("/usr/share/doc/libfuse3-dev/examples/passthrough_ll.c")


def seq_read(root: Path, size_mib: int) -> float:
    drop_caches()
    buf = bytearray(BLOCK)
    t = time.perf_counter()
    fd = os.open(root / "seq", os.O_RDONLY)
    while os.readv(fd, [buf]):
        pass
    os.close(fd)
    return size_mib * BLOCK / 1e6 / (time.perf_counter() - t)


def rand_read_4k(root: Path, size_mib: int) -> float:
    """4 KiB reads at random offsets of the (now cached) file, in IOPS."""
    import random

    rng = random.Random(1)
    blocks = size_mib * 256
    count = 20000
    fd = os.open(root / "seq", os.O_RDONLY)
    offsets = [rng.randrange(blocks) * 4096 for _ in range(count)]
    t = time.perf_counter()
    for off in offsets:
        os.pread(fd, 4096, off)
    os.close(fd)
    return count / (time.perf_counter() - t)


def metadata(root: Path, files: int) -> float:
    d = root / "meta"
    d.mkdir(exist_ok=True)
    names = [d / f"f{i}" for i in range(files)]
    t = time.perf_counter()
    for p in names:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
    for p in names:
        os.stat(p)
    for p in names:
        os.unlink(p)
    return 3 * files / (time.perf_counter() - t)


def wait_mounted(mnt: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not os.path.ismount(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args} did not mount")
        time.sleep(0.05)


@contextmanager
def mounted(
    cmd: list[str], mnt: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_mounted(mnt, proc)
        yield proc
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def passthrough_ll() -> Path:
    binary = CACHE / "bench" / "passthrough_ll"
    if not binary.exists():
        if not EXAMPLE.exists():
            raise SystemExit("passthrough_ll.c not found: apt-get install libfuse3-dev")
        binary.parent.mkdir(parents=True, exist_ok=True)
        flags = subprocess.run(
            ["pkg-config", "fuse3", "--cflags", "--libs"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(EXAMPLE), *flags], check=True)
    return binary


REFERENCE = "passthrough_ll"
#: passthrough_ll mounted as pyvirtiofsd mounts itself (default_permissions; allow_other only
#: with --allow-other, which changes no request): the kernel then checks permissions from
#: cached attributes, and asks a directory's attributes again after each change in it (two
#: GETATTRs more per created and removed file), so both daemons get the same requests. Shown
#: beside the others, for context.
REFERENCE_DP = "passthrough_ll -o default_permissions"
SOURCE = "source dir"
PY_PASSTHROUGH = "pyvirtiofsd --fuse-passthrough"
#: The compiled build taking requests through FUSE over io_uring (fuse's enable_uring parameter
#: is set for the run, and put back after).
PYC_URING = "pyvirtiofsd compiled --fuse-io-uring"
COMPILED_TARGETS = (PYC, PYC_URING)
LABELS[PYC_URING] = "pyvirtiofsd (mypyc) --fuse-io-uring"
ENABLE_URING = Path("/sys/module/fuse/parameters/enable_uring")
LABELS[REFERENCE] = "passthrough_ll (libfuse)"
LABELS[REFERENCE_DP] = "passthrough_ll, our mount options"
TITLE = "host: /dev/fuse mount, beside libfuse's passthrough_ll"
#: Targets, in the order they take turns within a round; the source directory is no mount.
TARGETS = [SOURCE, PY, PY_PASSTHROUGH, PYC, PYC_URING, REFERENCE, REFERENCE_DP]


@dataclass
class Options:
    rounds: int = 3
    size_mib: int = 512
    files: int = 2000
    targets: list[str] = field(default_factory=lambda: list(TARGETS))


#: (key, label, unit, issue 10's target (target 4) or None)
WORKLOADS = [
    ("seqwrite", "seq write 1M", "MB/s", None),
    ("seqread", "seq read 1M (cold)", "MB/s", None),
    ("randread", "rand read 4K (cached)", "IOPS", THROUGHPUT_TARGET),
    ("meta", "create+stat+unlink", "ops/s", THROUGHPUT_TARGET),
]


def workload_fns(opts: Options) -> dict[str, Callable[[Path], float]]:
    return {
        "seqwrite": lambda r: seq_write(r, opts.size_mib),
        "seqread": lambda r: seq_read(r, opts.size_mib),
        "randread": lambda r: rand_read_4k(r, opts.size_mib),
        "meta": lambda r: metadata(r, opts.files),
    }


def command(target: str, src: Path, mnt: Path) -> list[str]:
    if target == REFERENCE:
        return [str(passthrough_ll()), "-f", "-o", f"source={src}", str(mnt)]
    if target == REFERENCE_DP:
        return [
            str(passthrough_ll()),
            "-f",
            "-o",
            f"source={src},default_permissions",
            str(mnt),
        ]
    if target in COMPILED_TARGETS:
        argv = [*compiled.command(), "--log-level", "error"]
    else:
        argv = [sys.executable, "-m", "pyvirtiofsd", "--log-level", "error"]
    if target == PY_PASSTHROUGH:
        argv.append("--fuse-passthrough")
    if target == PYC_URING:
        argv.append("--fuse-io-uring")
    return [*argv, "--shared-dir", str(src), "--mount", str(mnt)]


def plan(progress: Progress, opts: Options) -> None:
    # A guess from the figures in docs/benchmarks.md; the first round corrects it.
    prior = 2 + opts.size_mib / 300 + opts.files / 1000
    for r in range(opts.rounds):
        for t in opts.targets:
            progress.plan(f"fusedev/{r}/{t}", f"fusedev/{t}", prior, "fusedev")


def run(opts: Options, progress: Progress, tree: Path | None = None) -> list[Row]:
    """Interleaved rounds: in each, every target in turn, mounted afresh on a new, empty file
    system (:func:`common.fresh_share`), runs every workload once. The rows hold the medians.
    ``tree`` is the compiled tree, needed when the targets have the compiled daemon."""
    if os.geteuid() != 0:
        raise RuntimeError("run as root (mounts FUSE, drops caches)")
    if any(t in opts.targets for t in COMPILED_TARGETS) and tree is None:
        raise ValueError("the compiled daemon needs a compiled tree")
    if PYC_URING in opts.targets and not ENABLE_URING.exists():
        print(f"NOT MEASURED: {label(PYC_URING)}: this kernel has no FUSE over io_uring")
        opts.targets.remove(PYC_URING)
    if REFERENCE in opts.targets or REFERENCE_DP in opts.targets:
        passthrough_ll()  # compile it before anything is timed
    rows = {
        key: Row(
            "fusedev", key, text, unit, "higher", REFERENCE, target, context=(REFERENCE_DP, SOURCE)
        )
        for key, text, unit, target in WORKLOADS
    }
    fns = workload_fns(opts)
    base = Path(tempfile.mkdtemp(prefix="pyvirtiofsd-bench-"))
    uring_was = ENABLE_URING.read_text().strip() if PYC_URING in opts.targets else None
    try:
        if uring_was is not None:
            # Only a daemon that asks at INIT gets io_uring: the other targets are unchanged.
            ENABLE_URING.write_text("Y")
        for r in range(opts.rounds):
            for target in rounds_order(opts.targets, r):
                key = f"fusedev/{r}/{target}"
                text = f"/dev/fuse bench, round {r + 1}/{opts.rounds}: {label(target)}"
                progress.start(key, text)
                mnt = base / "mnt"
                mnt.mkdir(exist_ok=True)
                with fresh_share(base / f"src-{r}-{opts.targets.index(target)}") as src:
                    if target == SOURCE:
                        for w, fn in fns.items():
                            rows[w].add(target, fn(src))
                    else:
                        is_compiled = target in COMPILED_TARGETS
                        env = compiled.environ(tree) if is_compiled and tree else None
                        with mounted(command(target, src, mnt), mnt, env) as proc:
                            if is_compiled and tree is not None:
                                compiled.check_running(proc.pid, tree)  # before any figure
                            for w, fn in fns.items():
                                before = cpu_seconds(proc.pid)
                                value = fn(mnt)
                                rows[w].add(target, value, cpu_s=cpu_seconds(proc.pid) - before)
                progress.finish(key)
    finally:
        if uring_was is not None:
            ENABLE_URING.write_text(uring_was)
        shutil.rmtree(base, ignore_errors=True)
    return list(rows.values())


def main() -> None:
    defaults = Options()
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size-mib", type=int, default=defaults.size_mib)
    ap.add_argument("--files", type=int, default=defaults.files)
    ap.add_argument(
        "--rounds",
        type=int,
        default=defaults.rounds,
        help=f"interleaved rounds; figures are medians (default {defaults.rounds})",
    )
    ap.add_argument("--json", type=Path, help="write the results here (docs/benchmarks.md)")
    compiled.add_arguments(ap)
    args = ap.parse_args()
    opts = Options(args.rounds, args.size_mib, args.files)
    tree, why_not = compiled.resolve(args)
    if tree is None:
        opts.targets = [t for t in opts.targets if t not in COMPILED_TARGETS]
    progress = Progress()
    plan(progress, opts)
    try:
        result = run(opts, progress, tree.path if tree else None)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    progress.close()
    print(table(result, {"fusedev": TITLE}))
    print(f"shares: {SHARE_FS if fresh_share_possible() else SHARE_DIR}")
    write_json_if(args.json, result, "fusedev", vars(args), tree, why_not)


if __name__ == "__main__":
    main()
