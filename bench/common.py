"""Pieces the benchmarks share: host helpers, the progress line and py-spy profiles.

The scripts in bench/ run as scripts (bench/ is then on sys.path) and import each other as
modules; `compare.py` drives several of them in one run. Nothing here asserts on speed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

BLOCK = 1 << 20


def drop_caches() -> None:
    """Write back and drop the host's page cache, so that the next read goes to the daemon."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def seq_write(root: Path, size_mib: int) -> float:
    """Write ``size_mib`` MiB to root/seq in 1 MiB writes, fsync; MB/s."""
    data = os.urandom(BLOCK)
    t = time.perf_counter()
    fd = os.open(root / "seq", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    for _ in range(size_mib):
        os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    return size_mib * BLOCK / 1e6 / (time.perf_counter() - t)


#: How big (MiB) the file system of a share is: a sparse image, room for the largest workload
#: (the /dev/fuse bench's 512 MiB file, the source tree three times over) with a margin.
SHARE_FS_MIB = 4096
#: What the shares lie on, as the tables and the JSON say it.
SHARE_FS = "a fresh ext4 file system for each daemon's session (a loop device over a sparse file)"
SHARE_DIR = "a new directory on the host's own file system (not root: no fresh ext4)"


def fresh_share_possible() -> bool:
    """Whether :func:`fresh_share` can give a file system of its own (root, e2fsprogs)."""
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("mkfs.ext4", "losetup"))


@contextmanager
def fresh_share(directory: Path, size_mib: int = SHARE_FS_MIB) -> Iterator[Path]:
    """``directory``, made here, as the root of a new ext4 file system that goes away after.

    A share on the host's own file system inherits what earlier sessions left there: ext4
    does not reuse an inode freed in the last minutes, so once a benchmark has deleted a few
    thousand files every create in that block group searches past them, and a create costs
    whichever daemon runs next many times what it costs on a fresh one (the kernel's work,
    counted as the daemon's CPU). A fresh file system for each session gives every daemon the
    same start. It needs root and e2fsprogs (:func:`fresh_share_possible`); without them the
    share is a plain directory, as :data:`SHARE_DIR` says.
    """
    directory.mkdir(parents=True)
    if not fresh_share_possible():
        yield directory
        return
    image = directory.with_name(directory.name + ".ext4")
    try:
        with image.open("wb") as f:
            f.truncate(size_mib << 20)
        # Inode tables and journal written now, not by a kernel thread during the benchmark.
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)],
            check=True,
        )
        # Direct I/O to the image: its pages are not cached twice, once over the loop device
        # and once in the image file.
        loop = subprocess.run(
            ["losetup", "--find", "--show", "--direct-io=on", str(image)],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        try:
            subprocess.run(["mount", loop, str(directory)], check=True)
            try:
                (directory / "lost+found").rmdir()  # not part of any workload
                yield directory
            finally:
                subprocess.run(["umount", str(directory)], check=False)
        finally:
            subprocess.run(["losetup", "--detach", loop], check=False)
    finally:
        image.unlink(missing_ok=True)


def rounds_order(daemons: list[str], round_index: int) -> list[str]:
    """The daemons' turn order in a round: reversed every other round, so that neither always
    goes first (a change in the machine's load over a run then favours neither)."""
    return daemons if round_index % 2 == 0 else daemons[::-1]


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class LoadSampler:
    """The host's 1-minute load average, sampled every ``interval`` seconds while a run goes
    on (a thread), so that the figures can say how busy the machine was meanwhile."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, float]:
        s = self.samples or [os.getloadavg()[0]]
        return {"min": min(s), "median": statistics.median(s), "max": max(s)}


@dataclass
class _Step:
    key: str
    group: str  # steps of one group take about as long as each other (same daemon, workload)
    family: str  # a wider group (the same workload on any daemon), the next best guess
    prior: float  # the guess until a step of its group or family has run
    done: bool = False


class Progress:
    """One status line: what runs now (part, daemon, workload) and about how long is left.

    A run plans its steps first, each with a guessed duration; the guess for a step is replaced
    by what the last finished step of its group took (the same workload on the same daemon in
    an earlier round), or failing that of its family (the same workload on another daemon).
    On a terminal the line is rewritten in place; otherwise each step gets a line of its own,
    so that a log shows the run's course.
    """

    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self._steps: dict[str, _Step] = {}
        self._actual: dict[str, float] = {}
        self._current: tuple[str, float] | None = None
        self._started = time.monotonic()

    def plan(self, key: str, group: str, prior: float, family: str | None = None) -> None:
        self._steps[key] = _Step(key, group, family or group, prior)

    def abandon(self, prefix: str) -> None:
        """Forget the steps not run yet under ``prefix`` (a part that failed)."""
        if self._current is not None and self._current[0].startswith(prefix):
            self._current = None
        for key in [k for k, s in self._steps.items() if k.startswith(prefix) and not s.done]:
            del self._steps[key]

    def start(self, key: str, text: str) -> None:
        if self._current is not None:
            self.finish(self._current[0])
        self._current = (key, time.monotonic())
        self._show(text)

    def finish(self, key: str) -> None:
        if self._current is None or self._current[0] != key:
            return
        step = self._steps.get(key)
        if step is not None:
            step.done = True
            took = time.monotonic() - self._current[1]
            self._actual[step.group] = self._actual[step.family] = took
        self._current = None

    def left(self) -> float:
        total = 0.0
        for step in self._steps.values():
            if not step.done:
                total += self._guess(step)
        if self._current is not None:
            total -= min(
                time.monotonic() - self._current[1],
                self._estimate(self._current[0]),
            )
        return max(total, 0.0)

    def _guess(self, step: _Step) -> float:
        return self._actual.get(step.group, self._actual.get(step.family, step.prior))

    def _estimate(self, key: str) -> float:
        step = self._steps.get(key)
        return 0.0 if step is None else self._guess(step)

    def _show(self, text: str) -> None:
        if self.quiet:
            return
        elapsed = format_seconds(time.monotonic() - self._started)
        line = f"[{elapsed}] {text}; ~{format_seconds(self.left())} left"
        if self.tty:
            self.stream.write(f"\r\x1b[K{line}")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._current is not None:
            self.finish(self._current[0])
        if self.tty and not self.quiet:
            self.stream.write(
                f"\r\x1b[Kdone in {format_seconds(time.monotonic() - self._started)}\n"
            )
            self.stream.flush()


# --- py-spy: where pyvirtiofsd's time goes ------------------------------------------------------


def prepare_profile(directory: Path | None) -> Path | None:
    """The directory for py-spy's stack files (made if missing), or None: no profiling."""
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    return directory


def start_profiler(pid: int, out: Path, *, gil: bool = False) -> subprocess.Popen[bytes]:
    """py-spy sampling a running daemon (without pausing it) into a raw stack file. With
    ``gil`` only the thread holding the GIL is sampled: where the Python work goes."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    argv = [spy, "record", "--pid", str(pid), "--rate", "250", "--nonblocking",
            "--format", "raw", "--output", str(out)]  # fmt: skip
    if gil:
        argv.append("--gil")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes its file on the way out
    try:
        spy.wait(60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


_LINE_NO = re.compile(r":\d+\)$")


def profile_summary(files: Sequence[Path], top: int = 15) -> list[str]:
    """The functions where the sampled daemon spent its time, from py-spy's raw stacks: the
    share of samples with the function on top of the stack (self) and anywhere in it."""
    own: dict[str, int] = {}
    anywhere: dict[str, int] = {}
    total = 0
    for f in files:
        if not f.exists():
            continue
        for line in f.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = [_LINE_NO.sub(")", fr) for fr in stack.split(";")]
            # py-spy puts the process and the thread first; they are not functions.
            frames = [fr for fr in frames if not fr.startswith(("process ", "thread "))]
            if not frames:
                continue
            n = int(count)
            total += n
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for fr in set(frames):
                anywhere[fr] = anywhere.get(fr, 0) + n
    if not total:
        return ["no profile samples"]
    lines = [f"{total} samples; self % / total %, by self time:"]
    for fr, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * n / total:5.1f} {100 * anywhere[fr] / total:5.1f}  {fr}")
    return lines


def print_profile(directory: Path | None, pattern: str, title: str) -> None:
    """The summary of the stack files in ``directory`` matching ``pattern``, if profiling."""
    if directory is not None:
        print(f"\nwhere pyvirtiofsd's time went ({title}, py-spy):")
        print("\n".join(profile_summary(sorted(directory.glob(pattern)))))
