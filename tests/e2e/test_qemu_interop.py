"""The runner and the test device against real QEMU front-ends and a real guest kernel.

The guest mounts the device, which makes its virtio-fs driver start the queues (QEMU sends
the memory table and ring setup) and send FUSE_INIT on the request queue. The test device
answers that with nonsense, so the mount fails inside the guest, but the chain has gone
through our runner and back; that is all this checks. FUSE itself is tested elsewhere.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from pyvirtiofsd.testing.testdevice import UppercaseDevice
from pyvirtiofsd.vhost_user.connection import Listener
from pyvirtiofsd.vhost_user.runner import VhostUserServer

vm_assets = pytest.importorskip("pyvirtiofsd.vm.assets")
vm_guest = pytest.importorskip("pyvirtiofsd.vm.guest")

pytestmark = pytest.mark.vm

TAG = b"interop"


def _need(flavor: str) -> None:
    missing = vm_assets.missing_assets(qemu=flavor)
    if missing:
        pytest.skip("; ".join(missing))


def _run(
    tmp_path: Path, flavor: str, device: UppercaseDevice, *, generic: bool
) -> tuple[Sequence[int], str]:
    sock = str(tmp_path / "fs.sock")
    listener = Listener.bind(sock)
    server = VhostUserServer(device, listener)
    served: list[Sequence[int]] = []
    t = threading.Thread(target=lambda: served.append(server.run()), daemon=True)
    t.start()
    fs = vm_guest.FsDevice(socket=sock, tag=TAG.decode(), generic=generic)
    script = "timeout 20 " + fs.mount_command("/mnt/x") + " 2>&1; true\n"
    result = vm_guest.run_guest(script, [fs], qemu=flavor, memory_mb=512, smp=1, timeout=180)
    t.join(20)
    assert not t.is_alive(), "the daemon did not exit when QEMU went away"
    listener.close()
    return served[0], result.kernel_log


@pytest.mark.parametrize("flavor", ["bookworm", "sid"])
def test_vhost_user_fs_pci(tmp_path: Path, caplog: pytest.LogCaptureFixture, flavor: str) -> None:
    _need(flavor)
    with caplog.at_level(logging.WARNING, logger="pyvirtiofsd"):
        served, kernel_log = _run(tmp_path, flavor, UppercaseDevice(), generic=False)
    assert not caplog.records, caplog.text  # QEMU sent nothing we refused
    assert f"discovered new tag: {TAG.decode()}" in kernel_log
    assert served[1] >= 1  # FUSE_INIT went through the request queue and came back


def test_generic_device_with_config_and_dax_window(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _need("sid")
    config = TAG.ljust(36, b"\0") + (1).to_bytes(4, "little")
    device = UppercaseDevice(config=config, shmem_sizes=[1 << 30])
    with caplog.at_level(logging.WARNING, logger="pyvirtiofsd"):
        served, kernel_log = _run(tmp_path, "sid", device, generic=True)
    assert not caplog.records, caplog.text
    # the tag came from GET_CONFIG, the window from GET_SHMEM_CONFIG (SHMEM = bit 22)
    assert f"discovered new tag: {TAG.decode()}" in kernel_log
    assert "Cache len: 0x40000000" in kernel_log
    assert served[1] >= 1
