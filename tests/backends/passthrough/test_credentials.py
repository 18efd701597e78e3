"""Running a file operation as the caller (:mod:`pyvirtiofsd.backends.passthrough.credentials`):
inside ``Credentials`` the thread creates files as the caller's uid and gid with the caller's
umask, the host kernel checks permissions against the caller's ids and supplementary groups,
and afterwards the thread is root again; other threads never change."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from pyvirtiofsd.backends.passthrough.credentials import Credentials, can_switch
from pyvirtiofsd.fuse.filesystem import Context
from tests.conftest import in_thread

pytestmark = pytest.mark.skipif(not can_switch(), reason="only root can become the caller")

CALLER = Context(uid=1234, gid=5678, pid=1, groups=(4321,))


@pytest.fixture
def scratch(open_tmp: Path) -> Path:
    d = open_tmp / "scratch"
    d.mkdir()
    d.chmod(0o777)
    return d


def owner(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def test_files_are_made_as_the_caller_with_its_umask(scratch: Path) -> None:
    def work() -> int:
        with Credentials(CALLER, True, umask=0o027):
            os.close(os.open(scratch / "file", os.O_CREAT | os.O_WRONLY, 0o666))
            os.mkdir(scratch / "dir", 0o777)
        os.close(os.open(scratch / "after", os.O_CREAT | os.O_WRONLY, 0o666))
        return os.umask(0)

    assert in_thread(work) == 0  # the thread's umask is back to 0, as the daemon keeps it
    assert owner(scratch / "file") == (1234, 5678, 0o640)
    assert owner(scratch / "dir") == (1234, 5678, 0o750)
    assert owner(scratch / "after") == (0, 0, 0o666)


def test_permissions_are_checked_against_the_caller(scratch: Path) -> None:
    (scratch / "roots").write_text("r")
    (scratch / "roots").chmod(0o600)
    (scratch / "group").write_text("g")
    os.chown(scratch / "group", 0, 4321)
    (scratch / "group").chmod(0o640)

    def work() -> tuple[bool, str]:
        with Credentials(CALLER, True):
            try:
                os.open(scratch / "roots", os.O_RDONLY)
                refused = False
            except PermissionError:
                refused = True
            # readable through a supplementary group the request carried
            return refused, (scratch / "group").read_text()

    assert in_thread(work) == (True, "g")


def test_no_switch_when_disabled_or_the_caller_is_root(scratch: Path) -> None:
    def work() -> None:
        with Credentials(CALLER, False):
            (scratch / "disabled").touch()
        with Credentials(Context(0, 0, 1), True):
            (scratch / "root").touch()

    in_thread(work)
    assert owner(scratch / "disabled")[:2] == (0, 0)
    assert owner(scratch / "root")[:2] == (0, 0)


def test_other_threads_keep_their_ids_and_umask(scratch: Path) -> None:
    groups = sorted(os.getgroups())
    mask = os.umask(0o022)
    os.umask(mask)
    inside = threading.Event()
    go_on = threading.Event()

    def work() -> None:
        with Credentials(CALLER, True, umask=0o077):
            inside.set()
            assert go_on.wait(60)

    t = threading.Thread(target=work)
    t.start()
    try:
        assert inside.wait(60)
        # While the worker acts as the caller, this thread is still itself.
        (scratch / "mine").touch()
        assert owner(scratch / "mine")[:2] == (os.geteuid(), os.getegid())
        assert sorted(os.getgroups()) == groups
        assert os.umask(mask) == mask
    finally:
        go_on.set()
        t.join(60)


@pytest.mark.parametrize(
    "caller",
    [
        Context(uid=0xFFFFFFFF, gid=5678, pid=1),
        Context(uid=1234, gid=0xFFFFFFFF, pid=1),
        Context(uid=1234, gid=5678, pid=1, groups=(0xFFFFFFFF,)),
    ],
    ids=["uid", "gid", "group"],
)
def test_the_id_that_is_no_id_is_refused(scratch: Path, caller: Context) -> None:
    """(uid_t)-1 is no id: setfsuid/setfsgid ignore it without an error, so a caller sending
    it would act as the daemon (root). A hostile guest can send it; it gets EPERM."""

    def work() -> None:
        with Credentials(caller, True):
            (scratch / "made").touch()

    with pytest.raises(PermissionError):
        in_thread(work)
    assert not (scratch / "made").exists()
