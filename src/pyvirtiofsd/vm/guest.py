"""Boot a throwaway Linux guest under QEMU (TCG), run a shell script in it, return its output.

The guest boots the cached busybox initramfs; the script travels in a second cpio archive
appended to it. init prints markers around the script's output on the serial console, which is
QEMU's stdout here, then powers the guest off. Every process started here (QEMU, the rootfs
daemon) is killed on the way out, whatever happens, and dies with this process if it is killed.
"""

from __future__ import annotations

import codecs
import io
import os
import re
import secrets
import selectors
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pyvirtiofsd.vm import assets

__all__ = [
    "CONSOLE_TAIL",
    "KERNEL_ARGS",
    "ROOTFS_TAG",
    "SHUTDOWN_GRACE",
    "TCG_THREADS",
    "VIRTIO_FS_CONFIG_SIZE",
    "VIRTIO_ID_FS",
    "FsDevice",
    "GuestError",
    "GuestResult",
    "GuestTimeout",
    "kill_child",
    "qemu_args",
    "run_guest",
    "spawn_child",
    "wait_for_socket",
]

# The kernel command line that boots fastest under TCG (see the machine facts): no hardware
# probing that is slow to emulate, no self-tests, no security modules.
KERNEL_ARGS = (
    "console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off tsc=reliable no_timer_check "
    "audit=0 apparmor=0 security=none 8250.nr_uarts=1 i8042.noaux i8042.nokbd i8042.nopnp "
    "random.trust_cpu=on cryptomgr.notests rdinit=/init"
)
# TCG's threading per QEMU flavor. QEMU 7.2's multi-threaded TCG now and then runs a stale
# translation of kernel text another vCPU has just patched (static keys at boot): the guest
# dies with "Oops: int3" before the script starts. One thread for all vCPUs has no such race.
TCG_THREADS = {"sid": "multi", "bookworm": "single"}
ROOTFS_TAG = "pyvirtiofsd-rootfs"
VIRTIO_ID_FS = 26
# struct virtio_fs_config: char tag[36]; le32 num_request_queues.
VIRTIO_FS_CONFIG_SIZE = 40
CONSOLE_TAIL = 3000
# How long a guest may take from printing its status to powering off (sync, unmount, dmesg).
SHUTDOWN_GRACE = 60.0


class GuestError(RuntimeError):
    """The guest did not run the script to completion; carries what QEMU and the guest printed."""

    def __init__(self, message: str, console: str = "", qemu_stderr: str = "") -> None:
        self.console = console
        self.qemu_stderr = qemu_stderr
        details = [message]
        if qemu_stderr.strip():
            details.append("--- QEMU stderr ---\n" + qemu_stderr.strip()[-CONSOLE_TAIL:])
        if console.strip():
            details.append("--- console (tail) ---\n" + console[-CONSOLE_TAIL:])
        super().__init__("\n".join(details))


class GuestTimeout(GuestError):
    """The guest ran past its timeout and was killed."""


@dataclass
class FsDevice:
    """One virtio-fs device for the guest, served by a daemon that is already listening."""

    socket: str
    tag: str
    num_request_queues: int = 1
    # QEMU 11.1's generic vhost-user-test-device-pci instead of vhost-user-fs-pci: the only
    # QEMU device that gives the back-end VIRTIO shared memory (the DAX window). The tag then
    # comes from the back-end's config space; `tag` here is what the script mounts.
    generic: bool = False
    queue_size: int = 1024

    def qemu_args(self, chardev_id: str) -> list[str]:
        args = ["-chardev", f"socket,id={chardev_id},path={self.socket}"]
        if self.generic:
            device = (
                f"vhost-user-test-device-pci,chardev={chardev_id},virtio-id={VIRTIO_ID_FS},"
                f"num_vqs={1 + self.num_request_queues},config_size={VIRTIO_FS_CONFIG_SIZE},"
                f"vq_size={self.queue_size}"
            )
        else:
            device = (
                f"vhost-user-fs-pci,chardev={chardev_id},tag={self.tag},"
                f"queue-size={self.queue_size},num-request-queues={self.num_request_queues}"
            )
        return [*args, "-device", device]

    def mount_command(self, mountpoint: str, options: str = "") -> str:
        """A shell line for the guest script that mounts this device."""
        opts = f"-o {shlex.quote(options)} " if options else ""
        return (
            f"mkdir -p {shlex.quote(mountpoint)} && "
            f"mount -t virtiofs {opts}{shlex.quote(self.tag)} {shlex.quote(mountpoint)}"
        )


@dataclass
class GuestResult:
    output: str  # what the script wrote to stdout and stderr, exactly (CR LF read as LF)
    status: int  # the script's exit status
    console: str  # the whole serial console: boot, markers, output and the guest kernel log
    kernel_log: str  # the guest's dmesg, taken after the script
    qemu_stderr: str
    boot_seconds: float  # QEMU start until the script started
    script_seconds: float  # the script alone
    powered_off: bool  # False when the guest hung after the script and QEMU had to be killed
    command: list[str] = field(default_factory=list)  # the QEMU command line, for reproducing

    def check(self) -> GuestResult:
        """Raise GuestError unless the script exited with status 0."""
        if self.status != 0:
            raise GuestError(
                f"guest script exited with status {self.status}:\n{self.output}",
                self.console,
                self.qemu_stderr,
            )
        return self


def qemu_args(
    devices: Sequence[FsDevice],
    *,
    kernel: Path,
    initrd: Path,
    memory_mb: int,
    smp: int,
    kernel_args: str = KERNEL_ARGS,
    tcg_threads: str = "multi",
    console_file: Path | None = None,
) -> list[str]:
    """QEMU's arguments (without the program) for a TCG guest with these devices; the serial
    console goes to QEMU's stdout, or to ``console_file``.

    `tcg_threads` is "multi" (one host thread per vCPU) or "single" (see :data:`TCG_THREADS`).
    """
    args = [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        # /dev/kvm here is PVM, where no stock kernel boots: TCG it is.
        "-accel",
        f"tcg,thread={tcg_threads}",
        # vhost-user back-ends map guest RAM, so it must be a shareable memfd.
        "-machine",
        "q35,memory-backend=mem",
        "-object",
        f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
        "-m",
        f"{memory_mb}M",
        "-smp",
        str(smp),
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        kernel_args,
        # The console comes back on QEMU's stdout; signal=off leaves Ctrl-C to the harness.
        "-chardev",
        "stdio,id=console,signal=off"
        if console_file is None
        else f"file,id=console,path={console_file}",
        "-serial",
        "chardev:console",
    ]
    for i, device in enumerate(devices):
        if device.num_request_queues < 1:
            raise ValueError("a virtio-fs device needs at least one request queue")
        args += device.qemu_args(f"fs{i}")
    return args


def _pdeathsig_prefix() -> list[str]:
    """A wrapper that makes a child die with this process, even if this process is SIGKILLed."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "SIGKILL", "--"] if setpriv else []


def spawn_child(
    argv: Sequence[str], env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.Popen[bytes]:
    """Start a helper process (QEMU, a daemon) that cannot outlive this process.

    It gets a session of its own, so Ctrl-C in a terminal reaches only the harness, which then
    stops the child in order; and it is SIGKILLed if this process dies without cleaning up.
    The kernel ties that signal to the calling *thread*: start long-lived children from a
    thread that outlives them (the main thread, typically).
    """
    return subprocess.Popen(
        [*_pdeathsig_prefix(), *argv], env=env, start_new_session=True, **kwargs
    )


def kill_child(proc: subprocess.Popen[bytes] | None, grace: float = 0.0) -> None:
    """Stop a child from spawn_child: SIGTERM and up to `grace` seconds first, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    if grace > 0:
        proc.terminate()
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_for_socket(path: str, proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    """Wait until a daemon listens on the unix socket `path` (and has not died meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise GuestError(
                f"daemon exited with status {proc.returncode} before listening on {path}"
            )
        # A successful connect would be taken by the daemon as its one front-end and end it, so
        # only check that the socket exists.
        try:
            if Path(path).is_socket():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise GuestError(f"no daemon listening on {path} after {timeout:.0f} s")
        time.sleep(0.02)


class _Console:
    """Collects QEMU's stdout and picks the script's output and status out of it as it arrives.

    Work per read is bounded (no rescanning of everything seen so far), so a script may print
    megabytes.
    """

    # Longer than any marker line: a marker split across two reads is still found.
    _KEEP = 128

    def __init__(self, nonce: str, on_output: Callable[[str], None] | None) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending_cr = False
        self._buf = io.StringIO()
        self._size = 0
        self._tail = ""  # the last _KEEP characters of the console
        self._prefix = f"<<<pyvirtiofsd:{nonce}:"
        self._status_re = re.compile("\n" + re.escape(self._prefix) + r"status=(\d+)>>>")
        self._on_output = on_output
        self._held = ""  # script output not yet passed on: it could be the start of a marker
        self._output: list[str] = []
        self.begin_time: float | None = None
        self.status: int | None = None
        self.status_time: float | None = None

    @property
    def text(self) -> str:
        return self._buf.getvalue()

    def marker(self, name: str) -> str:
        return f"{self._prefix}{name}>>>\n"

    def feed(self, data: bytes, final: bool = False) -> None:
        text = self._decoder.decode(data, final)
        # The kernel writes CR LF; normalise, minding a CR at the end of one chunk.
        if self._pending_cr:
            text = "\r" + text
        self._pending_cr = text.endswith("\r") and not final
        if self._pending_cr:
            text = text[:-1]
        text = text.replace("\r\n", "\n")
        window = self._tail + text
        self._buf.write(text)
        self._size += len(text)
        self._tail = window[-self._KEEP :]

        if self.begin_time is None:
            found = window.find(self.marker("begin"))
            if found < 0:
                return
            self.begin_time = time.monotonic()
            text = window[found + len(self.marker("begin")) :]
        if self.status is not None:
            return
        self._held += text
        match = self._status_re.search(self._held)
        if match:
            # init prints a newline before the status marker so that it starts a line; that
            # newline is not the script's.
            self._emit(self._held[: match.start()])
            self._held = ""
            self.status = int(match.group(1))
            self.status_time = time.monotonic()
        else:
            # Hold back only what could be the start of the status marker (from the last
            # newline on), so that a guest that prints a line and waits for the host is
            # heard at once.
            lead = "\n" + self._prefix + "status="
            last = self._held.rfind("\n")
            tail = self._held[last:] if last >= 0 else ""
            keep = len(tail) if lead.startswith(tail) or tail.startswith(lead) else 0
            cut = len(self._held) - keep
            self._emit(self._held[:cut])
            self._held = self._held[cut:]

    def _emit(self, text: str) -> None:
        if text:
            self._output.append(text)
            if self._on_output is not None:
                self._on_output(text)

    def output(self) -> str:
        return "".join(self._output)

    def section(self, start: str, end: str) -> str:
        a = self.text.find(self.marker(start))
        b = self.text.find(self.marker(end))
        if a < 0:
            return ""
        return self.text[a + len(self.marker(start)) : b if b >= 0 else len(self.text)]

    def finished(self) -> bool:
        return self.marker("end") in self.text

    def setup_failed(self) -> bool:
        return self.marker("setup-failed") in self.text


def run_guest(
    script: str,
    devices: Sequence[FsDevice] = (),
    *,
    qemu: str = "sid",
    memory_mb: int = 2048,
    smp: int = 2,
    timeout: float = 600.0,
    rootfs: str | None = None,
    kernel_args: str = KERNEL_ARGS,
    extra_qemu_args: Sequence[str] = (),
    on_output: Callable[[str], None] | None = None,
) -> GuestResult:
    """Boot a guest, run `script` (a shell script) in it, return its output and exit status.

    The script runs as root under busybox sh with /proc, /sys, /dev and /tmp mounted; it mounts
    the devices itself (`mount -t virtiofs TAG /mnt/x`, see FsDevice.mount_command).
    `rootfs='sid'` (or a directory path) runs it instead chrooted into that directory, served
    read-only over an extra virtio-fs device, under its /bin/sh, with tmpfs on /tmp, /run,
    /var/tmp, /mnt and /root. `on_output` receives the script's output as it arrives.

    Raises GuestTimeout after `timeout` seconds and GuestError if the guest dies or cannot
    start; QEMU and any daemon started here are gone when this returns or raises.
    """
    nonce = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="pyvirtiofsd-vm-") as workdir:
        work = Path(workdir)
        all_devices = list(devices)
        rootfs_daemon: subprocess.Popen[bytes] | None = None
        qemu_proc: subprocess.Popen[bytes] | None = None
        try:
            if rootfs is not None:
                rootfs_daemon, rootfs_device = _start_rootfs_daemon(rootfs, work)
                all_devices.append(rootfs_device)

            env_file = f"HARNESS_NONCE={nonce}\nHARNESS_ROOTFS={ROOTFS_TAG if rootfs else ''}\n"
            initrd = work / "initrd.cpio"
            with initrd.open("wb") as out, assets.base_initramfs().open("rb") as base:
                shutil.copyfileobj(base, out)
                out.write(
                    assets.run_archive(
                        [
                            ("harness/env", env_file.encode(), 0o644),
                            ("harness/script", script.encode(), 0o755),
                        ]
                    )
                )

            command = assets.qemu_command(qemu)
            argv = [
                *command.argv,
                *qemu_args(
                    all_devices,
                    kernel=assets.kernel(),
                    initrd=initrd,
                    memory_mb=memory_mb,
                    smp=smp,
                    kernel_args=kernel_args,
                    tcg_threads=TCG_THREADS[qemu],
                ),
                *extra_qemu_args,
            ]
            console = _Console(nonce, on_output)
            start = time.monotonic()
            with (work / "qemu.stderr").open("w+b") as stderr:
                qemu_proc = spawn_child(
                    argv,
                    command.environ(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                )
                powered_off = _pump(qemu_proc, console, start + timeout, stderr)
                stderr.seek(0)
                qemu_stderr = stderr.read().decode(errors="replace")
        finally:
            kill_child(qemu_proc)
            kill_child(rootfs_daemon)

    status = console.status
    if console.setup_failed() or status is None or console.begin_time is None:
        what = "guest setup failed" if console.setup_failed() else "guest stopped"
        raise GuestError(
            f"{what} before the script finished (QEMU exit status {qemu_proc.returncode})",
            console.text,
            qemu_stderr,
        )
    assert console.status_time is not None
    return GuestResult(
        output=console.output(),
        status=status,
        console=console.text,
        kernel_log=console.section("kernel-log", "end"),
        qemu_stderr=qemu_stderr,
        boot_seconds=console.begin_time - start,
        script_seconds=console.status_time - console.begin_time,
        powered_off=powered_off,
        command=argv,
    )


def _pump(
    proc: subprocess.Popen[bytes], console: _Console, deadline: float, stderr: IO[bytes]
) -> bool:
    """Feed QEMU's console output to `console` until QEMU exits; True if the guest powered off.

    Raises GuestTimeout at `deadline`. A guest that printed its status but then hangs (an
    unmount waiting on a broken daemon, say) is given SHUTDOWN_GRACE and then killed.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            limit = deadline
            if console.status_time is not None:
                limit = min(deadline, console.status_time + SHUTDOWN_GRACE)
            if now >= limit:
                if console.status_time is not None:
                    return False
                stderr.seek(0)
                raise GuestTimeout(
                    "guest did not finish within its timeout; QEMU killed",
                    console.text,
                    stderr.read().decode(errors="replace"),
                )
            if not sel.select(limit - now):
                continue
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                console.feed(b"", final=True)
                proc.wait()
                return console.finished()
            console.feed(data)


def _start_rootfs_daemon(rootfs: str, work: Path) -> tuple[subprocess.Popen[bytes], FsDevice]:
    """Serve a root filesystem read-only with the Rust virtiofsd for a `rootfs` guest."""
    root = assets.sid_root() if rootfs == "sid" else Path(rootfs)
    if not (root / "bin" / "sh").exists():
        raise assets.AssetsMissing(f"rootfs {root} has no /bin/sh: {assets.INSTALL_HINT}")
    sock = str(work / "rootfs.sock")
    command = assets.rust_virtiofsd_command()
    # As root here the namespace sandbox buys nothing for a throwaway guest; the tree is static,
    # so the guest may cache everything.
    options = ["--sandbox", "none", "--readonly", "--cache", "always", "--log-level", "error"]
    argv = [*command.argv, "--shared-dir", str(root), "--socket-path", sock, *options]
    log_path = work / "rootfs-virtiofsd.log"
    with log_path.open("wb") as log:
        daemon = spawn_child(
            argv, command.environ(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    try:
        wait_for_socket(sock, daemon)
    except GuestError as exc:
        kill_child(daemon)
        log_text = log_path.read_text(errors="replace")
        raise GuestError(f"rootfs daemon failed: {exc}\n{log_text}") from exc
    except BaseException:
        kill_child(daemon)
        raise
    return daemon, FsDevice(socket=sock, tag=ROOTFS_TAG)
