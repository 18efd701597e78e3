"""The guest runner (:mod:`pyvirtiofsd.vm.guest`), in the parts that need no QEMU: the console
protocol and the QEMU arguments of a virtio-fs device."""

from __future__ import annotations

from pyvirtiofsd.vm import FsDevice
from pyvirtiofsd.vm.guest import _Console


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
