"""The VM assets (:mod:`pyvirtiofsd.vm.assets`), in the parts that need no QEMU: the initramfs
writer, and the reasons given when assets are missing."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pyvirtiofsd.vm import assets


def parse_newc(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """(name, mode, data, (rdevmajor, rdevminor)) of each entry, stopping at the trailer."""
    entries = []
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmajor, rminor, namesize = (
            fields[1], fields[6], fields[9], fields[10], fields[11]
        )  # fmt: skip
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos : pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return entries
        entries.append((name, mode, body, (rmajor, rminor)))


def test_cpio_writer_round_trips() -> None:
    w = assets.CpioWriter()
    w.directory("bin")
    w.file("bin/x", b"abcde", 0o755)
    w.symlink("bin/y", "/bin/x")
    w.char_device("dev/console", 5, 1)
    data = w.finish()
    assert len(data) % 512 == 0
    entries = parse_newc(data)
    assert [e[0] for e in entries] == ["bin", "bin/x", "bin/y", "dev/console"]
    assert stat.S_ISDIR(entries[0][1])
    assert entries[1][1] == stat.S_IFREG | 0o755 and entries[1][2] == b"abcde"
    assert stat.S_ISLNK(entries[2][1]) and entries[2][2] == b"/bin/x"
    assert stat.S_ISCHR(entries[3][1]) and entries[3][3] == (5, 1)


def test_missing_assets_say_what_and_how_to_install_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty cache directory: each missing piece is named, with where it was looked for
    and how to get it, and nothing is raised at the caller (tests skip with these reasons)."""
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    assert assets.cache_dir() == tmp_path
    reasons = assets.missing_assets(qemu="sid", rootfs="sid")
    assert f"guest kernel not found at {tmp_path / 'vmlinuz'}" in reasons[0]
    assert any("sid chroot loader not found" in r for r in reasons)
    assert all(assets.INSTALL_HINT in r for r in reasons if str(tmp_path) in r)
    with pytest.raises(assets.AssetsMissing, match="guest kernel"):
        assets.kernel()


def test_an_unknown_qemu_flavor_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown QEMU flavor 'xen'"):
        assets.qemu_command("xen")
