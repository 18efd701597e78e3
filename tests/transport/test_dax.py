"""The DAX mapping rules, without I/O: what each request unmaps and maps."""

from __future__ import annotations

import errno

import pytest

from pyvirtiofsd.transport.dax import MappedFile, Mapping, MappingTable

K = 4096
A = MappedFile(-1, "A")
B = MappedFile(-1, "B")


def m(
    moffset: int, length: int, foffset: int = 0, file: MappedFile = A, w: bool = False
) -> Mapping:
    return Mapping(moffset * K, length * K, foffset * K, w, file)


def apply(table: MappingTable, plan) -> None:  # type: ignore[no-untyped-def]
    for old in plan.unmap:
        table.remove(old)
    for new in plan.map:
        table.add(new)


def layout(table: MappingTable) -> list[tuple[int, int, int, str]]:
    return [(x.moffset // K, x.length // K, x.foffset // K, x.file.owner) for x in table]


@pytest.fixture
def table() -> MappingTable:
    return MappingTable(64 * K, max_mappings=8)


def test_setup_on_empty_space(table: MappingTable) -> None:
    plan = table.plan_setup(m(0, 4))
    assert plan.unmap == [] and layout_of(plan.map) == [(0, 4, 0, "A")]


def layout_of(maps: list[Mapping]) -> list[tuple[int, int, int, str]]:
    return [(x.moffset // K, x.length // K, x.foffset // K, x.file.owner) for x in maps]


def test_perfect_overlap_replaces(table: MappingTable) -> None:
    apply(table, table.plan_setup(m(0, 4)))
    plan = table.plan_setup(m(0, 4, 10, B))
    assert layout_of(plan.unmap) == [(0, 4, 0, "A")]
    assert layout_of(plan.map) == [(0, 4, 10, "B")]
    apply(table, plan)
    assert layout(table) == [(0, 4, 10, "B")]


def test_overlap_in_the_middle_splits_in_two(table: MappingTable) -> None:
    apply(table, table.plan_setup(m(0, 8, 100)))
    plan = table.plan_setup(m(2, 2, 0, B))
    assert layout_of(plan.unmap) == [(0, 8, 100, "A")]
    # the surviving pieces keep their file offsets
    assert layout_of(plan.map) == [(0, 2, 100, "A"), (4, 4, 104, "A"), (2, 2, 0, "B")]
    apply(table, plan)
    assert layout(table) == [(0, 2, 100, "A"), (2, 2, 0, "B"), (4, 4, 104, "A")]


def test_overlap_across_several_mappings(table: MappingTable) -> None:
    apply(table, table.plan_setup(m(0, 4)))
    apply(table, table.plan_setup(m(4, 4, 4)))
    apply(table, table.plan_setup(m(8, 4, 8)))
    plan = table.plan_setup(m(2, 8, 0, B))
    assert layout_of(plan.unmap) == [(0, 4, 0, "A"), (4, 4, 4, "A"), (8, 4, 8, "A")]
    assert layout_of(plan.map) == [(0, 2, 0, "A"), (10, 2, 10, "A"), (2, 8, 0, "B")]


def test_overlap_at_one_end_splits_in_one(table: MappingTable) -> None:
    apply(table, table.plan_setup(m(0, 4)))
    plan = table.plan_setup(m(2, 4, 0, B))
    assert layout_of(plan.map) == [(0, 2, 0, "A"), (2, 4, 0, "B")]


def test_adjacent_mappings_do_not_overlap(table: MappingTable) -> None:
    apply(table, table.plan_setup(m(0, 4)))
    plan = table.plan_setup(m(4, 4))
    assert plan.unmap == []


def test_remove_part_splits(table: MappingTable) -> None:
    apply(table, table.plan_setup(m(0, 8, 20)))
    plan = table.plan_remove(3 * K, 2 * K)
    assert layout_of(plan.unmap) == [(0, 8, 20, "A")]
    assert layout_of(plan.map) == [(0, 3, 20, "A"), (5, 3, 25, "A")]
    apply(table, plan)
    plan = table.plan_remove(0, 64 * K)
    assert len(plan.unmap) == 2 and plan.map == []


def test_remove_of_unmapped_space_does_nothing(table: MappingTable) -> None:
    plan = table.plan_remove(10 * K, K)
    assert plan.unmap == [] and plan.map == []


@pytest.mark.parametrize(
    "moffset,length,foffset",
    [
        (60 * K, 8 * K, 0),
        (0, 0, 0),
        (1, K, 0),
        (0, 100, 0),
        (0, K, 5),
        (-K, 2 * K, 0),
        (1 << 62, 1 << 62, 0),
    ],
)
def test_rejections(table: MappingTable, moffset: int, length: int, foffset: int) -> None:
    with pytest.raises(OSError) as e:
        table.plan_setup(Mapping(moffset, length, foffset, False, A))
    assert e.value.errno == errno.EINVAL


def test_runs_out_of_slots_until_something_is_removed(table: MappingTable) -> None:
    for i in range(8):
        apply(table, table.plan_setup(m(2 * i, 1)))
    with pytest.raises(OSError) as e:
        table.plan_setup(m(20, 1))
    assert e.value.errno == errno.ENOSPC
    # a replacement needs no new slot
    apply(table, table.plan_setup(m(0, 1, 0, B)))
    apply(table, table.plan_remove(0, K))
    apply(table, table.plan_setup(m(20, 1)))
    assert len(table) == 8


def test_reference_counts_follow_the_pieces(table: MappingTable) -> None:
    f = MappedFile(-1, "F")
    apply(table, table.plan_setup(m(0, 8, 0, f)))
    assert f.refs == 1
    apply(table, table.plan_setup(m(2, 2, 0, B)))
    assert f.refs == 2
    apply(table, table.plan_remove(0, 64 * K))
    assert f.refs == 0
