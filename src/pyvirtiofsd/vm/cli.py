"""`pyvirtiofsd-vm`: share a directory with a throwaway guest through a daemon, run a command.

    pyvirtiofsd-vm --shared-dir DIR [--qemu sid|bookworm] [--daemon NAME|TEMPLATE]
                   [--daemon-arg=ARG ...] [-- COMMAND...]

Starts the daemon on a fresh socket, boots a guest that mounts the share at /mnt, runs COMMAND
there (a short demo by default), prints its output and exits with its status.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from pyvirtiofsd.vm import assets
from pyvirtiofsd.vm.guest import (
    FsDevice,
    GuestError,
    kill_child,
    run_guest,
    spawn_child,
    wait_for_socket,
)

__all__ = [
    "DAEMON_PRESETS",
    "DEMO_COMMAND",
    "daemon_argv",
    "guest_script",
    "main",
    "parser",
]

DEMO_COMMAND = (
    'echo "guest kernel $(uname -r); the share is mounted at /mnt:"; '
    "grep ' /mnt ' /proc/mounts; ls -la /mnt; df -h /mnt"
)
DAEMON_PRESETS = ("pyvirtiofsd", "rust", "legacy")


def daemon_argv(
    daemon: str, socket_path: str, shared_dir: str, tag: str, extra: list[str]
) -> list[str]:
    """The command line of the daemon to start: a preset name or a template.

    A template is split like a shell command, with {socket}, {shared_dir} and {tag} replaced;
    without a {socket} placeholder, `--socket-path SOCK --shared-dir DIR` is appended (the
    options the project's daemon and the Rust virtiofsd share).
    """
    if daemon == "pyvirtiofsd":
        return [
            sys.executable, "-m", "pyvirtiofsd",
            "--socket-path", socket_path, "--shared-dir", shared_dir, *extra,
        ]  # fmt: skip
    if daemon == "rust":
        # --tag is harmless with vhost-user-fs-pci and needed with the generic device.
        return [
            *assets.rust_virtiofsd_command().argv,
            "--socket-path", socket_path, "--shared-dir", shared_dir,
            "--sandbox", "none", "--tag", tag, *extra,
        ]  # fmt: skip
    if daemon == "legacy":
        return [
            *assets.legacy_virtiofsd_command().argv,
            f"--socket-path={socket_path}", "-o", f"source={shared_dir}", *extra,
        ]  # fmt: skip
    words = shlex.split(daemon)
    if not words:
        raise ValueError("empty --daemon command")
    values = {"socket": socket_path, "shared_dir": shared_dir, "tag": tag}
    argv = [word.format(**values) for word in words]
    if "{socket}" not in daemon:
        argv += ["--socket-path", socket_path, "--shared-dir", shared_dir]
    return [*argv, *extra]


def guest_script(device: FsDevice, command: list[str], mount_options: str) -> str:
    # One word is taken as shell code ('ls /mnt; df'), several as an argv to quote.
    body = command[0] if len(command) == 1 else shlex.join(command) if command else DEMO_COMMAND
    return f"{device.mount_command('/mnt', mount_options)} || exit 125\ncd /mnt\n{body}\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyvirtiofsd-vm",
        description="Share DIR with a throwaway Linux guest (QEMU, TCG) through a virtio-fs "
        "daemon, mount it at /mnt and run COMMAND there.",
        epilog="Examples:\n"
        "  pyvirtiofsd-vm --shared-dir /srv/data\n"
        "  pyvirtiofsd-vm --shared-dir /srv/data --daemon rust -- 'cat /mnt/README; touch /mnt/x'\n"
        "  pyvirtiofsd-vm --shared-dir /srv/data --rootfs sid -- fio --name=r --rw=randread "
        "--size=16M --filename=/mnt/f\n"
        "Assets come from .ci/install-vm-assets (run it once as root).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shared-dir", required=True, help="host directory to share")
    p.add_argument(
        "--qemu", choices=assets.QEMU_FLAVORS, default="sid", help="QEMU 11.x (sid) or 7.2"
    )
    p.add_argument(
        "--daemon",
        default="pyvirtiofsd",
        metavar="NAME|TEMPLATE",
        help="pyvirtiofsd (default), rust (virtiofsd 1.14), legacy (QEMU 7.2's C virtiofsd), or a "
        "command template with {socket}, {shared_dir}, {tag}",
    )
    p.add_argument(
        "--daemon-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra daemon argument, repeatable; write --daemon-arg=--opt for options",
    )
    p.add_argument("--tag", default="share", help="virtio-fs tag (default: share)")
    p.add_argument("--mount-options", default="", help="guest mount -o options, e.g. dax=always")
    p.add_argument(
        "--generic",
        action="store_true",
        help="use QEMU 11's vhost-user-test-device-pci (the tag comes from the daemon)",
    )
    p.add_argument("--queues", type=int, default=1, help="request queues (default: 1)")
    p.add_argument("--rootfs", metavar="sid|DIR", help="run COMMAND in a full userland (fio...)")
    p.add_argument("--memory", type=int, default=2048, metavar="MB")
    p.add_argument("--smp", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="print the daemon log and boot timing"
    )
    p.add_argument("command", nargs="*", help="command to run in the guest (after --)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    shared_dir = Path(args.shared_dir).resolve()
    if not shared_dir.is_dir():
        print(f"pyvirtiofsd-vm: {shared_dir} is not a directory", file=sys.stderr)
        return 2
    missing = assets.missing_assets(qemu=args.qemu, rootfs=args.rootfs)
    if missing:
        print("pyvirtiofsd-vm: " + "\n".join(missing), file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="pyvirtiofsd-vm-") as work:
        sock = str(Path(work) / "daemon.sock")
        log_path = Path(work) / "daemon.log"
        command = daemon_argv(args.daemon, sock, str(shared_dir), args.tag, args.daemon_arg)
        device = FsDevice(sock, args.tag, num_request_queues=args.queues, generic=args.generic)
        daemon = None
        status = 1
        # The daemon's log is noise when all went well; it is the first thing to read when the
        # guest could not mount the share (the script exits 125 then) or did not finish.
        show_log = args.verbose
        try:
            with log_path.open("wb") as log:
                daemon = spawn_child(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            wait_for_socket(sock, daemon)

            def show(text: str) -> None:
                sys.stdout.write(text)
                sys.stdout.flush()

            result = run_guest(
                guest_script(device, args.command, args.mount_options),
                [device],
                qemu=args.qemu,
                memory_mb=args.memory,
                smp=args.smp,
                timeout=args.timeout,
                rootfs=args.rootfs,
                on_output=show,
            )
            if result.output and not result.output.endswith("\n"):
                show("\n")
            status = result.status
            show_log = show_log or status == 125
            if args.verbose:
                print(
                    f"pyvirtiofsd-vm: boot {result.boot_seconds:.1f} s, "
                    f"command {result.script_seconds:.1f} s, status {status}",
                    file=sys.stderr,
                )
        except GuestError as exc:
            print(f"pyvirtiofsd-vm: {exc}", file=sys.stderr)
            show_log = True
        except KeyboardInterrupt:
            status = 130
        finally:
            kill_child(daemon, grace=5.0)
            if show_log:
                log_text = log_path.read_text(errors="replace").strip()
                if log_text:
                    print(f"--- daemon log ({shlex.join(command)}) ---", file=sys.stderr)
                    print(log_text[-4000:], file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
