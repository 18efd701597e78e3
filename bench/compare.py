"""The whole comparison in one command: pyvirtiofsd beside its references, every benchmark in
one run, one table of ratios, the results as JSON and a chart.

    .venv/bin/python bench/compare.py            # the real figures (45-50 minutes under TCG)
    .venv/bin/python bench/compare.py --quick    # a look in a few minutes (1 round, short)
    .venv/bin/python bench/compare.py --smoke --part frontend   # does it run? (seconds)
    .venv/bin/python bench/compare.py --part frontend --part fusedev --rounds 2

Parts, each comparing pyvirtiofsd with its reference in interleaved rounds (medians):

- frontend: the daemon alone, driven by the project's vhost-user front-end with guest-shaped
  chains, beside virtiofsd 1.14: CPU per request and request rate (bench/frontend.py);
- guest: fio (O_DIRECT and buffered) and create/stat/unlink in a QEMU 11.1 TCG guest, beside
  virtiofsd 1.14 (bench/guest.py);
- tree: extract, find, grep, git and rm on a source tree in the guest, cold and warm
  (bench/tree.py);
- queues: two fio jobs on two vCPUs with one and two request queues (bench/queues.py);
- fusedev: the /dev/fuse mount on the host beside libfuse's passthrough_ll (bench/fusedev.py).

The frontend, fusedev, guest and tree parts also measure the compiled build (mypyc, with its C
modules) as a daemon of its own, ``pyvirtiofsd compiled``: its tree is found or built once per
run by bench/compiled.py (``--compiled DIR`` names one, ``--no-compiled`` leaves it out). If it
can't be had (no gcc, no Python headers), its column is reported as not measured and the rest
goes on. The queues part runs the pure build only.

Writes ``compare.json`` and ``compare.svg`` (``compare-quick.*`` with --quick,
``compare-smoke.*`` with --smoke) into --out (default: bench/results/). --smoke runs every
step at the least size that still exercises it: its figures mean nothing (CI runs it to prove
the machinery works). Needs root (fusedev mounts FUSE and drops caches), the VM assets
(`.ci/install-vm-assets`) and libfuse3-dev; a part that cannot run is reported and skipped.
The JSON schema and how to read the figures: docs/benchmarks.md. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import compiled
import frontend
import fusedev
import guest
import queues
import tree
from common import (
    SHARE_DIR,
    SHARE_FS,
    LoadSampler,
    Progress,
    format_seconds,
    fresh_share_possible,
    prepare_profile,
    print_profile,
)
from report import PYC, Row, chart_svg, table, write_json

from pyvirtiofsd.vm import assets

PARTS = ["frontend", "guest", "tree", "queues", "fusedev"]
TITLES = {
    "frontend": frontend.TITLE,
    "guest": guest.TITLE,
    "tree": tree.TITLE,
    "queues": queues.TITLE,
    "fusedev": fusedev.TITLE,
}


@dataclass
class FrontendOptions:
    rounds: int = 5
    seconds: float = 2.0


@dataclass
class Preset:
    frontend: FrontendOptions
    guest: guest.Options
    tree: tree.Options
    queues: queues.Options
    fusedev: fusedev.Options


#: How long each preset's steps take compared with the full run's guesses (the tree's size).
TREE_SCALE = {"full": 1.0, "quick": 0.4, "smoke": 0.05}
MODE_TEXT = {"full": "full run", "quick": "quick look", "smoke": "smoke run (no figures)"}


def preset(mode: str) -> Preset:
    """The sizes of a run: "full" (the figures), "quick" (a look), "smoke" (does it run)."""
    if mode == "full":
        return Preset(
            FrontendOptions(),
            guest.Options(),
            tree.Options(),
            queues.Options(),
            fusedev.Options(),
        )
    if mode == "quick":
        # A look, not figures: one round, short jobs, a smaller tree (Python's library alone).
        return Preset(
            FrontendOptions(rounds=1, seconds=0.5),
            guest.Options(rounds=1, runtime=3, size_mib=64, files=300),
            tree.Options(rounds=1, trees=tree.default_tree()[:1]),
            queues.Options(rounds=1, runtime=3, size_mib=64),
            fusedev.Options(rounds=1, size_mib=64, files=300),
        )
    # Every step once at the least size: proof that the machinery works, no figures.
    return Preset(
        FrontendOptions(rounds=1, seconds=0.1),
        guest.Options(rounds=1, runtime=1, size_mib=8, files=20),
        tree.Options(rounds=1, trees=[t / "json" for t in tree.default_tree()[:1]]),
        queues.Options(rounds=1, runtime=1, size_mib=8),
        fusedev.Options(rounds=1, size_mib=8, files=20),
    )


def with_rounds(p: Preset, rounds: int | None) -> Preset:
    if rounds is None:
        return p
    return Preset(
        replace(p.frontend, rounds=rounds),
        replace(p.guest, rounds=rounds),
        replace(p.tree, rounds=rounds),
        replace(p.queues, rounds=rounds),
        replace(p.fusedev, rounds=rounds),
    )


def _version(argv: list[str], env: dict[str, str] | None = None) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def host_facts() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_bytes": mem,
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    here = Path(__file__).resolve().parent
    commit = _version(["git", "-C", str(here), "rev-parse", "--short", "HEAD"])
    # Modified: the code measured (the package, the benchmarks) differs from the commit.
    status = ["status", "--porcelain", "--untracked-files=no", "--", "src", "bench"]
    dirty = _version(["git", "-C", str(here.parent), *status])
    out = {"pyvirtiofsd": commit + ("" if dirty in ("", "unknown") else " (modified)")}
    try:
        for name, command in (
            ("virtiofsd", assets.rust_virtiofsd_command()),
            ("qemu", assets.qemu_command("sid")),
            ("fio", assets.fio_command()),
        ):
            out[name] = _version([*command.argv, "--version"], command.environ())
    except assets.AssetsMissing as exc:
        out["assets"] = str(exc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one short round of everything")
    size.add_argument(
        "--smoke", action="store_true", help="every step once at the least size (no figures)"
    )
    ap.add_argument("--part", action="append", choices=PARTS, help="only this part (repeatable)")
    ap.add_argument("--rounds", type=int, help="rounds for every part (default: the preset's)")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="directory for the JSON and the chart (default: bench/results)",
    )
    ap.add_argument("--keep-logs", action="store_true", help="print the daemons' log tails")
    compiled.add_arguments(ap)
    ap.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample pyvirtiofsd with py-spy (into DIR) in the front-end and guest parts and "
        "print where its time went; the sampling costs CPU, so take figures from runs without it",
    )
    args = ap.parse_args()
    parts = args.part or PARTS
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    p = with_rounds(preset(mode), args.rounds)
    if args.keep_logs:
        p.guest.keep_logs = p.tree.keep_logs = p.queues.keep_logs = True
    profile = prepare_profile(args.profile)
    p.guest.profile = p.tree.profile = p.queues.profile = profile

    facts: dict[str, Any] = {}
    errors: dict[str, str] = {}
    # The compiled tree before the run (a build takes a minute or two, shown apart from it).
    built: compiled.Tree | None = None
    if {"frontend", "fusedev", "guest", "tree"} & set(parts):
        built, why_not = compiled.resolve(args)
        if built is not None:
            facts["compiled"] = built.describe()
        elif why_not is not None:
            errors[PYC] = why_not
    tree_path = built.path if built else None
    if {"fusedev", "guest", "tree", "queues"} & set(parts):
        facts["share"] = SHARE_FS if fresh_share_possible() else SHARE_DIR
    if built is None:
        p.fusedev.targets = [t for t in p.fusedev.targets if t not in fusedev.COMPILED_TARGETS]
        p.guest.daemons = [d for d in p.guest.daemons if d != PYC]
        p.tree.daemons = [d for d in p.tree.daemons if d != PYC]
    p.guest.compiled = p.tree.compiled = tree_path
    # The JSON names the compiled tree by where it came from (facts.compiled describes it), not
    # by its path, which is this machine's.
    origin = {"compiled": built.origin if built else None}

    progress = Progress()
    runners: dict[str, Callable[[], list[Row]]] = {}
    params: dict[str, Any] = {}
    if "frontend" in parts:
        names = [n for n in frontend.DAEMONS if n != PYC or built is not None]
        workloads = list(frontend.WORKLOADS)
        fo = p.frontend
        frontend.plan(progress, workloads, names, fo.rounds, fo.seconds)
        runners["frontend"] = lambda: frontend.run(
            workloads, names, fo.rounds, fo.seconds, progress, profile, tree_path
        )
        params["frontend"] = vars(fo) | {"depths": list(frontend.DEPTHS)}
    if "guest" in parts:
        guest.plan(progress, p.guest)
        runners["guest"] = lambda: guest.run(p.guest, progress)
        params["guest"] = vars(p.guest) | origin
    if "tree" in parts:
        tree.plan(progress, p.tree, TREE_SCALE[mode])

        def run_tree() -> list[Row]:
            rows, t = tree.run(p.tree, progress)
            facts["tree"] = t.describe()
            return rows

        runners["tree"] = run_tree
        trees = {"trees": [str(t) for t in p.tree.trees] or "default"}
        params["tree"] = vars(p.tree) | origin | trees
    if "queues" in parts:
        queues.plan(progress, p.queues)
        runners["queues"] = lambda: queues.run(p.queues, progress)
        params["queues"] = vars(p.queues)
    if "fusedev" in parts:
        fusedev.plan(progress, p.fusedev)
        runners["fusedev"] = lambda: fusedev.run(p.fusedev, progress, tree_path)
        params["fusedev"] = vars(p.fusedev)

    # Before the run: the commit measured is the one checked out when it started.
    run_versions = versions()
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    load_before = os.getloadavg()
    rows: list[Row] = []
    with LoadSampler() as load:
        for part, runner in runners.items():
            try:
                rows += runner()
            except Exception as exc:  # a part that fails must not lose the others' figures
                errors[part] = f"{type(exc).__name__}: {exc}"
                progress.abandon(f"{part}/")
                print(f"\n{part}: failed, skipped:", file=sys.stderr)
                traceback.print_exc()
    progress.close()
    load_after = os.getloadavg()
    during = load.summary()

    print(table(rows, TITLES))
    if any(r.part == "queues" for r in rows):
        print("\n".join(queues.scaling_lines(rows)))
    duration = time.monotonic() - t0
    print(
        f"\n{MODE_TEXT[mode]} of {format_seconds(duration)}; "
        f"host load average (1 min) before {load_before[0]:.2f}, during {during['min']:.2f} to "
        f"{during['max']:.2f} (median {during['median']:.2f}), after {load_after[0]:.2f}"
    )
    if "tree" in facts:
        print(f"tree: {facts['tree']}")
    if "share" in facts:
        print(f"shares: {facts['share']}")
    if built is not None:
        print(f"compiled build: {built.summary()}")
    if "frontend" in runners:
        frontend.print_profiles(profile, list(frontend.WORKLOADS))
    for part in ("guest", "tree", "queues"):
        if part in runners:
            print_profile(profile, f"{part}-*.txt", part)
    for part, error in errors.items():
        print(f"NOT MEASURED: {part}: {error}")

    meta = {
        "date": started.isoformat(timespec="seconds"),
        "mode": mode,
        "duration_seconds": round(duration),
        "command": command_line(sys.argv),
        "host": host_facts(),
        "load_average": {
            "before": list(load_before),
            "during": during,  # the 1-minute figure, sampled every 10 s
            "after": list(load_after),
        },
        "versions": run_versions,
        "parts": {part: params[part] for part in runners},
        "facts": facts,
        "errors": errors,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "compare" if mode == "full" else f"compare-{mode}"
    json_path, svg_path = args.out / f"{stem}.json", args.out / f"{stem}.svg"
    write_json(json_path, rows, _jsonable(meta))
    subtitle = (
        f"{started:%Y-%m-%d}, {MODE_TEXT[mode]}, "
        f"{meta['host']['cpus']} host cores, guest under TCG; medians of interleaved rounds"
    )
    svg_path.write_text(chart_svg(rows, "pyvirtiofsd against its references", subtitle, TITLES))
    print(f"results: {json_path}\nchart:   {svg_path}")
    # Figures of the other parts are written all the same; the status says one is missing.
    sys.exit(1 if errors else 0)


def command_line(argv: list[str]) -> list[str]:
    """The command as run, but where the results went (a path on this machine, and nothing
    to do with the figures)."""
    out = [Path(argv[0]).name]
    skip = False
    for arg in argv[1:]:
        if skip or arg.startswith("--out="):
            skip = False
            continue
        if arg == "--out":
            skip = True
            continue
        out.append(arg)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


if __name__ == "__main__":
    main()
