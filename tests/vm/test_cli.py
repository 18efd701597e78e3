"""The ``pyvirtiofsd-vm`` command line (:mod:`pyvirtiofsd.vm.cli`), in the parts that need no
QEMU: the daemon's command line, argument parsing, the guest script, and what it refuses before
it boots anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvirtiofsd.vm import FsDevice, assets, cli


def test_daemon_command_templates() -> None:
    argv = cli.daemon_argv("/opt/d --sock={socket} -o source={shared_dir}", "/s", "/d", "t", ["-x"])
    assert argv == ["/opt/d", "--sock=/s", "-o", "source=/d", "-x"]
    argv = cli.daemon_argv("mydaemon", "/s", "/d", "t", [])
    assert argv == ["mydaemon", "--socket-path", "/s", "--shared-dir", "/d"]
    argv = cli.daemon_argv("pyvirtiofsd", "/s", "/d", "t", ["--foo"])
    assert argv[1:] == ["-m", "pyvirtiofsd", "--socket-path", "/s", "--shared-dir", "/d", "--foo"]


def test_arguments() -> None:
    args = cli.parser().parse_args(
        ["--shared-dir", "/d", "--daemon-arg=--xattr", "--daemon-arg=-v", "--", "ls", "-l"]
    )
    assert (args.shared_dir, args.qemu, args.daemon) == ("/d", "sid", "pyvirtiofsd")
    assert (args.tag, args.queues, args.generic) == ("share", 1, False)
    assert args.daemon_arg == ["--xattr", "-v"]
    assert args.command == ["ls", "-l"]
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["--shared-dir", "/d", "--qemu", "xen"])
    with pytest.raises(SystemExit):
        cli.parser().parse_args([])  # --shared-dir is required


def test_guest_script() -> None:
    device = FsDevice("/s", "share")
    one = cli.guest_script(device, ["ls /mnt; df"], "")
    assert one.endswith("|| exit 125\ncd /mnt\nls /mnt; df\n")  # one word: shell code
    several = cli.guest_script(device, ["touch", "a b"], "dax=always")
    assert "mount -t virtiofs -o dax=always share /mnt" in several
    assert several.endswith("\ntouch 'a b'\n")  # several: an argv, quoted
    assert cli.guest_script(device, [], "").endswith(cli.DEMO_COMMAND + "\n")


def test_refusals_before_any_guest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--shared-dir", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "no-assets"))
    assert cli.main(["--shared-dir", str(tmp_path)]) == 2
    assert "guest kernel not found" in capsys.readouterr().err
