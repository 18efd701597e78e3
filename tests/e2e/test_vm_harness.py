"""The VM harness itself, against the reference daemons (Rust virtiofsd, legacy C).

Every test boots real guests under TCG (a few seconds each) and skips with the reason when the
assets of `.ci/install-vm-assets` are not installed. The harness's pure parts are tested in
tests/vm/.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.vm import (
    FsDevice,
    GuestError,
    GuestTimeout,
    assets,
    cli,
    missing_assets,
    run_guest,
)
from pyvirtiofsd.vm.guest import kill_child, spawn_child, wait_for_socket


def require_assets(qemu: str = "sid", rootfs: str | None = None) -> None:
    reasons = missing_assets(qemu=qemu, rootfs=rootfs)
    if reasons:
        pytest.skip("; ".join(reasons))


def children_of_this_process() -> list[str]:
    """Command names of live (not yet reaped) children: none may be left after a guest run."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.append((entry / "comm").read_text().strip())
    # Servers other tests keep for the whole session (the S3 server) are not ours.
    return [name for name in found if name not in _SESSION_SERVERS]


_SESSION_SERVERS = {"moto_server"}


Daemon = Callable[..., str]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """Starts a reference daemon on a socket in tmp_path; returns the socket path."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(kind: str, shared_dir: Path, *extra: str) -> str:
        sock = str(tmp_path / f"{kind}-{len(procs)}.sock")
        if kind == "rust":
            argv = [
                *assets.rust_virtiofsd_command().argv,
                "--shared-dir", str(shared_dir), "--socket-path", sock, "--sandbox", "none",
                *extra,
            ]  # fmt: skip
        else:
            argv = [
                *assets.legacy_virtiofsd_command().argv,
                f"--socket-path={sock}", "-o", f"source={shared_dir}", "-o", "cache=auto",
                *extra,
            ]  # fmt: skip
        log = (tmp_path / f"{kind}-{len(procs)}.log").open("wb")
        proc = spawn_child(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        procs.append(proc)
        wait_for_socket(sock, proc)
        return sock

    yield start
    for proc in procs:
        kill_child(proc, grace=5.0)


# --- real guests ---------------------------------------------------------------------------------


@pytest.mark.vm
@pytest.mark.parametrize("qemu", ["sid", "bookworm"])
def test_script_output_and_status(qemu: str) -> None:
    require_assets(qemu)
    result = run_guest("echo hi; echo err >&2; exit 3", qemu=qemu, timeout=180)
    assert result.output == "hi\nerr\n"
    assert result.status == 3
    assert result.powered_off
    assert "Linux version" in result.kernel_log
    print(f"{qemu}: boot to script {result.boot_seconds:.2f} s")
    assert children_of_this_process() == []


@pytest.mark.vm
@pytest.mark.parametrize(
    ("qemu", "kind"),
    [("sid", "rust"), ("bookworm", "rust"), ("sid", "legacy"), ("bookworm", "legacy")],
)
def test_shared_dir_read_and_write(qemu: str, kind: str, tmp_path: Path, daemon: Daemon) -> None:
    require_assets(qemu)
    share = tmp_path / "share"
    share.mkdir()
    (share / "from-host.txt").write_text("written by the host\n")
    device = FsDevice(daemon(kind, share), "share")
    script = f"""
{device.mount_command("/mnt/share")}
cat /mnt/share/from-host.txt
echo "written by the guest" > /mnt/share/from-guest.txt
"""
    result = run_guest(script, [device], qemu=qemu, timeout=180).check()
    assert result.output == "written by the host\n"
    assert (share / "from-guest.txt").read_text() == "written by the guest\n"
    print(f"{qemu}/{kind}: boot to script {result.boot_seconds:.2f} s")


@pytest.mark.vm
def test_generic_device_takes_tag_from_backend(tmp_path: Path, daemon: Daemon) -> None:
    require_assets("sid")
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_text("generic\n")
    # The tag lives only in the daemon's config space: QEMU is not told it.
    device = FsDevice(daemon("rust", share, "--tag", "fromcfg"), "fromcfg", generic=True)
    assert "fromcfg" not in " ".join(device.qemu_args("fs0"))
    result = run_guest(
        f"{device.mount_command('/mnt/g')} && cat /mnt/g/f", [device], qemu="sid", timeout=180
    ).check()
    assert result.output == "generic\n"


@pytest.mark.vm
def test_sid_rootfs_runs_fio() -> None:
    require_assets("sid", rootfs="sid")
    result = run_guest(
        "fio --version; touch /tmp/a /run/b /var/tmp/c /root/d && echo writable",
        rootfs="sid",
        timeout=300,
    ).check()
    assert result.output.startswith("fio-3.")
    assert result.output.endswith("writable\n")
    print(f"rootfs=sid: boot to script {result.boot_seconds:.2f} s")


@pytest.mark.vm
def test_timeout_kills_the_guest() -> None:
    require_assets("sid")
    with pytest.raises(GuestTimeout) as info:
        run_guest("echo started; sleep 600", timeout=15)
    assert "started" in str(info.value)
    assert children_of_this_process() == []


@pytest.mark.vm
def test_qemu_failure_reports_its_stderr(tmp_path: Path) -> None:
    require_assets("sid")
    with pytest.raises(GuestError, match="Failed to connect"):
        run_guest("true", [FsDevice(str(tmp_path / "nobody.sock"), "x")], timeout=60)


@pytest.mark.vm
def test_cli_with_rust_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_assets("sid", rootfs=None)
    (tmp_path / "hello").write_text("hello from the host\n")
    status = cli.main(
        ["--shared-dir", str(tmp_path), "--daemon", "rust", "--", "cat hello; exit 5"]
    )
    assert status == 5
    assert capsys.readouterr().out == "hello from the host\n"
