"""Options of the passthrough (:mod:`pyvirtiofsd.backends.passthrough.config`): complete and
frozen (a changed share is a new config), ACLs bring xattrs with them, virtiofsd's spellings are
taken, and the cache mode's timeout is what the file system tells the kernel."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pyvirtiofsd.backends.passthrough import (
    CachePolicy,
    FileHandles,
    PassthroughConfig,
    PassthroughFs,
)
from pyvirtiofsd.fuse.filesystem import ROOT
from pyvirtiofsd.fuse.server import Server
from pyvirtiofsd.testing.fuse_client import FuseClient, direct


def test_file_handles_parse_virtiofsds_spellings() -> None:
    assert [FileHandles.parse(m.value) for m in FileHandles] == list(FileHandles)
    assert FileHandles.parse("fallback") is FileHandles.PREFER  # virtiofsd's older name
    with pytest.raises(ValueError):
        FileHandles.parse("always")


def test_the_config_is_frozen() -> None:
    config = PassthroughConfig("/srv/share")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.shared_dir = "/elsewhere"  # type: ignore[misc]
    moved = dataclasses.replace(config, shared_dir="/share")  # as the sandbox makes it
    assert (config.shared_dir, moved.shared_dir) == ("/srv/share", "/share")


def test_safe_defaults() -> None:
    config = PassthroughConfig("/srv/share")
    assert not config.readonly and not config.allow_devices and not config.xattr
    assert config.switch_credentials
    assert config.inode_file_handles is FileHandles.NEVER
    assert config.cache is CachePolicy.AUTO


def test_posix_acls_bring_xattrs() -> None:
    assert PassthroughConfig("/s", posix_acl=True).xattr
    assert not PassthroughConfig("/s", posix_acl=False).xattr


@pytest.mark.parametrize("cache", list(CachePolicy))
def test_the_cache_modes_timeout_reaches_the_kernel(tmp_path: Path, cache: CachePolicy) -> None:
    (tmp_path / "f").touch()
    config = PassthroughConfig(str(tmp_path), cache=cache)
    assert config.timeout == cache.timeout
    fs = PassthroughFs(config)
    try:
        c = FuseClient(direct(Server(fs)))
        c.init()
        entry = c.lookup(ROOT, b"f")
        valid = entry.entry_valid + entry.entry_valid_nsec / 1e9
        assert valid == config.timeout
        assert entry.attr_valid + entry.attr_valid_nsec / 1e9 == config.timeout
    finally:
        fs.shutdown()


def test_id_translation_is_checked_with_the_config() -> None:
    from pyvirtiofsd.backends.passthrough.idmap import IdMapError, parse_rule

    rules = (parse_rule("map:0:100000:65536"),)
    assert PassthroughConfig("/s", translate_uid=rules).translate_uid == rules
    # ACLs carry ids in their values, which are not translated: virtiofsd refuses both too
    with pytest.raises(ValueError, match="--posix-acl exclude each other"):
        PassthroughConfig("/s", translate_gid=rules, posix_acl=True)
    with pytest.raises(IdMapError, match="both match guest uids 0-9"):
        PassthroughConfig("/s", translate_uid=(parse_rule("map:0:0:10"), parse_rule("map:0:5:10")))
