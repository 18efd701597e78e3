"""Two request queues: QEMU's ``vhost-user-fs-pci,num-request-queues=2`` and the daemon's
``--num-request-queues 2``, with several guest processes doing I/O at once on both vCPUs.

The guest's virtio-fs driver sends each request on the queue mapped to the CPU it runs on, so
processes pinned to CPU 0 and CPU 1 load both queues. The daemon's exit log (requests per
queue) shows that both served requests, and the host checks every byte the processes wrote.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvirtiofsd.vm import FsDevice, run_guest
from tests.e2e.conftest import DaemonFactory, require_assets, sha256_file, write_random

pytestmark = pytest.mark.vm

MiB = 1 << 20
WORKERS = [(cpu, n) for cpu in (0, 1) for n in (1, 2)]
FILES_PER_WORKER = 150

# Each worker: read the host's file through the daemon, write its own file, then create and
# read back small files. Results go to a file per worker so outputs do not interleave.
WORKER = r"""
w=$1
dd if=/dev/urandom of=out-$w bs=65536 count=48 2>/dev/null
mkdir small-$w
i=0
while [ $i -lt __FILES__ ]; do echo "$w $i" > small-$w/f$i; i=$((i + 1)); done
{
    echo "READ_$w $(sha256sum from-host.bin | cut -d' ' -f1)"
    echo "WROTE_$w $(sha256sum out-$w | cut -d' ' -f1)"
    echo "SMALL_$w $(cat small-$w/f* | wc -l)"
} > /tmp/report-$w
"""

SCRIPT = r"""
set -eu
__MOUNT__
cd /mnt/s
echo "CPUS $(nproc)"
cat > /tmp/worker <<'EOF'
__WORKER__
EOF
sync
echo 3 > /proc/sys/vm/drop_caches
__START__
wait
cat /tmp/report-*
echo "DONE yes"
"""


def test_two_request_queues_in_parallel(workdir: Path, start_daemon: DaemonFactory) -> None:
    require_assets("sid")
    share = workdir / "share"
    share.mkdir()
    write_random(share / "from-host.bin", 24 * MiB, seed=3)
    daemon = start_daemon(share, "--num-request-queues", "2")
    device = FsDevice(daemon.socket, "share", num_request_queues=2)
    start = "\n".join(f"taskset -c {cpu} sh /tmp/worker {cpu}{n} &" for cpu, n in WORKERS)
    script = (
        SCRIPT.replace("__MOUNT__", device.mount_command("/mnt/s"))
        .replace("__WORKER__", WORKER.replace("__FILES__", str(FILES_PER_WORKER)))
        .replace("__START__", start)
    )
    result = run_guest(script, [device], qemu="sid", smp=2, timeout=600)
    daemon.finish()
    assert result.status == 0, result.output + result.kernel_log[-3000:]

    report = dict(line.split(" ", 1) for line in result.output.splitlines() if " " in line)
    assert report.get("DONE") == "yes", result.output
    assert report["CPUS"] == "2"
    from_host = sha256_file(share / "from-host.bin")
    for cpu, n in WORKERS:
        w = f"{cpu}{n}"
        assert report[f"READ_{w}"] == from_host
        assert report[f"WROTE_{w}"] == sha256_file(share / f"out-{w}")
        assert (share / f"out-{w}").stat().st_size == 48 * 65536
        assert int(report[f"SMALL_{w}"]) == FILES_PER_WORKER
        for i in range(FILES_PER_WORKER):
            assert (share / f"small-{w}" / f"f{i}").read_text() == f"{w} {i}\n"

    per_queue = daemon.requests_per_queue()
    print(f"requests per queue (hiprio first): {per_queue}")
    # Queue 0 is the high-priority queue; 1 and 2 are the two request queues.
    assert len(per_queue) >= 3
    assert per_queue[1] > 0 and per_queue[2] > 0, per_queue
    assert not any(per_queue[3:]), per_queue
