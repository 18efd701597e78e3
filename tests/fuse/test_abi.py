"""Every FUSE structure packs and unpacks to the same values, at the kernel's sizes."""

import random

import pytest

from pyvirtiofsd.fuse import abi

# Sizes from include/uapi/linux/fuse.h (7.45) that the kernel checks on every reply.
KNOWN_SIZES = {
    "InHeader": 40,
    "OutHeader": 16,
    "Attr": 88,
    "Kstatfs": 80,
    "EntryOut": 128,
    "AttrOut": 104,
    "InitIn": 64,
    "InitOut": 64,
    "SetattrIn": 88,
    "OpenOut": 16,
    "ReadIn": 40,
    "WriteIn": 40,
    "WriteOut": 8,
    "LkIn": 48,
    "Direntplus": 152,
    "Dirent": 24,
    "SetupmappingIn": 40,
    "RemovemappingOne": 16,
    "Statx": 256,
    "StatxOut": 288,
    "CopyFileRangeIn": 56,
    "FallocateIn": 32,
    "ReleaseIn": 24,
    "FlushIn": 24,
    "SetxattrIn": 16,
    "BackingMap": 16,
    "LseekIn": 24,
    "IoctlIn": 32,
    "PollIn": 24,
}

_RANGES = {"B": 8, "H": 16, "I": 32, "Q": 64}


def _random_values(layout: abi.Layout, rng: random.Random) -> tuple:
    values = []
    codes = [c for c in layout.struct.format.lstrip("<") if c.isalpha()]
    counts = []
    digits = ""
    for ch in layout.struct.format.lstrip("<"):
        if ch.isdigit():
            digits += ch
        else:
            counts.append(int(digits or 1))
            digits = ""
    for field, code, count in zip(layout.fields, codes, counts, strict=True):
        bits = _RANGES.get(code.upper(), 32)
        if code.islower():
            lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        else:
            lo, hi = 0, (1 << bits) - 1
        item = [rng.randint(lo, hi) for _ in range(count)]
        values.append(tuple(item) if count > 1 else item[0])
        del field
    return tuple(values)


@pytest.mark.parametrize("layout", abi.LAYOUTS, ids=lambda lay: lay.name)
def test_round_trip(layout: abi.Layout) -> None:
    rng = random.Random(layout.name)
    for _ in range(20):
        values = _random_values(layout, rng)
        raw = layout.pack(*values)
        assert len(raw) == layout.size
        assert tuple(layout.unpack(raw)) == values
        assert layout.pack(**layout.unpack(raw)._asdict()) == raw


@pytest.mark.parametrize("name,size", sorted(KNOWN_SIZES.items()))
def test_kernel_sizes(name: str, size: int) -> None:
    layout = next(lay for lay in abi.LAYOUTS if lay.name == name)
    assert layout.size == size


def test_pack_by_name_defaults_to_zero() -> None:
    raw = abi.INIT_OUT.pack(major=7, minor=45)
    out = abi.INIT_OUT.unpack(raw)
    assert (out.major, out.minor, out.flags, out.unused) == (7, 45, 0, (0,) * 11)
    with pytest.raises(TypeError):
        abi.INIT_OUT.pack(majr=7)


def test_opcode_and_flag_values() -> None:
    assert abi.Opcode.SETUPMAPPING == 48 and abi.Opcode.REMOVEMAPPING == 49
    assert abi.Opcode.COPY_FILE_RANGE_64 == 53
    assert abi.InitFlag.MAP_ALIGNMENT == 1 << 26 and abi.InitFlag.HAS_INODE_DAX == 1 << 33
    assert abi.InitFlag.PASSTHROUGH == 1 << 37
    assert abi.dirent_size(1) == 32 and abi.dirent_size(8) == 32 and abi.dirent_size(9) == 40
