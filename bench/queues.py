"""Request-queue benchmark: a parallel guest workload (fio, two jobs, each pinned to one of the
guest's two vCPUs) on pyvirtiofsd with one request queue and with two
(`--num-request-queues 2`), beside the Rust virtiofsd 1.14 with its single queue, in
interleaved rounds, in a real guest (QEMU 11.1, TCG).

    .venv/bin/python bench/queues.py                 # 3 rounds, 10 s per fio job
    .venv/bin/python bench/queues.py --rounds 1 --runtime 3 --size-mib 64

The Linux virtio-fs driver gives each vCPU a request queue of its own when the device has
enough of them, so with two queues the two jobs' requests arrive on two queues, which
pyvirtiofsd serves from a thread each. Every job uses O_DIRECT, so that every I/O reaches the
daemon. The figures are throughput (both jobs together) and the daemon's CPU per guest
operation; "scaling" is pyvirtiofsd's figure with two queues over its figure with one, in
the same round. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from common import Progress, prepare_profile, print_profile, rounds_order
from guest import (
    FIO_JOBS,
    add_common_arguments,
    fio_step,
    fio_value,
    plan_session,
    prepare_file,
    run_session,
)
from report import LABELS, PY, VIRTIOFSD, Row, table, write_json_if

from pyvirtiofsd.vm import missing_assets

TITLE = "guest: 2 fio jobs on 2 vCPUs, 1 or 2 request queues (QEMU 11.1 TCG)"
PY2 = "pyvirtiofsd 2q"
LABELS[PY2] = "pyvirtiofsd 2 queues"
#: (row name, daemon kind, request queues)
CONFIGS = [(PY, PY, 1), (PY2, PY, 2), (VIRTIOFSD, VIRTIOFSD, 1)]
JOBS = ["randread1", "randread16", "seqread"]
NUMJOBS = 2


@dataclass
class Options:
    rounds: int = 3
    runtime: int = 10
    size_mib: int = 256
    configs: list[str] = field(default_factory=lambda: [c[0] for c in CONFIGS])
    timeout: float = 3600.0
    keep_logs: bool = False
    profile: Path | None = None  # a directory for py-spy's stacks of pyvirtiofsd


def steps(opts: Options) -> list:
    out = []
    for name, job_label, _, args in FIO_JOBS:
        if name in JOBS:
            out.append(
                fio_step(name, f"{job_label} x{NUMJOBS} jobs", args, size_mib=opts.size_mib,
                         runtime=opts.runtime, direct=1, numjobs=NUMJOBS)
            )  # fmt: skip
    return out


def rows() -> list[Row]:
    out = []
    for name, job_label, unit, _ in FIO_JOBS:
        if name in JOBS:
            out.append(Row("queues", name, f"{job_label} x{NUMJOBS}", unit, "higher", VIRTIOFSD))
    for name, job_label, _, _ in FIO_JOBS:
        if name in JOBS:
            out.append(
                Row("queues", f"{name}-cpu", f"{job_label} x{NUMJOBS} CPU", "us/op", "lower",
                    VIRTIOFSD)
            )  # fmt: skip
    return out


def plan(progress: Progress, opts: Options) -> None:
    for r in range(opts.rounds):
        for config in opts.configs:
            plan_session(
                progress, f"queues/{r}/{config}", f"queues/{config}", steps(opts), "queues"
            )


def run(opts: Options, progress: Progress) -> list[Row]:
    missing = missing_assets(qemu="sid", rootfs="sid")
    if missing:
        raise RuntimeError("\n".join(missing))
    by_key = {r.key: r for r in rows()}
    configs = [c for c in CONFIGS if c[0] in opts.configs]
    units = {name: unit for name, _, unit, _ in FIO_JOBS}
    with tempfile.TemporaryDirectory(prefix="pyvirtiofsd-queues-bench-") as tmp:
        for n in range(opts.rounds):
            this_round: dict[tuple[str, str], float] = {}
            for name, kind, queues in rounds_order(configs, n):
                phases = run_session(
                    kind,
                    steps(opts),
                    Path(tmp) / f"{name.replace(' ', '-')}-{n}",
                    progress=progress,
                    prefix=f"queues/{n}/{name}",
                    title=f"queue bench, round {n + 1}/{opts.rounds}",
                    queues=queues,
                    display=LABELS.get(name, name),
                    prepare=lambda share: prepare_file(share / "fio.dat", opts.size_mib),
                    timeout=opts.timeout,
                    keep_logs=opts.keep_logs,
                    profile=opts.profile
                    and opts.profile / f"queues-{name}-{n}.txt".replace(" ", "-"),
                )
                for job, p in phases.items():
                    value = fio_value(units[job], p)
                    this_round[(name, job)] = value
                    by_key[job].add(
                        name,
                        value,
                        cpu_s=p.cpu,
                        requests=p.requests,
                        cores=p.cores,
                        busiest_thread=p.busiest_thread,
                    )
                    if p.ops:
                        by_key[f"{job}-cpu"].add(name, 1e6 * p.cpu / p.ops)
            for job in JOBS:
                one, two = this_round.get((PY, job)), this_round.get((PY2, job))
                if one and two:
                    by_key[job].extra.setdefault(PY2, {}).setdefault("scaling", []).append(
                        two / one
                    )
    return list(by_key.values())


def scaling_lines(result: list[Row]) -> list[str]:
    """Scaling, and how busy each daemon was: host cores in all, and its busiest thread."""
    lines = ["scaling from 1 to 2 request queues (median of the rounds' ratios); daemon CPU:"]
    for r in result:
        s = r.extra.get(PY2, {}).get("scaling")
        if not s:
            continue
        busy = []
        for d in (PY, PY2, VIRTIOFSD):
            e = r.extra.get(d, {})
            if "cores" in e:
                busy.append(
                    f"{LABELS.get(d, d)} {statistics.median(e['cores']):.2f} cores, busiest "
                    f"thread {statistics.median(e['busiest_thread']):.0%}"
                )
        lines.append(f"  {r.label}: {statistics.median(s):.2f}x; " + "; ".join(busy))
    return lines


def main() -> None:
    defaults = Options()
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--runtime",
        type=int,
        default=defaults.runtime,
        help=f"seconds per fio job (default {defaults.runtime})",
    )
    ap.add_argument("--size-mib", type=int, default=defaults.size_mib,
                    help=f"fio file size (default {defaults.size_mib})")  # fmt: skip
    add_common_arguments(ap, defaults.rounds, defaults.timeout, [PY, VIRTIOFSD])
    args = ap.parse_args()
    configs = [c[0] for c in CONFIGS if args.daemon is None or c[1] in args.daemon]
    opts = Options(args.rounds, args.runtime, args.size_mib, configs, args.timeout,
                   args.keep_logs, prepare_profile(args.profile))  # fmt: skip
    load = os.getloadavg()
    progress = Progress()
    plan(progress, opts)
    result = run(opts, progress)
    progress.close()
    print(table(result, {"queues": TITLE}))
    print("\n".join(scaling_lines(result)))
    print(f"host load average before / after: {load[0]:.2f} / {os.getloadavg()[0]:.2f}")
    print_profile(opts.profile, "queues-*.txt", "queues")
    write_json_if(args.json, result, "queues", vars(args))


if __name__ == "__main__":
    main()
