"""The guest runner (:mod:`pyvirtiofsd.vm.guest`), in the parts that need no QEMU: the console
protocol, QEMU's arguments for the guest and its virtio-fs devices, the mount command, and the
error a failed script raises."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvirtiofsd.vm import FsDevice, GuestError, GuestResult
from pyvirtiofsd.vm.assets import QEMU_FLAVORS
from pyvirtiofsd.vm.guest import TCG_THREADS, _Console, qemu_args


def test_console_markers_split_across_chunks() -> None:
    streamed: list[str] = []
    console = _Console("n0nce", streamed.append)
    raw = (
        b"boot noise\r\n<<<pyvirtiofsd:n0nce:begin>>>\nline one\r\nno newline \xc3\xa9"
        b"\n<<<pyvirtiofsd:n0nce:status=42>>>\n<<<pyvirtiofsd:n0nce:kernel-log>>>\n[ 0.0] hi\n"
        b"<<<pyvirtiofsd:n0nce:end>>>\n"
    )
    for i in range(0, len(raw), 3):  # splits CR LF, UTF-8 and markers
        console.feed(raw[i : i + 3])
    console.feed(b"", final=True)
    assert console.status == 42
    assert console.output() == "line one\nno newline é"
    assert "".join(streamed) == console.output()
    assert console.section("kernel-log", "end") == "[ 0.0] hi\n"
    assert console.finished()


def test_fs_device_qemu_args() -> None:
    plain = FsDevice("/s", "tag", num_request_queues=2).qemu_args("fs0")
    assert plain[-1] == (
        "vhost-user-fs-pci,chardev=fs0,tag=tag,queue-size=1024,num-request-queues=2"
    )
    generic = FsDevice("/s", "tag", generic=True, queue_size=256).qemu_args("fs1")
    assert generic[1] == "socket,id=fs1,path=/s"
    assert "virtio-id=26,num_vqs=2,config_size=40,vq_size=256" in generic[-1]


def test_mount_command_quotes() -> None:
    device = FsDevice("/s", "my tag")
    assert device.mount_command("/mnt/x") == "mkdir -p /mnt/x && mount -t virtiofs 'my tag' /mnt/x"
    assert "-o dax=inode " in device.mount_command("/m", "dax=inode")


def test_qemu_args_take_every_device_and_refuse_one_without_queues(tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "k", tmp_path / "i"
    devices = [FsDevice("/a", "a"), FsDevice("/b", "b", num_request_queues=4)]
    args = qemu_args(devices, kernel=kernel, initrd=initrd, memory_mb=512, smp=2)
    assert args[args.index("-kernel") + 1] == str(kernel)
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in args  # vhost-user maps guest RAM
    assert [a for a in args if a.startswith("vhost-user-fs-pci")] == [
        devices[0].qemu_args("fs0")[-1],
        devices[1].qemu_args("fs1")[-1],
    ]
    assert args[args.index("-accel") + 1] == "tcg,thread=multi"
    single = qemu_args(
        devices, kernel=kernel, initrd=initrd, memory_mb=512, smp=2, tcg_threads="single"
    )
    assert single[single.index("-accel") + 1] == "tcg,thread=single"
    assert sorted(TCG_THREADS) == sorted(QEMU_FLAVORS)
    with pytest.raises(ValueError, match="at least one request queue"):
        qemu_args(
            [FsDevice("/c", "c", num_request_queues=0)],
            kernel=kernel,
            initrd=initrd,
            memory_mb=512,
            smp=1,
        )


def test_a_failed_script_raises_with_what_the_guest_printed() -> None:
    result = GuestResult("oops\n", 3, "console text", "", "qemu said", 1.0, 0.5, True)
    with pytest.raises(GuestError) as e:
        result.check()
    assert "status 3" in str(e.value) and "oops" in str(e.value)
    assert "qemu said" in str(e.value) and "console text" in str(e.value)
    assert GuestResult("", 0, "", "", "", 1.0, 0.5, True).check().status == 0
