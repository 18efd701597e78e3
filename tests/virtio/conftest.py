"""Fixtures for the virtio layer: guest RAM in a memfd and a driver queue in it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from pyvirtiofsd.testing.frontend import DriverQueue, GuestRam
from pyvirtiofsd.virtio.memory import GuestMemory, MappedRegion, RegionSpec


def map_ram(ram: GuestRam) -> GuestMemory:
    """The daemon's view of ``ram``: every region mapped from the memfd."""
    return GuestMemory(
        MappedRegion.map_fd(RegionSpec(r.guest_addr, r.size, r.user_addr, r.offset), ram.fd)
        for r in ram.regions
    )


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    ram = GuestRam(8 << 20, regions=2)
    yield ram
    ram.close()


@pytest.fixture
def memory(ram: GuestRam) -> Iterator[GuestMemory]:
    memory = map_ram(ram)
    yield memory
    for region in memory.regions:
        region.close()


MakeDriver = Callable[..., DriverQueue]


@pytest.fixture
def make_driver() -> Iterator[MakeDriver]:
    """``make_driver(ram, size=16, event_idx=False)``: a driver queue closed afterwards."""
    made: list[DriverQueue] = []

    def make(ram: GuestRam, size: int = 16, *, event_idx: bool = False) -> DriverQueue:
        dq = DriverQueue(ram, 0, size, event_idx=event_idx, arena_size=1 << 20)
        made.append(dq)
        return dq

    yield make
    for dq in made:
        dq.close()
