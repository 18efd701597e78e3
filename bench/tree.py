"""Source-tree benchmark: what users do to a tree of a few thousand files, in a real guest (QEMU
11.1, TCG) on pyvirtiofsd and on the Rust virtiofsd 1.14, in interleaved rounds: extract a
tar of it, `find -ls`, `grep -r`, `git add -A && git commit`, `git status` and `rm -rf`, each
cold (right after a fresh mount) and warm. The figure is the wall time of each command in the
guest, with the daemon's CPU time beside it. pyvirtiofsd runs as both builds, pure and
compiled (see bench/guest.py).

    .venv/bin/python bench/tree.py                    # 3 rounds
    .venv/bin/python bench/tree.py --rounds 1 --tree /some/dir

The tree (``--tree``, repeatable) defaults to the libraries of the interpreters in the sid
chroot the VM harness builds (`.ci/install-vm-assets`): Python's standard library without
its bytecode caches, and Perl's library (there with git). It is real source, on this machine
and stable until that chroot is rebuilt; the host tars it once per run (sorted names). The
guest copies the tarball to its tmpfs before anything is timed, so that extracting reads
nothing through the daemon.

One guest per daemon and round runs, in order ("remount" = unmount the share, drop the
guest's caches, mount it again; A and B are two copies of the tree):

    remount; extract into A (cold); extract into B (warm: the mount is not fresh)
    git init in B; git add -A && git commit in B (warm: B was just written)
    remount; find -ls A (cold); again (warm)
    remount; grep -r A (cold); again (warm)
    git init in A; remount; git add -A && git commit in A (cold)
    remount; git status in A (cold); again (warm)
    remount; rm -rf A (cold); find -ls B untimed, then rm -rf B (warm)

Warm means what a user sees running a command again soon after: the guest's caches hold what
the daemons' default options (cache=auto) let it keep. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import compiled
from common import Progress, prepare_profile, print_profile, rounds_order
from guest import (
    DAEMONS,
    Step,
    add_common_arguments,
    plan_session,
    run_session,
)
from report import PYC, THROUGHPUT_TARGET, VIRTIOFSD, Row, table, write_json_if

from pyvirtiofsd.vm import assets, missing_assets

TITLE = "guest: a source tree (extract, find, grep, git, rm; QEMU 11.1 TCG)"
TAR = ".bench/tree.tar"  # in the share, copied to the guest's /tmp before timing
# No garbage collection in any step. Objects are stored without compression: deflating is the
# guest's own CPU, not file-system work.
GIT = "git -c user.name=bench -c user.email=bench@localhost -c gc.auto=0 -c core.compression=0"

#: (name, label, command run in the share's root); the order and set-up are in `steps`.
COMMANDS = {
    "extract": ("tar -xf /tmp/tree.tar -C {d}", "extract tar"),
    "find": ("find {d} -ls > /tmp/find.out", "find -ls"),
    # GNU grep stops at the first match when its output is /dev/null: write to a file.
    "grep": ("grep -r -c import {d} > /tmp/grep.out || [ $? -eq 1 ]", "grep -r"),
    "commit": (f"cd {{d}} && {GIT} add -A && {GIT} commit -q -m tree", "git add -A && commit"),
    "status": (f"cd {{d}} && {GIT} status --porcelain > /tmp/status.out", "git status"),
    "rm": ("rm -rf {d}", "rm -rf"),
}


def default_tree() -> list[Path]:
    """The sid chroot's Python standard library and Perl library directories."""
    root = assets.sid_root()
    found = []
    patterns = ("usr/lib/python3.[0-9]*", "usr/share/perl/5.*", "usr/lib/x86_64-linux-gnu/perl")
    for pattern in patterns:
        found += [Path(p) for p in sorted(glob.glob(str(root / pattern))) if not os.path.islink(p)]
    return found


@dataclass
class Tree:
    """The tarball and what is in it."""

    tar: Path
    files: int
    dirs: int
    size: int
    sources: list[str]

    def describe(self) -> str:
        return (
            f"{self.files:,} files in {self.dirs:,} directories, {self.size / 1e6:.0f} MB "
            f"({', '.join(self.sources)})"
        )


def make_tarball(sources: list[Path], dest: Path) -> Tree:
    root = assets.sid_root()
    rel = []
    for src in sources:
        src = src.resolve()
        rel.append(str(src.relative_to(root)) if src.is_relative_to(root) else str(src))
    files = dirs = size = 0
    for src in sources:
        for _dirpath, dirnames, filenames in os.walk(src):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            dirs += 1
            for f in filenames:
                p = Path(_dirpath, f)
                if p.is_file() and not p.is_symlink():
                    files += 1
                    size += p.stat().st_size
    # Paths below the chroot relative to it (usr/lib/...); others with their leading / dropped.
    cmd = ["tar", "--sort=name", "--exclude=__pycache__", "-cf", str(dest)]
    for src in sources:
        src = src.resolve()
        base = root if src.is_relative_to(root) else Path("/")
        cmd += ["-C", str(base), str(src.relative_to(base))]
    subprocess.run(cmd, check=True)
    return Tree(dest, files, dirs, size, rel)


@dataclass
class Options:
    rounds: int = 3
    trees: list[Path] = field(default_factory=list)  # empty: default_tree()
    daemons: list[str] = field(default_factory=lambda: list(DAEMONS))
    timeout: float = 3600.0
    keep_logs: bool = False
    profile: Path | None = None  # a directory for py-spy's stacks of pyvirtiofsd
    compiled: Path | None = None  # the compiled tree, when daemons has the compiled one


def steps(scale: float = 1.0) -> list[Step]:
    """The session; ``scale`` multiplies the guessed durations (the tree's size)."""

    def timed(name: str, d: str, temp: str, prior: float, **kw: object) -> Step:
        cmd, what = COMMANDS[name]
        return Step(
            f"{name}-{temp}", f"{what} {temp}", "sh", prior * scale,
            spec={"cmd": cmd.format(d=d)}, **kw,  # type: ignore[arg-type]
        )  # fmt: skip

    return [
        Step("copy", "copy the tarball", "setup", setup=[f"cp {TAR} /tmp/tree.tar"]),
        timed("extract", "A", "cold", 40, remount=True, setup=["mkdir A B"]),
        timed("extract", "B", "warm", 40),
        timed("commit", "B", "warm", 60, setup=[f"cd B && {GIT} init -q"]),
        timed("find", "A", "cold", 10, remount=True),
        timed("find", "A", "warm", 10),
        timed("grep", "A", "cold", 20, remount=True),
        timed("grep", "A", "warm", 20),
        Step("init", "git init", "setup", setup=[f"cd A && {GIT} init -q"]),
        timed("commit", "A", "cold", 60, remount=True),
        timed("status", "A", "cold", 10, remount=True),
        timed("status", "A", "warm", 10),
        timed("rm", "A", "cold", 30, remount=True),
        timed("rm", "B", "warm", 30, setup=["find B -ls > /dev/null"]),
    ]


def rows() -> list[Row]:
    out = []
    for s in steps():
        if s.kind == "setup":
            continue
        out.append(Row("tree", s.name, s.label, "s", "lower", VIRTIOFSD, THROUGHPUT_TARGET))
    return out


def plan(progress: Progress, opts: Options, scale: float = 1.0) -> None:
    for r in range(opts.rounds):
        for kind in opts.daemons:
            plan_session(progress, f"tree/{r}/{kind}", f"tree/{kind}", steps(scale), "tree")


def run(opts: Options, progress: Progress) -> tuple[list[Row], Tree]:
    """Interleaved rounds of one guest per daemon; the rows and the tree used."""
    missing = missing_assets(qemu="sid", rootfs="sid")
    if missing:
        raise RuntimeError("\n".join(missing))
    if not (assets.sid_root() / "usr/bin/git").exists():
        # Found now rather than by the guest, minutes into the run.
        raise RuntimeError("git is missing from the sid chroot: run .ci/install-vm-assets")
    by_key = {r.key: r for r in rows()}
    with tempfile.TemporaryDirectory(prefix="pyvirtiofsd-tree-bench-") as tmp:
        tree = make_tarball(opts.trees or default_tree(), Path(tmp) / "tree.tar")

        def prepare(share: Path) -> None:
            (share / TAR).parent.mkdir()
            shutil.copyfile(tree.tar, share / TAR)  # the share is a file system of its own

        for n in range(opts.rounds):
            for kind in rounds_order(opts.daemons, n):
                phases = run_session(
                    kind,
                    steps(),
                    Path(tmp) / f"{kind}-{n}",
                    progress=progress,
                    prefix=f"tree/{n}/{kind}",
                    title=f"tree bench, round {n + 1}/{opts.rounds}",
                    prepare=prepare,
                    timeout=opts.timeout,
                    keep_logs=opts.keep_logs,
                    profile=opts.profile and opts.profile / f"tree-{kind}-{n}.txt",
                    compiled_tree=opts.compiled,
                )
                for name, p in phases.items():
                    by_key[name].add(kind, p.result["seconds"], cpu_s=p.cpu, requests=p.requests)
    return list(by_key.values()), tree


def main() -> None:
    defaults = Options()
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tree", type=Path, action="append",
                    help="a directory to tar and use (repeatable; default: see above)")  # fmt: skip
    add_common_arguments(ap, defaults.rounds, defaults.timeout)
    args = ap.parse_args()
    names, built, why_not = compiled.select(args, args.daemon or list(DAEMONS), PYC)
    opts = Options(args.rounds, args.tree or [], names, args.timeout, args.keep_logs,
                   prepare_profile(args.profile), built and built.path)  # fmt: skip
    progress = Progress()
    plan(progress, opts)
    result, tree = run(opts, progress)
    progress.close()
    print(table(result, {"tree": TITLE}))
    print(f"tree: {tree.describe()}; medians of {opts.rounds} round(s); CPU in the JSON")
    print_profile(opts.profile, "tree-*.txt", "tree")
    params = vars(args) | {"tree": tree.describe()}
    write_json_if(args.json, result, "tree", params, built, why_not)


if __name__ == "__main__":
    main()
