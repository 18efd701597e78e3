"""The benchmark machinery in bench/ runs: `compare.py --smoke` end to end on the daemon-alone
part (every daemon, the compiled build's included, the progress line, the table, the JSON, the
chart), a run whose compiled build can't be had, where to find a compiled tree, the fresh file
system each session shares, and the report, the progress line and the profile summary on
recorded samples.

The compiled column needs a compiled tree of the sources as they are: `build/compiled` when
`.ci/test` has just built it, else a build cached under $PYVIRTIOFSD_CACHE/bench, made by the
first run (a minute or two; later runs of the same sources reuse it). On a machine that can't
compile (no gcc or Python headers) the smoke run leaves the column out.

Nothing here looks at a figure's size: a benchmark's numbers are for reading (docs/
benchmarks.md), and a test that asserted on them would fail on a busy machine. What is checked
is that every figure is there, is a number, and reaches the table, the JSON and the chart.
"""

from __future__ import annotations

import _ctypes
import importlib
import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType

import pytest

import pyvirtiofsd.virtio.chain as chain_module
from pyvirtiofsd.virtio.chain import read_chain
from pyvirtiofsd.virtio.memory import GuestMemory, MappedRegion
from pyvirtiofsd.vm import assets

BENCH = Path(__file__).resolve().parents[2] / "bench"
SRC = BENCH.parent / "src"
SVG = "{http://www.w3.org/2000/svg}"


def bench_module(name: str) -> ModuleType:
    """A module of bench/ (a directory of scripts, not a package), under a name of its own."""
    full = f"pyvirtiofsd_bench_{name}"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module  # dataclasses look their module up while they are made
        spec.loader.exec_module(module)
    return sys.modules[full]


def bench_script(name: str) -> ModuleType:
    """A script of bench/ that imports its neighbours by their plain names (common, report)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def bars(svg_text: str) -> list[ET.Element]:
    """The chart's bars: every rect but the background."""
    root = ET.fromstring(svg_text)
    return [r for r in root.iter(f"{SVG}rect") if r.get("fill") != "white"]


# --- the whole command, at its smoke size ---------------------------------------------------------


def smoke(out: Path, *options: str | Path) -> subprocess.CompletedProcess[str]:
    try:
        assets.rust_virtiofsd_command()
    except assets.AssetsMissing as exc:
        pytest.skip(str(exc))
    return subprocess.run(
        [sys.executable, BENCH / "compare.py", "--smoke", "--part", "frontend", *options,
         "--out", out],
        capture_output=True,
        text=True,
        timeout=420,  # a first build of the compiled tree takes one to two minutes
    )  # fmt: skip


def test_compare_smoke_runs_the_frontend_part_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results"
    cannot = bench_module("compiled").cannot_compile()
    run = smoke(out, *(["--no-compiled"] if cannot else []))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    daemons = ["pyvirtiofsd", "virtiofsd"] + ([] if cannot else ["pyvirtiofsd compiled"])

    # Progress: which daemon, which workload, how long is left.
    progress = run.stderr.splitlines()
    assert any("pyvirtiofsd, GETATTR at depth 1" in line and "left" in line for line in progress)
    assert any("virtiofsd 1.14, 1 MiB WRITE" in line for line in progress)
    if not cannot:
        assert any("pyvirtiofsd (mypyc), LOOKUP at depth 16" in line for line in progress)

    # Issue 10's requests, each at queue depth 1 and 16, with CPU per request and a rate, and
    # a file opened, read, flushed and released (each answer checked: an error stops the run).
    requests = ("getattr", "lookup", "read4k", "write4k", "read1m", "write1m", "openclose")
    keys = [f"{w}-q{d}-{kind}" for w in requests for d in (1, 16) for kind in ("cpu", "rate")]
    result = json.loads((out / "compare-smoke.json").read_text())
    assert result["schema"] == "pyvirtiofsd-bench/1"
    assert result["mode"] == "smoke" and result["errors"] == {}
    command = ["compare.py", "--smoke", "--part", "frontend"]
    assert result["command"] == command + (["--no-compiled"] if cannot else [])  # not --out
    assert set(result["load_average"]["during"]) == {"min", "median", "max"}
    workloads = {w["workload"]: w for w in result["workloads"] if w["part"] == "frontend"}
    assert sorted(workloads) == sorted(keys)
    for w in workloads.values():
        assert sorted(w["daemons"]) == sorted(daemons)
        ref = w["daemons"]["virtiofsd"]
        assert len(ref["rounds"]) == 1 and ref["value"] > 0 and ref["ratio"] is None
        for name in daemons:
            if name == "virtiofsd":
                continue
            py = w["daemons"][name]
            assert len(py["rounds"]) == 1 and py["value"] > 0
            assert math.isclose(py["ratio"], py["value"] / ref["value"], rel_tol=1e-4)
            assert (py["met"] is None) == (w["target"] is None)
    if not cannot:
        # The column is the compiled build of these very sources, and says how it was had.
        facts = result["facts"]["compiled"]
        assert "compiled with mypyc" in facts["version"] and facts["same_sources"] is True
        assert facts["origin"] in ("build/compiled", "cache", "built")
        assert "compiled build: pyvirtiofsd" in run.stdout

    # The table has every row with each ratio; the chart a bar per row and compared daemon.
    for w in workloads.values():
        line = next(s for s in run.stdout.splitlines() if s.startswith(w["label"] + " "))
        for name in daemons:
            if name != "virtiofsd":
                # The JSON keeps six significant digits: a ratio on the edge between two
                # hundredths (1.595) may print as either.
                ratio = w["daemons"][name]["ratio"]
                assert any(f"{r:.2f}x" in line for r in (ratio * (1 - 1e-5), ratio * (1 + 1e-5)))
    compared = len(daemons) - 1
    assert len(bars((out / "compare-smoke.svg").read_text())) == compared * len(keys)
    assert not (out / "compare.json").exists()  # a smoke run never replaces real figures


def test_compare_goes_on_without_a_compiled_build_it_cannot_have(tmp_path: Path) -> None:
    """A compiled tree that is not compiled (here the pure sources themselves) is refused: the
    compiled column is reported not measured, with the reason, and the others are measured."""
    out = tmp_path / "results"
    run = smoke(out, "--compiled", SRC)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((out / "compare-smoke.json").read_text())
    assert list(result["errors"]) == ["pyvirtiofsd compiled"]
    assert "pure Python" in result["errors"]["pyvirtiofsd compiled"]
    assert "NOT MEASURED: pyvirtiofsd compiled: " in run.stdout
    assert "compiled" not in result["facts"]
    for w in result["workloads"]:
        assert sorted(w["daemons"]) == ["pyvirtiofsd", "virtiofsd"]
        assert w["daemons"]["pyvirtiofsd"]["value"] > 0


# --- where the compiled tree comes from -----------------------------------------------------------


def pure_tree(root: Path) -> Path:
    """A tree laid out as a compiled one is (the package, the test helpers copied in), but of
    the pure sources."""
    shutil.copytree(SRC / "pyvirtiofsd", root / "pyvirtiofsd",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    return root


def test_a_tree_is_of_the_same_sources_only_while_every_module_is(tmp_path: Path) -> None:
    compiled = bench_module("compiled")
    tree = pure_tree(tmp_path)
    assert compiled.same_sources(tree)
    # The test helpers are no part of a wheel: a tree may have them or not.
    shutil.rmtree(tree / "pyvirtiofsd" / "testing")
    assert compiled.same_sources(tree)
    cli = tree / "pyvirtiofsd" / "cli.py"
    cli.write_text(cli.read_text() + "\n# edited\n")
    assert not compiled.same_sources(tree)
    cli.unlink()
    assert not compiled.same_sources(tree)


def test_a_tree_that_is_not_compiled_is_refused(tmp_path: Path) -> None:
    compiled = bench_module("compiled")
    tree = pure_tree(tmp_path)
    with pytest.raises(compiled.Unavailable, match="pure Python"):
        compiled.find(tree)
    with pytest.raises(compiled.Unavailable, match="no pyvirtiofsd package"):
        compiled.find(tree / "pyvirtiofsd" / "fuse")


def test_a_daemon_counts_as_compiled_only_with_its_trees_modules_loaded(tmp_path: Path) -> None:
    compiled = bench_module("compiled")
    ext = Path(_ctypes.__file__)  # any extension module stands for a compiled one
    shutil.copy(ext, tmp_path / ext.name)
    code = "import ctypes, sys; ctypes.CDLL(sys.argv[1]); print(flush=True); sys.stdin.read()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, tmp_path / ext.name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "\n"
        compiled.check_running(proc.pid, tmp_path)
        # This process loaded its extension modules from elsewhere.
        with pytest.raises(RuntimeError, match="none of its tree's modules"):
            compiled.check_running(os.getpid(), tmp_path)
    finally:
        proc.communicate(timeout=60)


# --- the requests, shaped as the guest shapes them ----------------------------------------------


@pytest.mark.parametrize("workload", ["read1m", "write1m"])
def test_frontend_tables_take_the_path_of_a_linux_guests_tables(
    workload: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The front-end bench measures the daemon on the chains a Linux guest sends: a big request's
    indirect table is decoded by the daemon's bulk path for Linux's tables, not by the walk it
    keeps for any other shape (a bench whose tables differ measures the wrong path)."""
    frontend = bench_script("frontend")
    ram = bytearray(4 << 20)
    memory = GuestMemory([MappedRegion.from_buffer(0, ram, name="ram")])
    s = frontend.shape(workload, frontend.Files(5, 7, b"data"), 0, 1)
    count = len(s.readable) + len(s.writable)
    gpas = [0x10000 + 2 * frontend.PAGE * i for i in range(count)]  # one page apart
    table = frontend.indirect_table(s, gpas)
    ram[: len(table)] = table
    ring = bytearray(16)
    chain_module.DESC.pack_into(ring, 0, 0, len(table), chain_module.VRING_DESC_F_INDIRECT, 0)

    bulk = chain_module._linux_table
    decoded: list[object] = []
    monkeypatch.setattr(
        chain_module, "_linux_table", lambda *args: decoded.append(bulk(*args)) or decoded[-1]
    )
    chain = read_chain(memory, memoryview(ring), 1, 0, indirect=True)
    assert decoded == [chain]
    request = [len(d) for d in s.readable]
    if sum(request) <= chain_module.SMALL_REQUEST:
        request = [sum(request)]  # headers and arguments: one copy
    assert [len(v) for v in chain.readable] == request
    assert [len(v) for v in chain.writable] == s.writable


# --- the report on recorded samples --------------------------------------------------------------


def recorded_rows() -> list:
    report = bench_module("report")
    Row = report.Row
    cpu = Row("frontend", "getattr-q1-cpu", "GETATTR Q1 CPU", "us/req", "lower", "virtiofsd",
              report.CPU_TARGET)  # fmt: skip
    for py, ref in ((12.0, 10.0), (11.0, 9.0), (13.0, 10.0)):
        cpu.add("pyvirtiofsd", py, cpu_s=py / 1e6)
        cpu.add("virtiofsd", ref)
    rate = Row("frontend", "read4k-q16-rate", "4 KiB READ Q16 rate", "req/s", "higher",
               "virtiofsd", 0.8)  # fmt: skip
    for py, ref in ((40e3, 100e3), (50e3, 100e3), (45e3, 90e3)):
        rate.add("pyvirtiofsd", py)
        rate.add("virtiofsd", ref)
    scaling = Row("queues", "randread1", "rand read 4K QD1 x2", "IOPS", "higher", "virtiofsd")
    scaling.add("pyvirtiofsd", 1000.0)
    scaling.add("pyvirtiofsd 2q", 1500.0)
    scaling.add("virtiofsd", 2000.0)
    fuse = Row("fusedev", "meta", "create+stat+unlink", "ops/s", "higher", "passthrough_ll", 0.9,
               context=("source dir",))  # fmt: skip
    fuse.add("pyvirtiofsd", 9500.0)
    fuse.add("passthrough_ll", 10000.0)
    fuse.add("source dir", 50000.0)
    return [cpu, rate, scaling, fuse]


def test_a_share_is_a_file_system_of_its_own_and_goes_away(tmp_path: Path) -> None:
    common = bench_module("common")
    if not common.fresh_share_possible():
        pytest.skip("a fresh share needs root, mkfs.ext4 and losetup")
    with common.fresh_share(tmp_path / "share", 64) as share:
        assert os.path.ismount(share)
        assert os.listdir(share) == []  # no lost+found: the workloads see an empty share
        (share / "f").write_bytes(b"x")
        assert os.stat(share).st_dev != os.stat(tmp_path).st_dev
    assert not os.path.ismount(share)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["share"]  # the image is gone
    assert os.listdir(share) == []


def test_rows_give_medians_ratios_and_targets() -> None:
    cpu, rate, scaling, fuse = recorded_rows()
    assert cpu.value("pyvirtiofsd") == 12.0 and cpu.value("virtiofsd") == 10.0
    assert cpu.ratio("pyvirtiofsd") == pytest.approx(1.2)
    assert cpu.relative("pyvirtiofsd") == pytest.approx(1 / 1.2)
    assert cpu.met("pyvirtiofsd") is True  # 1.2x the CPU, within 1.3x
    assert rate.ratio("pyvirtiofsd") == pytest.approx(0.45)
    assert rate.met("pyvirtiofsd") is False  # under 0.8x the rate
    assert scaling.met("pyvirtiofsd 2q") is None  # no target
    assert scaling.compared() == ["pyvirtiofsd", "pyvirtiofsd 2q"]
    assert fuse.compared() == ["pyvirtiofsd"]  # the plain directory is context only
    assert fuse.met("pyvirtiofsd") is True


def test_table_json_and_chart_carry_every_figure() -> None:
    report = bench_module("report")
    rows = recorded_rows()
    text = report.table(rows)
    assert "1.20x ok" in text and "0.45x MISS" in text and "<=1.3x" in text
    assert "pyvirtiofsd 2q ratio" in text and "source dir" in text

    data = json.loads(json.dumps(report.to_json(rows, {"mode": "full"})))
    assert data["schema"] == report.SCHEMA and data["mode"] == "full"
    cpu = data["workloads"][0]["daemons"]["pyvirtiofsd"]
    assert cpu["rounds"] == [12.0, 11.0, 13.0] and cpu["value"] == 12.0 and cpu["met"] is True
    assert cpu["extra"]["cpu_s"]["rounds"] == [12e-6, 11e-6, 13e-6]
    assert data["workloads"][3]["daemons"]["source dir"]["ratio"] == 5.0

    svg = report.chart_svg(rows, "title", "subtitle", {"frontend": "daemon alone"})
    # A bar per compared daemon and row: 1 + 1 + 2 + 1; green met, orange missed, grey none.
    fills = [b.get("fill") for b in bars(svg)]
    assert fills == ["#2e7d32", "#e65100", "#607d8b", "#607d8b", "#2e7d32"]
    assert "daemon alone" in svg


def test_progress_says_what_runs_and_what_is_left() -> None:
    common = bench_module("common")
    out = io.StringIO()
    progress = common.Progress(out)
    for r in range(2):
        for daemon in ("a", "b"):
            progress.plan(f"p/{r}/{daemon}", f"p/{daemon}", 100.0)
    assert progress.left() == 400.0
    progress.start("p/0/a", "round 1: a")
    progress.start("p/0/b", "round 1: b")  # finishes the step before
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[") and "round 1: a; ~" in lines[0]
    # Round 2's guesses are now what round 1 took, far below the 100 s guessed.
    assert progress.left() < 100.0
    progress.abandon("p/")
    assert progress.left() == 0.0


def test_profile_summary_reads_py_spy_raw_stacks(tmp_path: Path) -> None:
    common = bench_module("common")
    raw = tmp_path / "frontend-getattr-q1-r0.txt"
    # py-spy's raw format: a stack, outermost first, then a count (line numbers vary).
    raw.write_text(
        "_run (pyvirtiofsd/runner.py:10);handle (pyvirtiofsd/server.py:20);"
        "read_chain (pyvirtiofsd/chain.py:30) 6\n"
        "_run (pyvirtiofsd/runner.py:10);handle (pyvirtiofsd/server.py:21) 4\n"
    )
    lines = common.profile_summary([raw])
    assert lines[0].startswith("10 samples")
    assert "60.0" in lines[1] and "read_chain (pyvirtiofsd/chain.py)" in lines[1]
    assert "40.0 100.0  handle (pyvirtiofsd/server.py)" in lines[2]
    assert common.profile_summary([tmp_path / "none.txt"]) == ["no profile samples"]
