from __future__ import annotations

import logging
import mmap
import os

import pytest

from pyvirtiofsd.testing.frontend import GuestRam
from pyvirtiofsd.virtio.memory import GuestMemory, GuestMemoryError, MappedRegion, RegionSpec
from tests.virtio.conftest import map_ram

MiB = 1 << 20


def test_translate_inside_one_region(ram: GuestRam, memory: GuestMemory) -> None:
    ram.write(0x1000, b"hello")
    view = memory.translate(0x1000, 5)
    assert bytes(view) == b"hello"
    view[:] = b"HELLO"
    assert ram.read(0x1000, 5) == b"HELLO"
    second = ram.regions[1].guest_addr
    ram.write(second + 10, b"xyz")
    assert bytes(memory.translate(second + 10, 3)) == b"xyz"


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (8 * MiB, 1),  # just past the end
        (8 * MiB - 1, 2),  # straddles the end
        (2**64 - 1, 1),
        (2**64 - 16, 2**32 - 1),
        (4 * MiB - 1, 2),  # spans two regions: translate() wants one
        (0, 2**32 - 1),  # a huge descriptor length
    ],
)
def test_translate_rejects_out_of_range(memory: GuestMemory, addr: int, length: int) -> None:
    with pytest.raises(GuestMemoryError):
        memory.translate(addr, length)


def test_translate_into_spans_adjacent_regions(ram: GuestRam, memory: GuestMemory) -> None:
    boundary = ram.regions[1].guest_addr
    ram.write(boundary - 3, b"abc")
    ram.write(boundary, b"def")
    out: list[memoryview] = []
    memory.translate_into(boundary - 3, 6, out)
    assert [bytes(v) for v in out] == [b"abc", b"def"]


def test_translate_into_zero_length_and_errors(memory: GuestMemory) -> None:
    out: list[memoryview] = []
    memory.translate_into(2**64 - 1, 0, out)
    assert out == []
    with pytest.raises(GuestMemoryError):
        memory.translate_into(8 * MiB - 2, 4, out)
    with pytest.raises(GuestMemoryError):
        memory.translate_into(2**63, 4, out)
    assert out == []


def test_translate_into_refuses_holes() -> None:
    ram = GuestRam(2 * MiB, regions=2, gap=MiB)
    memory = map_ram(ram)
    try:
        end = ram.regions[0].guest_addr + ram.regions[0].size
        out: list[memoryview] = []
        with pytest.raises(GuestMemoryError, match="hole"):
            memory.translate_into(end - 4, 8, out)
        assert out == []
    finally:
        for r in memory.regions:
            r.close()
        ram.close()


def test_translate_user(ram: GuestRam, memory: GuestMemory) -> None:
    gpa = ram.regions[1].guest_addr + 0x40
    ram.write(gpa, b"ring")
    user = ram.user_addr(gpa)
    assert user != gpa
    assert bytes(memory.translate_user(user, 4)) == b"ring"
    assert memory.user_to_guest(user) == gpa
    with pytest.raises(GuestMemoryError):
        memory.translate_user(gpa, 4)  # a guest address is not a front-end address
    with pytest.raises(GuestMemoryError):
        memory.translate_user(ram.user_addr(ram.regions[0].guest_addr) + 4 * MiB - 2, 4)


def _spec(guest: int, size: int, user: int, offset: int = 0) -> RegionSpec:
    return RegionSpec(guest, size, user, offset)


def test_overlapping_regions_are_refused(ram: GuestRam) -> None:
    a = MappedRegion.map_fd(_spec(0, MiB, 0x10_0000_0000), ram.fd)
    b = MappedRegion.map_fd(_spec(MiB // 2, MiB, 0x20_0000_0000), ram.fd)
    c = MappedRegion.map_fd(_spec(4 * MiB, MiB, 0x10_0008_0000), ram.fd)
    try:
        with pytest.raises(GuestMemoryError, match="guest-physical"):
            GuestMemory([a, b])
        with pytest.raises(GuestMemoryError, match="front-end"):
            GuestMemory([a, c])
        assert len(GuestMemory([b, c])) == 2
    finally:
        for r in (a, b, c):
            r.close()


@pytest.mark.parametrize(
    "spec",
    [
        _spec(0, 0, 0),
        _spec(2**64 - MiB, 2 * MiB, 0),
        _spec(0, 2 * MiB, 2**64 - MiB),
        _spec(0, MiB, 0, 2**64 - 4096),
        _spec(0, 16 * MiB, 0),  # larger than the file
        _spec(0, MiB, 0, 8 * MiB),  # offset past the end of the file
    ],
)
def test_bad_region_specs(ram: GuestRam, spec: RegionSpec) -> None:
    with pytest.raises(GuestMemoryError):
        MappedRegion.map_fd(spec, ram.fd)


def test_bad_region_fds(tmp_path: object) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(GuestMemoryError, match="not a memory file"):
            MappedRegion.map_fd(_spec(0, 4096, 0), r)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(GuestMemoryError, match="bad fd"):
        MappedRegion.map_fd(_spec(0, 4096, 0), 10_000)


def test_unaligned_mmap_offset(ram: GuestRam) -> None:
    ram.write(0x123, b"odd")
    region = MappedRegion.map_fd(_spec(0x10000, 4096, 0x5000, 0x123), ram.fd)
    try:
        assert bytes(GuestMemory([region]).translate(0x10000, 3)) == b"odd"
    finally:
        region.close()


def test_device_region_is_translated(memory: GuestMemory) -> None:
    window = mmap.mmap(-1, 2 * MiB)
    region = MappedRegion.from_buffer(1 << 40, window, name="dax")
    with_dax = memory.with_region(region)
    with_dax.translate(1 << 40, 4)[:] = b"dax!"
    assert window[:4] == b"dax!"
    with pytest.raises(GuestMemoryError):
        memory.translate(1 << 40, 4)  # the old snapshot is unchanged
    with pytest.raises(GuestMemoryError):
        with_dax.translate_user(1 << 40, 4)  # device regions have no front-end address
    with pytest.raises(GuestMemoryError):
        with_dax.with_region(MappedRegion.from_buffer(0x1000, bytearray(16)))
    assert with_dax.without_region(region).regions == memory.regions
    assert region.close()
    window.close()


def test_find_region(ram: GuestRam, memory: GuestMemory) -> None:
    r = ram.regions[1]
    assert memory.find(r.guest_addr, r.size, r.user_addr) is memory.regions[1]
    assert memory.find(r.guest_addr, r.size, r.user_addr + 1) is None


def test_close_with_live_views_defers_unmap(
    ram: GuestRam, caplog: pytest.LogCaptureFixture
) -> None:
    region = MappedRegion.map_fd(_spec(0, MiB, 0), ram.fd)
    memory = GuestMemory([region])
    view = memory.translate(0, 16)
    with caplog.at_level(logging.WARNING):
        assert region.close() is False
    assert "still alive" in caplog.text
    view[:4] = b"safe"  # still mapped: the view keeps the mapping alive
    view.release()


def test_close_unmaps(ram: GuestRam) -> None:
    region = MappedRegion.map_fd(_spec(0, MiB, 0), ram.fd)
    view = GuestMemory([region]).translate(0, 16)
    view.release()
    assert region.close() is True


def test_guest_ranges_from_views() -> None:
    lo, hi = bytearray(1 << 20), bytearray(1 << 20)
    memory = GuestMemory(
        [
            MappedRegion.from_buffer(0, lo, name="lo"),
            MappedRegion.from_buffer(4 << 20, hi, name="hi"),
        ]
    )
    views = [memory.translate(0x1000, 100), memory.translate((4 << 20) + 0x2345, 50)]
    views.insert(1, memoryview(bytearray(10)))  # not guest memory: skipped
    assert memory.guest_ranges(views, 0) == []
    assert memory.guest_ranges(views, 110) == [(0x1000, 100)]
    assert memory.guest_ranges(views, 120) == [(0x1000, 100), ((4 << 20) + 0x2345, 10)]
    assert memory.guest_ranges(views, 1000) == [(0x1000, 100), ((4 << 20) + 0x2345, 50)]
    for v in views:
        v.release()
