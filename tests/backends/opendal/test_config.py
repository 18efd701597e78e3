"""``pyvirtiofsd --opendal``: a bad scheme, option or store ends the daemon with exit status 2
and a clear message before it listens or mounts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import is_mounted
from tests.opendal_fixtures import DAEMON, MotoServer, s3_options


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DAEMON, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


def opts(options: dict[str, str]) -> list[str]:
    out = []
    for k, v in options.items():
        out += ["--opendal-opt", f"{k}={v}"]
    return out


def refused(work: Path, *args: str, transport: str = "socket") -> str:
    sock = work / "vfs.sock"
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    where = ["--socket-path", str(sock)] if transport == "socket" else ["--mount", str(mnt)]
    r = run(*args, *where)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert not sock.exists()
    assert not is_mounted(mnt)
    assert "Traceback" not in r.stderr
    return r.stderr


def test_unknown_scheme(work: Path) -> None:
    err = refused(work, "--opendal", "nosuchservice")
    assert "--opendal nosuchservice" in err and "not registered" in err


def test_unknown_option_key(work: Path) -> None:
    err = refused(
        work, "--opendal", "fs", "--opendal-opt", f"root={work}", "--opendal-opt", "rot=x"
    )
    assert "unknown option for the fs service: rot" in err
    assert "root" in err


def test_missing_required_option(work: Path) -> None:
    err = refused(work, "--opendal", "s3", transport="mount")
    assert "cannot build the s3 service" in err


def test_malformed_option(work: Path) -> None:
    err = refused(work, "--opendal", "memory", "--opendal-opt", "novalue")
    assert "KEY=VALUE" in err
    err = refused(work, "--opendal-opt", "root=/x", "--shared-dir", str(work))
    assert "need --opendal" in err
    err = refused(work, "--opendal", "memory", "--shared-dir", str(work))
    assert "exclude each other" in err


def test_store_that_does_not_answer(work: Path, moto_server: MotoServer) -> None:
    err = refused(work, "--opendal", "s3", *opts(s3_options(moto_server.endpoint, "nobucket")))
    assert "does not answer" in err and "NoSuchBucket" in err
    # Nothing listens on this port.
    dead = s3_options("http://127.0.0.1:9", "bucket")
    err = refused(work, "--opendal", "s3", *opts(dead), transport="mount")
    assert "does not answer" in err


def test_cache_dir_must_be_a_directory(work: Path) -> None:
    f = work / "file"
    f.write_text("")
    err = refused(work, "--opendal", "memory", "--opendal-cache-dir", str(f))
    assert "not a directory" in err


def test_good_command_line_gets_past_validation(work: Path) -> None:
    """The same check in process: a good service is accepted (no listening needed)."""
    from pyvirtiofsd.backends.opendal import OpendalConfig
    from pyvirtiofsd.cli import parse_args

    config = parse_args(
        ["--opendal", "fs", "--opendal-opt", f"root={work}", "--socket-path", str(work / "s")]
    )
    assert config is not None and isinstance(config.backend, OpendalConfig)
    assert config.backend.scheme == "fs" and config.backend.options == {"root": str(work)}
    # No --thread-pool-size: a slow store call must not hold up the requests behind it.
    assert config.transport.thread_pool_size == 8
    assert "--opendal: serving requests on 8 threads" in config.process.notices
    assert not os.path.exists(work / "s")
