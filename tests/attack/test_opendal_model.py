"""A model-based test of the object-storage file system under concurrency: a hypothesis state
machine sends raw FUSE requests (``FuseClient(direct(Server(fs)))``) to an ``OpendalFs`` on the
memory, fs and s3 (moto_server) services, in rounds of up to three requests that run at once in
their own threads, on a few shared names: lookup, create (O_EXCL, O_TRUNC, O_APPEND), open,
write, read, getattr, flush, fsync, release, truncate (by path and through a handle), rename
and unlink.

The model is a sequential specification of what the file system promises: which names exist
and which file each names, the content of every file (open, unlinked or not), and what the
store holds at each name (a file's content as of its last commit by flush, fsync or release,
or by a truncate with no writer left; moved by rename, gone with unlink and rename-over, an
empty object from CREATE). After each round, some order of its requests must explain every
reply (linearizability, checked over all orders), and the store, read without the daemon
(boto3, the directory, the raw memory Operator), must hold exactly what the model says at every
name, nothing more; a directory listing must show exactly the model's names.

Examples and steps are kept small for CI: see ``RUNS`` (examples x rounds, per service).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import itertools
import os
import shutil
import tempfile
import threading
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

pytest.importorskip("opendal")

from pyvirtiofsd.fuse import abi
from pyvirtiofsd.fuse.filesystem import ROOT
from pyvirtiofsd.fuse.policy import CachePolicy
from pyvirtiofsd.testing.fuse_client import FuseClient
from tests.attack.opendal_direct import Direct, serve
from tests.opendal_fixtures import DirView, NoView, S3View, Service, s3_options

NAMES = ("a", "b", "c")
#: (examples, rounds per example) for each service: small enough for CI. For a longer hunt,
#: PYVIRTIOFSD_MODEL_SCALE=N runs N times as many examples.
RUNS = {"memory": (150, 15), "fs": (80, 15), "s3": (30, 12)}
SCALE = int(os.environ.get("PYVIRTIOFSD_MODEL_SCALE", "1"))
#: What the runs did, per service (printed at the end of each test: pytest -s shows it).
STATS: dict[str, Counter[str]] = defaultdict(Counter)
CAPS = {
    "native": None,
    "stat-then-write": {"write_with_if_not_exists": False},
    "no-empty-objects": {"write_with_if_not_exists": False, "write_can_empty": False},
}

# --- the model ---------------------------------------------------------------------------------


@dataclass
class File:
    content: bytearray
    #: The name it has, None once unlinked (or renamed over).
    name: str | None
    #: In the store (False only for a file created on a service that can't store empty
    #: objects, until its first commit).
    stored: bool = True


@dataclass
class Handle:
    file: int
    writable: bool
    append: bool


@dataclass
class Model:
    empty_objects: bool
    files: dict[int, File] = field(default_factory=dict)
    names: dict[str, int] = field(default_factory=dict)
    store: dict[str, bytes] = field(default_factory=dict)
    handles: dict[int, Handle] = field(default_factory=dict)
    ino_of: dict[int, int] = field(default_factory=dict)
    file_of_ino: dict[int, int] = field(default_factory=dict)
    next_file: int = 0

    def new_file(self, name: str, content: bytes, stored: bool) -> int:
        fid = self.next_file
        self.next_file += 1
        self.files[fid] = File(bytearray(content), name, stored)
        self.names[name] = fid
        return fid

    def bind(self, fid: int, ino: int) -> bool:
        """The reply named inode ``ino`` for file ``fid``: the same file always has the same
        inode, and no inode ever names two files."""
        if fid in self.ino_of:
            return self.ino_of[fid] == ino
        if ino in self.file_of_ino:
            return False
        self.ino_of[fid] = ino
        self.file_of_ino[ino] = fid
        return True

    def commit(self, fid: int) -> None:
        f = self.files[fid]
        if f.name is not None:
            self.store[f.name] = bytes(f.content)
            f.stored = True

    def writers(self, fid: int) -> int:
        return sum(1 for h in self.handles.values() if h.file == fid and h.writable)

    def drop_name(self, name: str) -> None:
        fid = self.names.pop(name)
        self.files[fid].name = None

    def resize(self, fid: int, size: int) -> None:
        c = self.files[fid].content
        if size < len(c):
            del c[size:]
        else:
            c.extend(bytes(size - len(c)))

    def open_file(self, fid: int, fh: int, flags: int) -> None:
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        self.handles[fh] = Handle(fid, writable, bool(flags & os.O_APPEND))
        if flags & os.O_TRUNC:
            self.resize(fid, 0)

    # Each op: (kind, args...); each outcome: ("ok", value) or ("err", errno). apply() says
    # whether the outcome is what the model predicts, and moves the model on.

    def apply(self, op: tuple[Any, ...], out: tuple[str, Any]) -> bool:
        kind = op[0]
        return bool(getattr(self, "_" + kind)(*op[1:], out=out))

    def _lookup(self, name: str, out: tuple[str, Any]) -> bool:
        fid = self.names.get(name)
        if fid is None:
            return out == ("err", errno.ENOENT)
        return out[0] == "ok" and self.bind(fid, out[1])

    def _getattr(self, ino: int, out: tuple[str, Any]) -> bool:
        f = self.files[self.file_of_ino[ino]]
        if f.name is None:
            return out[0] == "ok"  # an unlinked inode keeps some attributes
        return out == ("ok", len(f.content))

    def _create(self, name: str, flags: int, out: tuple[str, Any]) -> bool:
        fid = self.names.get(name)
        if fid is not None and flags & os.O_EXCL:
            return out == ("err", errno.EEXIST)
        if out[0] != "ok":
            return False
        ino, fh = out[1]
        if fid is None:
            fid = self.new_file(name, b"", self.empty_objects)
            if self.empty_objects:
                self.store[name] = b""
            if not self.bind(fid, ino):
                return False
            self.open_file(fid, fh, flags & ~os.O_TRUNC)
            return True
        if not self.bind(fid, ino):
            return False
        self.open_file(fid, fh, flags)
        return True

    def _open(self, ino: int, flags: int, out: tuple[str, Any]) -> bool:
        fid = self.file_of_ino[ino]
        if self.files[fid].name is None:
            return out == ("err", errno.ENOENT)
        if out[0] != "ok":
            return False
        self.open_file(fid, out[1], flags)
        return True

    def _write(self, fh: int, offset: int, data: bytes, out: tuple[str, Any]) -> bool:
        h = self.handles.get(fh)
        if h is None or not h.writable:
            return out == ("err", errno.EBADF)
        c = self.files[h.file].content
        if h.append:
            offset = len(c)
        if offset > len(c):
            c.extend(bytes(offset - len(c)))
        c[offset : offset + len(data)] = data
        return out == ("ok", len(data))

    def _read(self, fh: int, offset: int, size: int, out: tuple[str, Any]) -> bool:
        h = self.handles.get(fh)
        if h is None:
            return out == ("err", errno.EBADF)
        return out == ("ok", bytes(self.files[h.file].content[offset : offset + size]))

    def _sync(self, fh: int, out: tuple[str, Any]) -> bool:
        h = self.handles.get(fh)
        if h is None:
            return out == ("err", errno.EBADF)
        self.commit(h.file)
        return out == ("ok", None)

    _flush = _fsync = _sync

    def _release(self, fh: int, out: tuple[str, Any]) -> bool:
        h = self.handles.pop(fh, None)
        if h is None:
            return out == ("err", errno.EBADF)
        self.commit(h.file)
        return out == ("ok", None)

    def _truncate(self, ino: int, size: int, out: tuple[str, Any]) -> bool:
        fid = self.file_of_ino[ino]
        if self.files[fid].name is None:
            return out == ("err", errno.ENOENT)
        self.resize(fid, size)
        # A writer still open takes the change up with its next commit; else it goes now.
        if not self.writers(fid):
            self.commit(fid)
        return out == ("ok", None)

    def _ftruncate(self, ino: int, fh: int, size: int, out: tuple[str, Any]) -> bool:
        h = self.handles.get(fh)
        if h is None:
            # Released meanwhile: the kernel's inode is still named, the change goes by path.
            return self._truncate(ino, size, out)
        self.resize(h.file, size)
        if not self.writers(h.file):
            self.commit(h.file)
        return out == ("ok", None)

    def _rename(self, src: str, dst: str, out: tuple[str, Any]) -> bool:
        fid = self.names.get(src)
        if fid is None:
            return out == ("err", errno.ENOENT)
        f = self.files[fid]
        if dst in self.names:
            self.drop_name(dst)
        del self.names[src]
        self.names[dst] = fid
        f.name = dst
        if f.stored:
            self.store[dst] = self.store.pop(src)
        else:
            self.store.pop(dst, None)
        return out == ("ok", None)

    def _unlink(self, name: str, out: tuple[str, Any]) -> bool:
        if name not in self.names:
            return out == ("err", errno.ENOENT)
        self.drop_name(name)
        self.store.pop(name, None)
        return out == ("ok", None)


# --- requests ----------------------------------------------------------------------------------


#: Requests on an open handle (which also name the handle's inode, as the kernel does).
HANDLE_OPS = frozenset({"write", "read", "flush", "fsync", "release"})


def _run(c: FuseClient, op: tuple[Any, ...], ino: int) -> tuple[str, Any]:
    kind, args = op[0], op[1:]
    try:
        if kind == "lookup":
            nodeid = c.lookup(ROOT, args[0].encode()).nodeid
            return ("err", errno.ENOENT) if nodeid == 0 else ("ok", nodeid)
        if kind == "getattr":
            return "ok", c.getattr(args[0]).size
        if kind == "create":
            entry, opened = c.create(ROOT, args[0].encode(), 0o644, args[1])
            return "ok", (entry.nodeid, opened.fh)
        if kind == "open":
            return "ok", c.open(args[0], args[1]).fh
        if kind == "write":
            return "ok", c.write(ino, args[0], args[1], args[2])
        if kind == "read":
            return "ok", c.read(ino, args[0], args[1], args[2])
        if kind in ("flush", "fsync", "release"):
            getattr(c, kind)(ino, args[0])
        elif kind == "truncate":
            c.setattr(args[0], valid=abi.FATTR_SIZE, size=args[1])
        elif kind == "ftruncate":
            c.setattr(args[0], valid=abi.FATTR_SIZE | abi.FATTR_FH, fh=args[1], size=args[2])
        elif kind == "rename":
            c.rename(ROOT, args[0].encode(), ROOT, args[1].encode())
        elif kind == "unlink":
            c.unlink(ROOT, args[0].encode())
        else:
            raise AssertionError(kind)
        return "ok", None
    except OSError as e:
        return "err", e.errno


# --- what the hypothesis draws ------------------------------------------------------------------

names = st.sampled_from(NAMES)
data = st.binary(min_size=1, max_size=6)
offsets = st.integers(0, 10)
sizes = st.integers(0, 12)
picks = st.integers(0, 1000)  # which open handle or known inode, modulo how many there are
open_flags = st.sampled_from(
    [os.O_RDWR, os.O_RDWR | os.O_TRUNC, os.O_RDWR | os.O_APPEND, os.O_RDONLY, os.O_WRONLY]
)
create_flags = st.sampled_from(
    [os.O_RDWR, os.O_RDWR | os.O_EXCL, os.O_RDWR | os.O_TRUNC, os.O_WRONLY | os.O_APPEND]
)
on_handle = st.tuples(st.sampled_from(["flush", "fsync", "release"]), picks)
requests = st.one_of(
    st.tuples(st.just("lookup"), names),
    st.tuples(st.just("create"), names, create_flags),
    st.tuples(st.just("open"), picks, open_flags),
    st.tuples(st.just("getattr"), picks),
    st.tuples(st.just("write"), picks, offsets, data),
    st.tuples(st.just("write"), picks, offsets, data),
    st.tuples(st.just("read"), picks, offsets, st.integers(1, 20)),
    on_handle,
    on_handle,
    st.tuples(st.just("truncate"), picks, sizes),
    st.tuples(st.just("ftruncate"), picks, sizes),
    st.tuples(st.just("rename"), names, names).filter(lambda t: t[1] != t[2]),
    st.tuples(st.just("unlink"), names),
)
#: One to three requests sent at once (as many rounds of each size).
rounds = st.integers(1, 3).flatmap(lambda n: st.lists(requests, min_size=n, max_size=n))


def resolve(model: Model, drawn: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """A drawn request made concrete against the model: handle and inode picks become an open
    handle and a known inode (None when there is none to pick)."""
    kind = drawn[0]
    handles = sorted(model.handles)
    inos = sorted(model.file_of_ino)
    if kind in HANDLE_OPS:
        if not handles:
            return None
        return (kind, handles[drawn[1] % len(handles)], *drawn[2:])
    if kind == "ftruncate":
        if not handles:
            return None
        fh = handles[drawn[1] % len(handles)]
        return (kind, model.ino_of[model.handles[fh].file], fh, drawn[2])
    if kind in ("open", "getattr", "truncate"):
        if not inos:
            return None
        return (kind, inos[drawn[1] % len(inos)], *drawn[2:])
    return drawn


# --- the machine -------------------------------------------------------------------------------


class StoreBackedFs(RuleBasedStateMachine):
    """Subclassed per service: ``new_service(tmp)`` gives a fresh, empty store."""

    scheme = "memory"
    new_service: Callable[[Path], Service]

    def __init__(self) -> None:
        super().__init__()
        self.stack = contextlib.ExitStack()
        self.tmp = Path(tempfile.mkdtemp(prefix="pyvirtiofsd-model-"))
        self.stack.callback(shutil.rmtree, self.tmp, True)
        self.d: Direct | None = None
        self.models: list[Model] = []
        self.failed = False

    @initialize(
        seeds=st.dictionaries(names, data, max_size=2),
        policy=st.sampled_from([CachePolicy.AUTO, CachePolicy.NEVER]),
        caps=st.sampled_from(sorted(CAPS)),
        few_files=st.booleans(),
    )
    def setup(
        self, seeds: dict[str, bytes], policy: CachePolicy, caps: str, few_files: bool
    ) -> None:
        if self.scheme != "memory":
            caps = "native"  # the fallbacks are the same code on every service
        service = type(self).new_service(self.tmp)
        self.d = self.stack.enter_context(serve(service, self.tmp / "cache", CAPS[caps], policy))
        if few_files:
            # Clean local copies are dropped all the time: reads go to the store again.
            self.d.fs.cache.max_files = 1
        model = Model(empty_objects=caps == "native" or caps == "stat-then-write")
        for name, content in seeds.items():
            # Objects another client made before the daemon started.
            self.d.view.put(name, content)
            model.new_file(name, content, True)
            model.store[name] = content
        self.models = [model]
        self.check_state()

    def teardown(self) -> None:
        try:
            if self.d is not None and self.models and not self.failed:
                # The last commits: what they acknowledge is checked like any other.
                for fh in sorted(self.model.handles):
                    self.round([("release", fh)])
        finally:
            self.stack.close()

    @rule(drawn=rounds)
    def requests_at_once(self, drawn: list[tuple[Any, ...]]) -> None:
        ops = [op for op in (resolve(self.model, d) for d in drawn) if op is not None]
        event(f"requests at once: {len(ops)}")
        STATS[self.scheme]["rounds"] += 1
        STATS[self.scheme][f"{len(ops)} at once"] += 1
        for op in ops:
            STATS[self.scheme][op[0]] += 1
        if ops:
            self.round(ops)

    def round(self, ops: list[tuple[Any, ...]]) -> None:
        assert self.d is not None
        model = self.model
        inos = [model.ino_of[model.handles[op[1]].file] if op[0] in HANDLE_OPS else 0 for op in ops]
        outcomes: list[tuple[str, Any]] = [("err", -1)] * len(ops)
        clients = [self.d.client_for() for _ in ops]
        start = threading.Barrier(len(ops))

        def run(i: int) -> None:
            start.wait()
            outcomes[i] = _run(clients[i], ops[i], inos[i])

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(ops))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
            assert not t.is_alive(), f"a request did not finish: {ops}"
        store = self.read_store()
        listed = self.list_names()
        # Every order that explains the replies and the store is kept as a possibility: two
        # orders may differ only in what a later read or commit will show.
        survivors: list[Model] = []
        for candidate in self.models:
            for order in itertools.permutations(range(len(ops))):
                m = copy.deepcopy(candidate)
                if not all(m.apply(ops[i], outcomes[i]) for i in order):
                    continue
                if m.store == store and set(m.names) == listed and m not in survivors:
                    survivors.append(m)
        if survivors:
            self.models = survivors
            return
        before = self.models[0]
        self.failed = True
        raise AssertionError(
            "no order of the round explains what happened:\n"
            + "".join(f"  {op} -> {out}\n" for op, out in zip(ops, outcomes, strict=True))
            + f"  store: {store}\n  model store before: {before.store}\n"
            + f"  listed: {sorted(listed)}\n  model names before: {before.names}\n"
            + "".join(
                f"  files before (possibility {i}): {m.files}\n" for i, m in enumerate(self.models)
            )
        )

    def check_state(self) -> None:
        assert self.read_store() == self.model.store
        assert self.list_names() == set(self.model.names)

    @property
    def model(self) -> Model:
        """One of the possible states (they agree on names, handles, inodes and the store)."""
        return self.models[0]

    def read_store(self) -> dict[str, bytes]:
        assert self.d is not None
        view = self.d.view
        return {k: view.get(k) for k in view.files()}

    def list_names(self) -> set[str]:
        assert self.d is not None
        c = self.d.client_for()
        fh = c.opendir(ROOT).fh
        out: set[str] = set()
        offset = 0
        try:
            while True:
                entries = c.readdir(ROOT, fh, offset)
                if not entries:
                    break
                for _, off, _, name in entries:
                    if name not in (b".", b".."):
                        out.add(name.decode())
                    offset = off
        finally:
            c.releasedir(ROOT, fh)
        return out


def _memory(tmp: Path) -> Service:
    return Service("memory", {}, NoView())


def _fs(tmp: Path) -> Service:
    root = tmp / f"fsroot-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    return Service("fs", {"root": str(root)}, DirView(root))


@pytest.mark.parametrize("scheme", sorted(RUNS))
def test_concurrent_requests_against_a_model(scheme: str, request: pytest.FixtureRequest) -> None:
    if scheme == "s3":
        server = request.getfixturevalue("moto_server")
        client = server.client()

        def new_service(tmp: Path) -> Service:
            bucket = f"m-{uuid.uuid4().hex[:20]}"
            client.create_bucket(Bucket=bucket)
            return Service("s3", s3_options(server.endpoint, bucket), S3View(client, bucket))

    else:
        new_service = _memory if scheme == "memory" else _fs
    examples, rounds = RUNS[scheme]
    machine = type(
        f"StoreBackedFs_{scheme}",
        (StoreBackedFs,),
        {"scheme": scheme, "new_service": staticmethod(new_service)},
    )
    STATS[scheme].clear()
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples * SCALE,
            stateful_step_count=rounds,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    print(f"\n{scheme}: {dict(sorted(STATS[scheme].items()))}")
