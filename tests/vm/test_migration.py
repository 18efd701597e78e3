"""The QMP client of the migration driver (:mod:`pyvirtiofsd.vm.migration`) against a QMP
server of our own on a socket pair: commands get their returns, events that come between are
kept, failures are QmpErrors; waiting for the destination to run outlasts its load and gives up
on a state it can't leave. (The driver itself runs in tests/e2e/test_migration.py.)"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.vm.guest import GuestError
from pyvirtiofsd.vm.migration import MigrationPair, Qmp, QmpError, Vm

GREETING = {"QMP": {"version": {"qemu": {"major": 11, "minor": 1}}, "capabilities": []}}


#: What the fake QEMU answers a command with (None: it goes away).
Script = Callable[[dict[str, object]], "list[dict[str, object]] | None"]


def serve(sock: socket.socket, script: Script) -> None:
    """Greet, then answer each command with what ``script`` gives (replies and events)."""
    f = sock.makefile("rwb")
    f.write(json.dumps(GREETING).encode() + b"\r\n")
    f.flush()
    for line in f:
        replies = script(json.loads(line))
        if replies is None:  # QEMU goes away
            f.close()
            sock.close()
            return
        for message in replies:
            f.write(json.dumps(message).encode() + b"\r\n")
        f.flush()


@pytest.fixture
def qmp() -> Iterator[Callable[..., Qmp]]:
    threads: list[threading.Thread] = []
    clients: list[Qmp] = []

    def start(script: Script) -> Qmp:
        ours, theirs = socket.socketpair()
        t = threading.Thread(target=serve, args=(theirs, script), daemon=True)
        t.start()
        threads.append(t)
        client = Qmp(ours, timeout=10)
        clients.append(client)
        return client

    yield start
    for c in clients:
        c.close()
    for t in threads:
        t.join(10)


def test_commands_events_and_errors(qmp: Callable[..., Qmp]) -> None:
    seen: list[dict[str, object]] = []

    def script(request: dict[str, object]) -> list[dict[str, object]]:
        seen.append(request)
        name = request["execute"]
        if name == "migrate":
            return [{"event": "MIGRATION", "data": {"status": "setup"}}, {"return": {}}]
        if name == "query-migrate":
            return [{"return": {"status": "completed", "downtime": 12}}]
        if name == "cont":
            return [{"error": {"class": "GenericError", "desc": "nothing to resume"}}]
        return [{"return": {}}]

    client = qmp(script)
    assert seen == [{"execute": "qmp_capabilities"}]
    assert client.command("migrate", uri="unix:/x") == {}
    assert seen[-1] == {"execute": "migrate", "arguments": {"uri": "unix:/x"}}
    assert client.event_names() == ["MIGRATION"]
    assert client.command("query-migrate") == {"status": "completed", "downtime": 12}
    with pytest.raises(QmpError, match="cont: nothing to resume"):
        client.command("cont")


def test_a_qemu_that_goes_away_is_a_qmp_error(qmp: Callable[..., Qmp]) -> None:
    def script(request: dict[str, object]) -> list[dict[str, object]] | None:
        if request["execute"] == "quit":
            return None
        return [{"return": {}}]

    client = qmp(script)
    with pytest.raises(QmpError, match="closed"):
        client.command("quit")


def test_connect_waits_for_the_socket_and_gives_up(tmp_path: Path) -> None:
    with pytest.raises(QmpError, match="no QMP socket"):
        Qmp.connect(tmp_path / "qmp.sock", timeout=0.2)
    path = tmp_path / "qmp.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def accept() -> None:
        conn, _ = listener.accept()
        serve(conn, lambda request: [{"return": {}}])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    client = Qmp.connect(path, timeout=10)
    client.close()
    t.join(10)
    listener.close()


def _vm(client: Qmp, tmp_path: Path) -> Vm:
    return Vm("destination", None, tmp_path / "console", tmp_path / "stderr", qmp=client)  # type: ignore[arg-type]


def test_wait_running_waits_for_the_destinations_load(
    qmp: Callable[..., Qmp], tmp_path: Path
) -> None:
    """A precopy source says "completed" before the destination has loaded the devices'
    state: the destination is "inmigrate" a while longer."""
    statuses = iter(["inmigrate", "inmigrate", "running"])
    client = qmp(lambda request: [{"return": {"status": next(statuses, "running")}}])
    MigrationPair.wait_running(object.__new__(MigrationPair), _vm(client, tmp_path))
    assert next(statuses, None) is None


def test_wait_running_gives_up_on_a_destination_that_cannot_run(
    qmp: Callable[..., Qmp], tmp_path: Path
) -> None:
    client = qmp(lambda request: [{"return": {"status": "internal-error"}}])
    with pytest.raises(GuestError, match="the destination is internal-error"):
        MigrationPair.wait_running(object.__new__(MigrationPair), _vm(client, tmp_path))
    stuck = qmp(lambda request: [{"return": {"status": "inmigrate"}}])
    with pytest.raises(GuestError, match="still inmigrate after 0 s"):
        MigrationPair.wait_running(
            object.__new__(MigrationPair), _vm(stuck, tmp_path), timeout=0.05
        )
