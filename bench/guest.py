"""Guest benchmark: fio in a real guest (QEMU 11.1, TCG) on pyvirtiofsd and on the Rust virtiofsd
1.14, in interleaved rounds, side by side, with each daemon's own CPU time per guest operation.

    .venv/bin/python bench/guest.py                  # 3 rounds, 10 s per fio job, ~12 min
    .venv/bin/python bench/guest.py --rounds 1 --runtime 3 --size-mib 64 --files 500

Needs the VM assets (`.ci/install-vm-assets`): the guest runs in the sid rootfs, where fio and
python3 live. pyvirtiofsd runs as both builds: pure, and compiled (mypyc with its C modules: a
compiled tree found or built by bench/compiled.py, as the front-end bench does; ``--compiled
DIR``, ``--no-compiled``), which counts only once its /proc maps show the tree's modules.

For each daemon and round a fresh share (a new ext4 file system of its own, as root: see
common.fresh_share) is shared with default options (cache=auto) and one guest runs, in order,
each fio job with O_DIRECT (every I/O reaches the daemon) and then buffered (through the
guest's page cache, as most programs do): sequential 1 MiB write and read, 4 KiB random read
at queue depth 1 (psync) and 16 (libaio); then create, stat and unlink of ``--files`` files
from Python.

This module also holds what the other guest benchmarks (bench/tree.py, bench/queues.py) share:
a driver that runs a list of steps in the guest and a host side that samples the daemon
around each step. Around each step the guest prints a marker and waits for the host's
acknowledgement (a file on the share). At each marker the host reads the daemon's
utime+stime from /proc and, for pyvirtiofsd, sends SIGUSR1 and waits for the request counters
it logs. A step's CPU per operation is the daemon's CPU time during the step divided by the
operations the guest issued (fio's I/Os, or files x 3); pyvirtiofsd's own request count is
kept beside it. Under TCG the guest itself is the bottleneck (see docs/benchmarks.md):
throughput compares the daemons only roughly; CPU per operation is the daemon's own cost.
Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import compiled
from common import (
    SHARE_DIR,
    SHARE_FS,
    Progress,
    cpu_seconds,
    fresh_share,
    fresh_share_possible,
    prepare_profile,
    print_profile,
    rounds_order,
    start_profiler,
    stop_profiler,
)
from report import (
    CPU_TARGET,
    PY,
    PYC,
    THROUGHPUT_TARGET,
    VIRTIOFSD,
    Row,
    label,
    table,
    write_json_if,
)

from pyvirtiofsd.vm import FsDevice, GuestError, assets, missing_assets, run_guest
from pyvirtiofsd.vm.guest import kill_child, spawn_child, wait_for_socket

MiB = 1 << 20
TAG = "share"
MOUNT = "/mnt/share"
MARKER = "@@BENCH"
_MARKER_RE = re.compile(rf"^{MARKER} (\d+) (begin|end) (\S+)\n", re.MULTILINE)
_SERVED_RE = re.compile(r"requests served: ?(.*)$", re.MULTILINE)
DAEMONS = [PY, VIRTIOFSD, PYC]
#: pyvirtiofsd in either build (it logs its request counters on SIGUSR1).
OURS = (PY, PYC)
TITLE = "guest: fio and create/stat/unlink (QEMU 11.1 TCG, 2 vCPUs)"
#: Seconds a guest takes to boot and mount under TCG, for the progress line.
BOOT_SECONDS = 8.0

#: (name, label, unit, fio arguments); the guest adds filename, size, runtime and output.
FIO_JOBS = [
    ("seqwrite", "seq write 1M", "MB/s", "--rw=write --bs=1M --ioengine=psync --iodepth=1"),
    ("seqread", "seq read 1M", "MB/s", "--rw=read --bs=1M --ioengine=psync --iodepth=1"),
    ("randread1", "rand read 4K QD1", "IOPS", "--rw=randread --bs=4k --ioengine=psync --iodepth=1"),
    (
        "randread16",
        "rand read 4K QD16",
        "IOPS",
        "--rw=randread --bs=4k --ioengine=libaio --iodepth=16",
    ),
]
MODES = [("direct", "O_DIRECT", 1), ("buffered", "buffered", 0)]

# Runs in the guest (python3 of the sid rootfs): the steps of a JSON plan, in order. Markers
# are followed by a line of padding: the harness passes script output on once 128 more
# characters have arrived.
GUEST_DRIVER = r"""
import json, os, subprocess, sys, time

mount, tag, plan = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
seq = 0

def marker(event, name):
    global seq
    seq += 1
    print(f"\n__MARKER__ {seq} {event} {name}\n" + " " * 200, flush=True)
    ack = f"{mount}/.bench-ack-{seq}"
    deadline = time.monotonic() + 300
    while not os.path.exists(ack):
        if time.monotonic() > deadline:
            sys.exit(f"no acknowledgement for marker {seq}")
        time.sleep(0.01)

def sh(cmd):
    subprocess.run(["sh", "-ec", cmd], check=True, cwd=mount, stdout=subprocess.DEVNULL)

def remount():
    # A fresh mount: the guest forgets every dentry, inode and page of the share.
    subprocess.run(["umount", mount], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
    subprocess.run(["mount", "-t", "virtiofs", tag, mount], check=True)

def meta(d, files):
    os.mkdir(d)
    paths = [f"{d}/f{i}" for i in range(files)]
    for p in paths:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
    for p in paths:
        os.stat(p)
    for p in paths:
        os.unlink(p)
    os.rmdir(d)
    return {"ops": 3 * files}

def fio(name, args, side):
    out = f"/tmp/{name}.json"
    subprocess.run(["fio", f"--name={name}", "--eta=never", "--output-format=json",
                    f"--output={out}", *args], check=True, stdout=subprocess.DEVNULL)
    jobs = json.load(open(out))["jobs"]
    total = lambda key: sum(j[side][key] for j in jobs)
    return {"bw": total("bw_bytes"), "iops": total("iops"), "ops": total("total_ios")}

for step in plan:
    if step.get("remount"):
        remount()
    for cmd in step.get("setup", []):
        sh(cmd)
    if step["kind"] == "setup":
        continue
    name = step["name"]
    marker("begin", name)
    t = time.perf_counter()
    if step["kind"] == "fio":
        result = fio(name, step["args"], step["side"])
    elif step["kind"] == "meta":
        result = meta(f"{mount}/{name}", step["files"])
    else:
        sh(step["cmd"])
        result = {}
    elapsed = time.perf_counter() - t
    marker("end", name)
    print("RESULT " + json.dumps({"name": name, "seconds": elapsed, **result}), flush=True)
print("DONE", flush=True)
"""


# --- what the guest runs --------------------------------------------------------------------------


@dataclass
class Step:
    """One step of a guest session. Timed steps ("fio", "meta", "sh") get markers, so the host
    samples the daemon around them; "setup" steps run untimed. Any step may first remount the
    share (a cold start) and run untimed shell commands (``setup``, in the share's root)."""

    name: str
    label: str
    kind: str
    prior: float = 10.0  # a guess at its seconds, for the progress line
    remount: bool = False
    setup: list[str] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)

    def plan(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "remount": self.remount,
            "setup": self.setup,
            **self.spec,
        }


def fio_step(name: str, label: str, args: str, *, size_mib: int, runtime: int,
             direct: int, numjobs: int = 1, extra: Sequence[str] = ()) -> Step:  # fmt: skip
    argv = [
        f"--filename={MOUNT}/fio.dat", f"--size={size_mib}M", f"--direct={direct}",
        "--time_based", f"--runtime={runtime}", *args.split(), *extra,
    ]  # fmt: skip
    if numjobs > 1:
        # One job per vCPU, each pinned to its own.
        argv += [f"--numjobs={numjobs}", "--cpus_allowed_policy=split",
                 f"--cpus_allowed=0-{numjobs - 1}"]  # fmt: skip
    side = "write" if "write" in args else "read"
    return Step(name, label, "fio", runtime + 2.0, spec={"args": argv, "side": side})


@dataclass
class Phase:
    """What one timed step gave: the daemon's CPU seconds and request count (pyvirtiofsd only)
    during it, and what the guest reported (seconds, and bw/iops/ops for fio)."""

    cpu: float
    requests: int | None
    result: dict[str, Any]
    threads: dict[int, float] = field(default_factory=dict)  # CPU seconds per daemon thread

    @property
    def cores(self) -> float:
        """Host cores the daemon kept busy on average during the step."""
        return self.cpu / self.result["seconds"] if self.result.get("seconds") else 0.0

    @property
    def busiest_thread(self) -> float:
        """The share of a core its busiest thread took (1.0: a thread that never waited)."""
        if not self.threads or not self.result.get("seconds"):
            return 0.0
        return max(self.threads.values()) / self.result["seconds"]

    @property
    def ops(self) -> int:
        return int(self.result.get("ops", 0))


def served_totals(log: Path) -> list[int]:
    """Total requests of each "requests served" line pyvirtiofsd logged so far."""
    text = log.read_text(errors="replace")
    return [
        sum(int(item.split("=")[1]) for item in line.split()) for line in _SERVED_RE.findall(text)
    ]


class Sampler:
    """Sees the guest's markers go by, samples the daemon, and lets the guest go on."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        share: Path,
        log: Path | None,
        on_end: Callable[[str], None] | None = None,
    ) -> None:
        self.proc = proc
        self.share = share
        self.log = log  # pyvirtiofsd's log, where SIGUSR1 puts its counters
        self.on_end = on_end
        self.text = ""
        self.handled = 0
        self.samples: dict[tuple[str, str], tuple[float, int | None]] = {}
        self.threads: dict[tuple[str, str], dict[int, float]] = {}

    def __call__(self, chunk: str) -> None:
        self.text += chunk
        for m in _MARKER_RE.finditer(self.text):
            seq, event, name = int(m.group(1)), m.group(2), m.group(3)
            if seq <= self.handled:
                continue
            self.handled = seq
            self.samples[(event, name)] = self.sample()
            self.threads[(event, name)] = thread_cpu_seconds(self.proc.pid)
            (self.share / f".bench-ack-{seq}").touch()
            if event == "end" and self.on_end is not None:
                self.on_end(name)
        # Keep only an unfinished last line; markers are whole lines.
        self.text = self.text[self.text.rfind("\n") + 1 :]

    def sample(self) -> tuple[float, int | None]:
        if self.log is None:
            return cpu_seconds(self.proc.pid), None
        before = len(served_totals(self.log))
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while True:
            totals = served_totals(self.log)
            if len(totals) > before:
                return cpu_seconds(self.proc.pid), totals[-1]
            if time.monotonic() > deadline:
                raise RuntimeError("pyvirtiofsd did not log its counters after SIGUSR1")
            time.sleep(0.005)


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """utime + stime of each thread of a process so far, by thread id."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def daemon_argv(kind: str, sock: str, share: Path, queues: int = 1) -> list[str]:
    if kind in OURS:
        command = [sys.executable, "-m", "pyvirtiofsd"] if kind == PY else compiled.command()
        argv = [*command, "--socket-path", sock, "--shared-dir", str(share)]
        if queues > 1:
            argv += ["--num-request-queues", str(queues)]
        return argv
    return [
        *assets.rust_virtiofsd_command().argv,
        "--socket-path", sock, "--shared-dir", str(share), "--sandbox", "none",
    ]  # fmt: skip


def guest_script(steps: Sequence[Step]) -> str:
    device = FsDevice("", TAG)
    driver = GUEST_DRIVER.replace("__MARKER__", MARKER)
    plan = json.dumps([s.plan() for s in steps])
    argv = shlex.join(["python3", "/tmp/bench.py", MOUNT, TAG, "/tmp/plan.json"])
    return (
        f"set -e\n{device.mount_command(MOUNT)}\n"
        f"cat > /tmp/bench.py <<'EOF'\n{driver}\nEOF\n"
        f"cat > /tmp/plan.json <<'EOF'\n{plan}\nEOF\n{argv}\n"
    )


def plan_session(
    progress: Progress, prefix: str, group: str, steps: Sequence[Step], family: str
) -> None:
    """Tell the progress line about one session's timed steps (the boot goes with the first).

    Keys are ``{prefix}/{step}``, groups ``{group}/{step}`` (one daemon), families
    ``{family}/{step}`` (any daemon)."""
    timed = [s for s in steps if s.kind != "setup"]
    for i, s in enumerate(timed):
        prior = s.prior + (BOOT_SECONDS if i == 0 else 0.0)
        progress.plan(f"{prefix}/{s.name}", f"{group}/{s.name}", prior, f"{family}/{s.name}")


def run_session(
    kind: str,
    steps: Sequence[Step],
    base: Path,
    *,
    progress: Progress,
    prefix: str,
    title: str,
    queues: int = 1,
    display: str | None = None,
    prepare: Callable[[Path], None] | None = None,
    timeout: float = 3600.0,
    keep_logs: bool = False,
    profile: Path | None = None,
    compiled_tree: Path | None = None,
) -> dict[str, Phase]:
    """One daemon, one guest running ``steps``; each timed step's Phase, by step name.

    The share is a file system of its own (:func:`common.fresh_share`), which ``prepare`` fills
    before the daemon starts. Progress keys are
    ``{prefix}/{step name}`` (see :func:`plan_session`); ``title`` starts the progress text.
    With ``profile`` (a file name), py-spy samples pyvirtiofsd for the whole session and
    writes its stacks there (see :func:`common.profile_summary`). The compiled daemon runs from
    ``compiled_tree`` and counts only once its modules are seen loaded."""
    if kind == PYC and compiled_tree is None:
        raise ValueError("the compiled daemon needs a compiled tree")
    base.mkdir(parents=True)
    with fresh_share(base / "share") as share:
        if prepare is not None:
            prepare(share)
        sock = str(base / "daemon.sock")
        log = base / "daemon.log"
        command = daemon_argv(kind, sock, share, queues)
        if kind == PYC:
            env = compiled.environ(compiled_tree)  # type: ignore[arg-type]
        else:
            env = None if kind == PY else assets.rust_virtiofsd_command().environ()
        timed = [s for s in steps if s.kind != "setup"]
        who = display or label(kind)

        def announce(i: int) -> None:
            if i < len(timed):
                progress.start(f"{prefix}/{timed[i].name}", f"{title}: {who}, {timed[i].label}")

        def on_end(name: str) -> None:
            progress.finish(f"{prefix}/{name}")
            names = [s.name for s in timed]
            if name in names:
                announce(names.index(name) + 1)

        announce(0)
        with log.open("wb") as out:
            proc = spawn_child(command, env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        phases: dict[str, Phase] = {}
        spy: subprocess.Popen[bytes] | None = None
        try:
            wait_for_socket(sock, proc)
            if kind == PYC:
                compiled.check_running(proc.pid, compiled_tree)  # type: ignore[arg-type]
            if profile is not None and kind == PY:
                spy = start_profiler(proc.pid, profile)
            sampler = Sampler(proc, share, log if kind in OURS else None, on_end)
            result = run_guest(
                guest_script(steps),
                [FsDevice(sock, TAG, num_request_queues=queues)],
                qemu="sid",
                rootfs="sid",
                timeout=timeout,
                on_output=sampler,
            )
            if result.status != 0 or "DONE" not in result.output:
                raise GuestError(f"{who}: guest script failed:\n{result.output[-3000:]}")
            for line in result.output.splitlines():
                if not line.startswith("RESULT "):
                    continue
                r = json.loads(line[len("RESULT ") :])
                begin_cpu, begin_req = sampler.samples[("begin", r["name"])]
                end_cpu, end_req = sampler.samples[("end", r["name"])]
                requests = None if begin_req is None or end_req is None else end_req - begin_req
                t0 = sampler.threads[("begin", r["name"])]
                t1 = sampler.threads[("end", r["name"])]
                threads = {tid: cpu - t0.get(tid, 0.0) for tid, cpu in t1.items()}
                phases[r["name"]] = Phase(end_cpu - begin_cpu, requests, r, threads)
        finally:
            if spy is not None:
                stop_profiler(spy)
            kill_child(proc, grace=10.0)
            if keep_logs:
                print(f"--- {who} log ---\n{log.read_text(errors='replace')[-4000:]}")
        return phases


def fio_value(unit: str, phase: Phase) -> float:
    return phase.result["bw"] / 1e6 if unit == "MB/s" else phase.result["iops"]


# --- this benchmark: fio buffered and O_DIRECT, create/stat/unlink --------------------------------


@dataclass
class Options:
    rounds: int = 3
    runtime: int = 10
    size_mib: int = 256
    files: int = 2000
    daemons: list[str] = field(default_factory=lambda: list(DAEMONS))
    timeout: float = 3600.0
    keep_logs: bool = False
    profile: Path | None = None  # a directory for py-spy's stacks of pyvirtiofsd
    compiled: Path | None = None  # the compiled tree, when daemons has the compiled one


def steps(opts: Options) -> list[Step]:
    out = []
    for name, job_label, _, args in FIO_JOBS:
        for mode, mode_label, direct in MODES:
            out.append(
                fio_step(f"{name}-{mode}", f"{job_label} {mode_label}", args,
                         size_mib=opts.size_mib, runtime=opts.runtime, direct=direct)
            )  # fmt: skip
    out.append(
        Step("meta", f"create/stat/unlink {opts.files}", "meta", opts.files * 3 / 800,
             spec={"files": opts.files})
    )  # fmt: skip
    return out


def rows(opts: Options) -> list[Row]:
    out = []
    for name, job_label, unit, _ in FIO_JOBS:
        for mode, mode_label, _ in MODES:
            out.append(
                Row("guest", f"{name}-{mode}", f"{job_label} {mode_label}", unit, "higher",
                    VIRTIOFSD, THROUGHPUT_TARGET)
            )  # fmt: skip
    meta = f"create/stat/unlink {opts.files}"
    out.append(Row("guest", "meta", meta, "ops/s", "higher", VIRTIOFSD, THROUGHPUT_TARGET))
    # CPU per guest operation wherever every operation reaches the daemon.
    for name, job_label, _, _ in FIO_JOBS:
        out.append(
            Row("guest", f"{name}-direct-cpu", f"{job_label} O_DIRECT CPU", "us/op", "lower",
                VIRTIOFSD, CPU_TARGET)
        )  # fmt: skip
    out.append(Row("guest", "meta-cpu", f"{meta} CPU", "us/op", "lower", VIRTIOFSD, CPU_TARGET))
    return out


def plan(progress: Progress, opts: Options) -> None:
    for r in range(opts.rounds):
        for kind in opts.daemons:
            plan_session(progress, f"guest/{r}/{kind}", f"guest/{kind}", steps(opts), "guest")


def prepare_file(path: Path, size_mib: int) -> None:
    """The file fio works on, made on the host so that no workload has to lay it out."""
    block = os.urandom(MiB)
    with path.open("wb") as f:
        for _ in range(size_mib):
            f.write(block)


def run(opts: Options, progress: Progress) -> list[Row]:
    """Interleaved rounds of one guest per daemon; the rows (medians over the rounds)."""
    missing = missing_assets(qemu="sid", rootfs="sid")
    if missing:
        raise RuntimeError("\n".join(missing))
    by_key = {r.key: r for r in rows(opts)}
    units = {name: unit for name, _, unit, _ in FIO_JOBS}
    with tempfile.TemporaryDirectory(prefix="pyvirtiofsd-bench-") as tmp:
        for n in range(opts.rounds):
            for kind in rounds_order(opts.daemons, n):
                phases = run_session(
                    kind,
                    steps(opts),
                    Path(tmp) / f"{kind}-{n}",
                    progress=progress,
                    prefix=f"guest/{n}/{kind}",
                    title=f"guest bench, round {n + 1}/{opts.rounds}",
                    prepare=lambda share: prepare_file(share / "fio.dat", opts.size_mib),
                    timeout=opts.timeout,
                    keep_logs=opts.keep_logs,
                    profile=opts.profile and opts.profile / f"guest-{kind}-{n}.txt",
                    compiled_tree=opts.compiled,
                )
                for step_name, p in phases.items():
                    extra = {"cpu_s": p.cpu, "requests": p.requests, "guest_ops": p.ops,
                             "cores": p.cores}  # fmt: skip
                    if step_name == "meta":
                        by_key["meta"].add(kind, p.ops / p.result["seconds"], **extra)
                        by_key["meta-cpu"].add(kind, 1e6 * p.cpu / p.ops)
                        continue
                    job = step_name.rsplit("-", 1)[0]
                    by_key[step_name].add(kind, fio_value(units[job], p), **extra)
                    if step_name.endswith("-direct") and p.ops:
                        by_key[f"{job}-direct-cpu"].add(kind, 1e6 * p.cpu / p.ops)
    return list(by_key.values())


def add_common_arguments(
    ap: argparse.ArgumentParser, rounds: int, timeout: float, daemons: Sequence[str] = DAEMONS
) -> None:
    """The options every guest benchmark takes; with the compiled daemon among ``daemons``,
    also where its tree comes from (bench/compiled.py)."""
    ap.add_argument(
        "--rounds",
        type=int,
        default=rounds,
        help=f"interleaved rounds; figures are medians (default {rounds})",
    )
    ap.add_argument(
        "--daemon",
        action="append",
        choices=daemons,
        help="only this daemon (repeatable; default: all)",
    )
    if PYC in daemons:
        compiled.add_arguments(ap)
    ap.add_argument("--timeout", type=float, default=timeout, help="per guest, seconds")
    ap.add_argument("--keep-logs", action="store_true", help="print the daemons' log tails")
    ap.add_argument("--json", type=Path, help="write the results here (docs/benchmarks.md)")
    ap.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample pyvirtiofsd with py-spy into DIR and print where its time went "
        "(the sampling costs CPU: take figures from runs without it)",
    )


def main() -> None:
    defaults = Options()
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--runtime",
        type=int,
        default=defaults.runtime,
        help=f"seconds per fio job (default {defaults.runtime})",
    )
    ap.add_argument(
        "--size-mib",
        type=int,
        default=defaults.size_mib,
        help=f"fio file size (default {defaults.size_mib})",
    )
    ap.add_argument("--files", type=int, default=defaults.files,
                    help=f"files to create/stat/unlink (default {defaults.files})")  # fmt: skip
    add_common_arguments(ap, defaults.rounds, defaults.timeout)
    args = ap.parse_args()
    names, tree, why_not = compiled.select(args, args.daemon or list(DAEMONS), PYC)
    opts = Options(args.rounds, args.runtime, args.size_mib, args.files, names, args.timeout,
                   args.keep_logs, prepare_profile(args.profile),
                   tree and tree.path)  # fmt: skip
    load = os.getloadavg()
    progress = Progress()
    plan(progress, opts)
    result = run(opts, progress)
    progress.close()
    print(table(result, {"guest": TITLE}))
    print(
        f"fio: {opts.size_mib} MiB file, {opts.runtime} s per job; medians of {opts.rounds} "
        "round(s); daemons with default options (cache=auto)."
    )
    print(f"shares: {SHARE_FS if fresh_share_possible() else SHARE_DIR}")
    print(f"host load average before / after: {load[0]:.2f} / {os.getloadavg()[0]:.2f}")
    print_profile(opts.profile, "guest-*.txt", "guest")
    write_json_if(args.json, result, "guest", vars(args), tree, why_not)


if __name__ == "__main__":
    main()
