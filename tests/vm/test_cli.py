"""The ``pyvirtiofsd-vm`` command line (:mod:`pyvirtiofsd.vm.cli`), in the parts that need no
QEMU."""

from __future__ import annotations

from pyvirtiofsd.vm import cli


def test_daemon_command_templates() -> None:
    argv = cli.daemon_argv("/opt/d --sock={socket} -o source={shared_dir}", "/s", "/d", "t", ["-x"])
    assert argv == ["/opt/d", "--sock=/s", "-o", "source=/d", "-x"]
    argv = cli.daemon_argv("mydaemon", "/s", "/d", "t", [])
    assert argv == ["mydaemon", "--socket-path", "/s", "--shared-dir", "/d"]
    argv = cli.daemon_argv("pyvirtiofsd", "/s", "/d", "t", ["--foo"])
    assert argv[1:] == ["-m", "pyvirtiofsd", "--socket-path", "/s", "--shared-dir", "/d", "--foo"]
