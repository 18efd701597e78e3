"""Where the VM harness finds QEMU, the guest kernel, busybox and the reference daemons.

Everything comes from `.ci/install-vm-assets`, which fills a cache directory
(`$PYVIRTIOFSD_CACHE`, default `/var/cache/pyvirtiofsd`) with a sid chroot and a guest kernel.
Programs from the chroot need sid's libc, which the bookworm host must never get; they run on the
host through the chroot's own dynamic loader instead of `chroot(2)`, so that they see the host's
paths (sockets, shared directories) unchanged.

The initramfs is built here too: static busybox plus an init script, written as a newc cpio
archive by a few lines of Python so that no cpio tool is needed.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CACHE_ENV",
    "DEFAULT_CACHE",
    "HOST_QEMU",
    "INIT_SCRIPT",
    "INSTALL_HINT",
    "LEGACY_VIRTIOFSD",
    "QEMU_FLAVORS",
    "AssetsMissing",
    "Command",
    "CpioWriter",
    "base_initramfs",
    "busybox",
    "cache_dir",
    "fio_command",
    "initramfs_dir",
    "kernel",
    "legacy_virtiofsd_command",
    "missing_assets",
    "qemu_command",
    "run_archive",
    "rust_virtiofsd_command",
    "sid_program",
    "sid_root",
    "writable_cache",
]

CACHE_ENV = "PYVIRTIOFSD_CACHE"
DEFAULT_CACHE = "/var/cache/pyvirtiofsd"
INSTALL_HINT = "run `.ci/install-vm-assets` as root to install the VM assets"

# The legacy C daemon that bookworm's qemu-system-common ships next to QEMU 7.2.
LEGACY_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
HOST_QEMU = "/usr/bin/qemu-system-x86_64"
QEMU_FLAVORS = ("sid", "bookworm")

_LIBDIR = "usr/lib/x86_64-linux-gnu"
# librados (pulled in by fio) finds libceph-common through a RUNPATH of /usr/lib/.../ceph. The
# loader would look for it on the host, so the chroot's copy of that directory is named too.
_LIB_SUBDIRS = ("", "ceph")
# Debian's QEMU looks for firmware in these directories (its configured firmware path); without
# -L for each of them the sid QEMU would silently load bookworm's ROMs from the host.
_SID_FIRMWARE_DIRS = ("usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu")


class AssetsMissing(RuntimeError):
    """A file the harness needs is not installed."""


@dataclass(frozen=True)
class Command:
    """A program to start: its argv prefix and the environment variables it additionally needs."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def sid_root() -> Path:
    return cache_dir() / "sid"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise AssetsMissing(f"{what} not found at {path}: {INSTALL_HINT}")
    return path


def kernel() -> Path:
    """The guest kernel: the uncompressed PVH-bootable vmlinux if there, else the vmlinuz.

    QEMU enters a vmlinux with a PVH note directly in the kernel, skipping the real-mode setup
    and the decompressor, which saves about a second per boot under TCG.
    """
    vmlinux = cache_dir() / "vmlinux"
    if vmlinux.exists() and _has_pvh_note(vmlinux):
        return vmlinux
    return _require(cache_dir() / "vmlinuz", "guest kernel")


_PT_INTERP = 3
_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def _elf_segments(path: Path, p_type: int) -> list[bytes]:
    """The contents of the segments of one type in a 64-bit little-endian ELF file."""
    with path.open("rb") as f:
        header = f.read(64)
        if header[:5] != b"\x7fELF\x02":
            raise AssetsMissing(f"{path} is not a 64-bit ELF file")
        (phoff,) = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        f.seek(phoff)
        phdrs = f.read(phentsize * phnum)
        segments = []
        for i in range(phnum):
            kind, _flags, offset, _vaddr, _paddr, size = struct.unpack_from(
                "<IIQQQQ", phdrs, i * phentsize
            )
            if kind == p_type:
                f.seek(offset)
                segments.append(f.read(size))
        return segments


def _has_pvh_note(path: Path) -> bool:
    """Whether an ELF kernel has the PVH entry point note that QEMU needs to boot it."""
    try:
        notes_segments = _elf_segments(path, _PT_NOTE)
    except AssetsMissing:
        return False
    for notes in notes_segments:
        pos = 0
        while pos + 12 <= len(notes):
            namesz, descsz, n_type = struct.unpack_from("<III", notes, pos)
            name = notes[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def busybox() -> Path:
    # busybox-static installs here; the dynamic busybox package would not run inside an
    # initramfs that has no libc, hence the check.
    path = _require(Path("/bin/busybox"), "static busybox (package busybox-static)")
    if _elf_segments(path, _PT_INTERP):
        raise AssetsMissing(f"{path} is dynamically linked: install busybox-static")
    return path


def sid_program(relpath: str, *, env: dict[str, str] | None = None) -> Command:
    """A program of the sid chroot, run on the host through the chroot's loader and libraries."""
    root = sid_root()
    loader = _require(root / _LIBDIR / "ld-linux-x86-64.so.2", "sid chroot loader")
    program = _require(root / relpath, f"sid program {relpath}")
    libpath = ":".join(str(root / _LIBDIR / sub) for sub in _LIB_SUBDIRS)
    return Command([str(loader), "--library-path", libpath, str(program)], env or {})


def qemu_command(flavor: str = "sid") -> Command:
    """QEMU for `flavor`: 'sid' (11.x, from the chroot) or 'bookworm' (7.2, the host's)."""
    if flavor == "bookworm":
        return Command([str(_require(Path(HOST_QEMU), "QEMU 7.2 (package qemu-system-x86)"))])
    if flavor != "sid":
        raise ValueError(f"unknown QEMU flavor {flavor!r}; expected one of {QEMU_FLAVORS}")
    root = sid_root()
    # Modules (display, audio, ...) are looked up in the compiled-in /usr/lib path, which holds
    # the host's 7.2 modules; loading those into 11.x would fail, so point QEMU at its own.
    command = sid_program(
        "usr/bin/qemu-system-x86_64", env={"QEMU_MODULE_DIR": str(root / _LIBDIR / "qemu")}
    )
    firmware = [arg for d in _SID_FIRMWARE_DIRS for arg in ("-L", str(root / d))]
    return Command([*command.argv, *firmware], command.env)


def rust_virtiofsd_command() -> Command:
    """The Rust reference virtiofsd (1.14) from the sid chroot; append its options."""
    return sid_program("usr/libexec/virtiofsd")


def legacy_virtiofsd_command() -> Command:
    """The legacy C virtiofsd of QEMU 7.2 (bookworm); append its options."""
    return Command([str(_require(Path(LEGACY_VIRTIOFSD), "legacy C virtiofsd"))])


def fio_command() -> Command:
    """fio from the sid chroot, to run on the host (inside a rootfs='sid' guest it is plain fio)."""
    return sid_program("usr/bin/fio")


def missing_assets(*, qemu: str = "sid", rootfs: str | None = None) -> list[str]:
    """Reasons why a guest with these settings cannot boot here; empty when everything is there.

    Tests use this to skip with a clear message rather than fail on a machine without assets.
    """
    checks = [kernel, busybox, lambda: qemu_command(qemu)]
    if rootfs is not None:
        checks.append(rust_virtiofsd_command)
    reasons = []
    for check in checks:
        try:
            check()
        except AssetsMissing as exc:
            reasons.append(str(exc))
    return reasons


# --- initramfs -----------------------------------------------------------------------------------


class CpioWriter:
    """Writes a newc ("070701") cpio archive, the format the kernel unpacks as initramfs.

    Only what an initramfs needs: directories, regular files, symlinks and device nodes, all
    owned by root. Inode numbers just have to be distinct within one archive.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._ino += 1
        # The header plus name, and the data, are each padded to a multiple of 4 bytes.
        self._append(header + encoded)
        self._append(data)

    def _append(self, chunk: bytes) -> None:
        self._parts.append(chunk + b"\0" * (-len(chunk) % 4))
        self._size += len(self._parts[-1])

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        # Pad to a block so that further archives can be appended to this one; the kernel skips
        # the zeros between concatenated archives.
        data = b"".join(self._parts)
        return data + b"\0" * (-len(data) % 512)


# The init script in the base initramfs. Per run, a second archive adds /harness/env and
# /harness/script. Markers carry a per-run nonce so that a script that happens to print
# something marker-like cannot confuse the harness.
INIT_SCRIPT = r"""#!/bin/busybox sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /dev/shm && mount -t tmpfs shm /dev/shm
. /harness/env
marker() { echo "<<<pyvirtiofsd:$HARNESS_NONCE:$1>>>"; }

# Raw script output on the console: no CR added before each LF, no kernel messages in between
# (the kernel log is printed after the script instead).
stty -onlcr 2>/dev/null
dmesg -n 1

fail_setup() {
    echo "harness: $1"
    marker setup-failed
    dmesg
    poweroff -f
}

if [ -n "$HARNESS_ROOTFS" ]; then
    # A full userland served read-only by a daemon the harness started; writable tmpfs where a
    # system expects to write, fresh kernel filesystems, and the script copied in.
    R=/newroot
    mkdir -p $R
    mount -t virtiofs -o ro "$HARNESS_ROOTFS" $R || fail_setup "cannot mount the rootfs"
    for d in tmp run var/tmp mnt root; do
        [ -d $R/$d ] && mount -t tmpfs tmpfs $R/$d
    done
    mount -t proc proc $R/proc && mount -t sysfs sys $R/sys && mount -t devtmpfs dev $R/dev \
        || fail_setup "cannot mount proc/sys/dev in the rootfs"
    mount -t tmpfs shm $R/dev/shm
    cp /harness/script $R/tmp/.pyvirtiofsd-script
    marker begin
    chroot $R /bin/sh /tmp/.pyvirtiofsd-script </dev/null
    status=$?
else
    marker begin
    sh /harness/script </dev/null
    status=$?
fi
echo
marker "status=$status"

# Flush and unmount what the script mounted so the daemons see the guest's writes and the
# unmount (FUSE_DESTROY etc.) before QEMU goes away. Deepest mounts first.
sync
for m in $(awk '$3 == "virtiofs" { print $2 }' /proc/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
done
marker kernel-log
dmesg
marker end
poweroff -f
"""


def writable_cache(name: str) -> Path:
    """A writable directory ``name`` for things built from the assets: in the asset cache if
    that is writable, else in the user's cache (a run without root)."""
    preferred = cache_dir() / name
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    fallback = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyvirtiofsd"
    fallback /= name
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def initramfs_dir() -> Path:
    """A writable directory for built initramfs images."""
    return writable_cache("initramfs")


def _applet_links(busybox_path: Path) -> list[str]:
    """Paths (like 'sbin/poweroff') under which busybox offers its applets."""
    listing = subprocess.run(
        [str(busybox_path), "--list-full"], check=True, capture_output=True, text=True
    ).stdout
    return [line.strip().lstrip("/") for line in listing.splitlines() if line.strip()]


def base_initramfs() -> Path:
    """The cached initramfs with busybox and init; rebuilt when either changes."""
    bb_path = busybox()
    bb = bb_path.read_bytes()
    key = hashlib.sha256(bb + INIT_SCRIPT.encode()).hexdigest()[:16]
    target = initramfs_dir() / f"base-{key}.cpio"
    if target.exists():
        return target

    cpio = CpioWriter()
    for d in (
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "mnt",
        "root",
        "harness",
    ):
        cpio.directory(d)
    # The kernel opens /dev/console before init runs, when devtmpfs is not mounted yet; without
    # this node init would start with no stdin/stdout at all.
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", bb, 0o755)
    # Links made at build time rather than by `busybox --install` on every boot.
    for link in _applet_links(bb_path):
        if link != "bin/busybox":
            cpio.symlink(link, "/bin/busybox")
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)

    # Written aside and renamed: guests booting in parallel must never see half an archive.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as out:
        out.write(cpio.finish())
        os.fchmod(out.fileno(), 0o644)
    os.replace(tmp, target)
    return target


def run_archive(files: Iterable[tuple[str, bytes, int]]) -> bytes:
    """A small archive of per-run files (name, data, mode), to append to the base initramfs."""
    cpio = CpioWriter()
    for name, data, mode in files:
        cpio.file(name, data, mode)
    return cpio.finish()
