"""Live-migrate a throwaway guest between two QEMU processes on this machine.

:class:`MigrationPair` boots the *source* QEMU, which runs a shell script in the guest as
:func:`~.guest.run_guest` does, and a *destination* QEMU with the same command line started
``-incoming defer``, each with its own virtio-fs daemon (already listening; the caller runs
them). :meth:`MigrationPair.migrate` moves the guest over a Unix socket and returns what QEMU
reports (``query-migrate``: status, downtime, total time...). Each QEMU's serial console goes
to a file; :meth:`Vm.wait_for` waits for a line the guest prints there, which is how a test
knows where the guest is (the script prints markers; nothing is timed). The guest runs the
script once: on the source, then on the destination from where the source left off.

Both QEMUs speak QMP on a socket (:class:`Qmp`): commands, their replies, and the events that
come between them. Every wait has a deadline, and every process started here is killed on
:meth:`MigrationPair.close`, whatever happened, and dies with this process.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvirtiofsd.vm import assets
from pyvirtiofsd.vm.guest import (
    KERNEL_ARGS,
    FsDevice,
    GuestError,
    kill_child,
    qemu_args,
    spawn_child,
)

__all__ = [
    "FINAL_STATES",
    "MigrationPair",
    "Qmp",
    "QmpError",
    "Vm",
]

#: ``query-migrate`` statuses after which nothing changes any more.
FINAL_STATES = ("completed", "failed", "cancelled")
#: How often (seconds) a wait looks at a console file or at ``query-migrate``.
_POLL = 0.02


class QmpError(RuntimeError):
    """A QMP command failed, or QMP itself did (the connection, a deadline)."""


class Qmp:
    """A QMP client on a Unix socket: :meth:`command` sends one command and returns what it
    returns; events that arrive meanwhile are kept in :attr:`events`."""

    def __init__(self, sock: socket.socket, timeout: float = 30.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self._buf = b""
        #: Every event received so far, in order (``{"event": ..., "data": ..., ...}``).
        self.events: list[dict[str, Any]] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        self.command("qmp_capabilities")

    @classmethod
    def connect(cls, path: str | Path, timeout: float = 30.0) -> Qmp:
        """Connect to QEMU's QMP socket, waiting (up to ``timeout``) for QEMU to make it."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(str(path))
                return cls(sock, timeout)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"no QMP socket at {path} after {timeout:.0f} s") from None
                time.sleep(_POLL)
            except BaseException:
                sock.close()
                raise

    def _read(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError("QMP: no answer in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise QmpError(f"QMP connection failed: {e}") from None
            if not chunk:
                raise QmpError("QMP connection closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise QmpError(f"QMP sent {message!r}")
        return message

    def command(self, name: str, **arguments: Any) -> Any:
        """Run ``name`` with ``arguments``; its return value (QmpError when it fails)."""
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as e:
            raise QmpError(f"QMP {name}: {e}") from None
        while True:
            message = self._read()
            if "event" in message:
                self.events.append(message)
                continue
            if "error" in message:
                error = message["error"]
                raise QmpError(f"QMP {name}: {error.get('desc', error)}")
            return message.get("return")

    def event_names(self) -> list[str]:
        return [e["event"] for e in self.events]

    def close(self) -> None:
        self.sock.close()


@dataclass
class Vm:
    """One QEMU process of the pair."""

    name: str
    proc: subprocess.Popen[bytes]
    console_path: Path
    stderr_path: Path
    qmp: Qmp | None = None
    argv: list[str] = field(default_factory=list)

    def console(self) -> str:
        try:
            return self.console_path.read_bytes().decode(errors="replace").replace("\r\n", "\n")
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for(self, pattern: str, timeout: float = 300.0) -> re.Match[str]:
        """Wait until the console shows a line matching the regular expression ``pattern``
        (GuestError if QEMU ends first, or at the deadline)."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.console())
            if match:
                return match
            if not self.alive():
                match = regex.search(self.console())
                if match:
                    return match
                raise GuestError(
                    f"{self.name} QEMU ended (status {self.proc.returncode}) before the guest "
                    f"printed {pattern!r}",
                    self.console(),
                    self.stderr(),
                )
            if time.monotonic() > deadline:
                raise GuestError(
                    f"the guest on the {self.name} never printed {pattern!r}",
                    self.console(),
                    self.stderr(),
                )
            time.sleep(_POLL)

    def wait_exit(self, timeout: float = 120.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(
                f"{self.name} QEMU still running after {timeout:.0f} s",
                self.console(),
                self.stderr(),
            ) from None


class MigrationPair:
    """A source QEMU running ``script`` in a guest with a virtio-fs device on ``src_socket``,
    and a destination QEMU waiting for it with its device on ``dst_socket`` (both daemons
    already listening). Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        workdir: Path,
        script: str,
        src_socket: str,
        dst_socket: str,
        *,
        tag: str = "share",
        qemu: str = "sid",
        memory_mb: int = 512,
        smp: int = 2,
        queue_size: int = 1024,
        kernel_args: str = KERNEL_ARGS,
    ) -> None:
        self.workdir = workdir
        self.nonce = secrets.token_hex(8)
        self._status = re.compile(rf"<<<pyvirtiofsd:{self.nonce}:status=(\d+)>>>")
        self.source: Vm | None = None
        self.destination: Vm | None = None
        self._uri = f"unix:{workdir / 'migration.sock'}"
        initrd = workdir / "initrd.cpio"
        env = f"HARNESS_NONCE={self.nonce}\nHARNESS_ROOTFS=\n"
        with initrd.open("wb") as out, assets.base_initramfs().open("rb") as base:
            shutil.copyfileobj(base, out)
            out.write(
                assets.run_archive(
                    [
                        ("harness/env", env.encode(), 0o644),
                        ("harness/script", script.encode(), 0o755),
                    ]
                )
            )
        self._command = assets.qemu_command(qemu)
        self._options = dict(
            kernel=assets.kernel(),
            initrd=initrd,
            memory_mb=memory_mb,
            smp=smp,
            kernel_args=kernel_args,
        )
        self._device = dict(tag=tag, queue_size=queue_size)
        try:
            self.destination = self._start("destination", dst_socket, incoming=True)
            self.source = self._start("source", src_socket, incoming=False)
        except BaseException:
            self.close()
            raise

    def _start(self, name: str, sock: str, *, incoming: bool) -> Vm:
        device = FsDevice(socket=sock, **self._device)  # type: ignore[arg-type]
        console = self.workdir / f"console-{name}.txt"
        qmp_path = self.workdir / f"qmp-{name}.sock"
        argv = [
            *self._command.argv,
            *qemu_args([device], console_file=console, **self._options),  # type: ignore[arg-type]
            "-qmp",
            f"unix:{qmp_path},server=on,wait=off",
        ]
        if incoming:
            argv += ["-incoming", "defer"]
        stderr_path = self.workdir / f"qemu-{name}.stderr"
        with stderr_path.open("wb") as stderr:
            proc = spawn_child(
                argv,
                self._command.environ(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        vm = Vm(name, proc, console, stderr_path, argv=argv)
        try:
            vm.qmp = Qmp.connect(qmp_path)
        except QmpError as e:
            kill_child(proc)
            raise GuestError(f"{name} QEMU: {e}", vm.console(), vm.stderr()) from None
        return vm

    @property
    def src(self) -> Vm:
        assert self.source is not None
        return self.source

    @property
    def dst(self) -> Vm:
        assert self.destination is not None
        return self.destination

    @property
    def incoming(self) -> str:
        """The Unix socket the destination takes the migration stream on (once migrating)."""
        return self._uri.removeprefix("unix:")

    @staticmethod
    def qmp(vm: Vm) -> Qmp:
        assert vm.qmp is not None
        return vm.qmp

    def migrate(
        self,
        *,
        timeout: float = 300.0,
        parameters: dict[str, Any] | None = None,
        on_poll: Any = None,
        via: str | None = None,
    ) -> dict[str, Any]:
        """Migrate the guest from the source to the destination; the last ``query-migrate``
        (its ``status`` is one of :data:`FINAL_STATES`). ``parameters`` go to
        ``migrate-set-parameters`` first; ``on_poll(info)`` sees each ``query-migrate`` on the
        way. ``via``: a Unix socket the source sends the stream to instead, whose listener
        passes it on to :attr:`incoming` (a benchmark reading the stream on its way)."""
        src, dst = self.qmp(self.src), self.qmp(self.dst)
        dst.command("migrate-incoming", uri=self._uri)
        src.command(
            "migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}]
        )
        if parameters:
            src.command("migrate-set-parameters", **parameters)
        src.command("migrate", uri=self._uri if via is None else f"unix:{via}")
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = src.command("query-migrate")
            if on_poll is not None:
                on_poll(info)
            if info.get("status") in FINAL_STATES:
                return info
            if time.monotonic() > deadline:
                raise GuestError(
                    f"migration not done after {timeout:.0f} s: {info}",
                    self.src.console(),
                    self.src.stderr() + self.dst.stderr(),
                )
            time.sleep(_POLL)

    def wait_running(self, vm: Vm, timeout: float = 120.0) -> None:
        """Wait until ``vm`` runs. A precopy source reports "completed" once it has sent
        everything; the destination may still be loading the devices' state then."""
        qmp = self.qmp(vm)
        deadline = time.monotonic() + timeout
        while (status := qmp.command("query-status")["status"]) != "running":
            if status not in ("inmigrate", "paused", "prelaunch", "finish-migrate"):
                raise GuestError(f"the {vm.name} is {status}", vm.console(), vm.stderr())
            if time.monotonic() > deadline:
                raise GuestError(
                    f"the {vm.name} is still {status} after {timeout:.0f} s",
                    vm.console(),
                    vm.stderr(),
                )
            time.sleep(_POLL)

    def status(self, vm: Vm, timeout: float = 300.0) -> int:
        """Wait for the script's exit status on ``vm``'s console."""
        return int(vm.wait_for(self._status.pattern, timeout).group(1))

    def output(self, vm: Vm) -> str:
        """What the script printed on ``vm``'s console (after its start marker, if there)."""
        text = vm.console()
        begin = f"<<<pyvirtiofsd:{self.nonce}:begin>>>\n"
        if begin in text:
            text = text.split(begin, 1)[1]
        return self._status.split(text, 1)[0]

    def close(self) -> None:
        """Stop both QEMUs: ``quit`` over QMP, then SIGKILL for one that does not end."""
        for vm in (self.source, self.destination):
            if vm is None:
                continue
            if vm.alive() and vm.qmp is not None:
                try:
                    vm.qmp.command("quit")
                except QmpError:
                    pass
                try:
                    vm.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            kill_child(vm.proc)
            if vm.qmp is not None:
                vm.qmp.close()
                vm.qmp = None

    def __enter__(self) -> MigrationPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
