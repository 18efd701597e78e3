"""One front-end's vhost-user session: the back-end's protocol state machine, sans I/O.

:class:`Session` takes one decoded :class:`~.messages.Message` at a time (with the
fds that came with it), updates the device state (features, memory table, rings, config,
status) and returns the reply bytes to send, if any. It never touches the socket; the
queue workers sit behind the small :class:`QueueRunner` interface, so the whole protocol
can be driven from tests with a fake runner.

Rules the state machine keeps:

* every request with NEED_REPLY gets a u64 status (0 = success) once REPLY_ACK is
  negotiated, unless the request has a reply of its own;
* requests that have a reply of their own get one even when they fail (an empty payload),
  so a front-end never waits for ever;
* a malformed or unacceptable request is logged and refused; it never changes state half
  way and never brings the daemon down;
* every fd that arrives is either kept by the state it configures or closed;
* guest memory is only unmapped after the workers that could use it have been stopped,
  which drains their in-flight requests, and restarted on the new table.

Ring lifecycle (vhost-user "ring states"): a ring starts on SET_VRING_KICK and stops on
GET_VRING_BASE, which waits for in-flight requests. It is processed only while started
*and* enabled; without VHOST_USER_F_PROTOCOL_FEATURES all rings are enabled by
SET_FEATURES, otherwise by SET_VRING_ENABLE.

Live migration is offered (VHOST_F_LOG_ALL, LOG_SHMFD, DEVICE_STATE) only for a device that
can save its state; a front-end (QEMU) then refuses to migrate and says why. With it:

* Dirty log. SET_LOG_BASE maps the log (a new one replaces the old: rings switch to it before
  the reply, which the front-end waits for, and the old one is unmapped after). Reply data is
  logged while LOG_ALL is acked, used-ring stores while the ring's address carries
  VHOST_VRING_F_LOG; both switch on running rings (SET_FEATURES, and SET_VRING_ADDR with the
  ring's addresses unchanged), without touching the ring's indices. Asked before a log is
  mapped, logging starts with the log. When neither is asked any more (a cancelled migration),
  the log is unmapped.
* Device state. SET_DEVICE_STATE_FD (stopped phase only, every ring stopped) replies at once and
  leaves the bytes to a :class:`~.transfer.StateTransfer` thread; CHECK_DEVICE_STATE waits for
  it and answers its verdict. Any other request in between abandons the transfer.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Callable, Sequence
from typing import Protocol

from pyvirtiofsd.vhost_user.messages import (
    DEVICE_STATE_NO_FD,
    DEVICE_STATE_PHASE_STOPPED,
    OWN_REPLY,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    ConfigSpace,
    DeviceStateRequest,
    FrontendReq,
    LogDescription,
    Message,
    MessageError,
    ProtocolFeature,
    ShmemConfig,
    VringAddr,
    VringState,
    decode_mem_table,
    decode_single_region,
    decode_u64,
    decode_vring_fd,
    encode_reply,
    encode_u64,
)
from pyvirtiofsd.vhost_user.transfer import StateTransfer, TransferError
from pyvirtiofsd.vhost_user.vring import Vring, check_notifier_fd
from pyvirtiofsd.virtio.device import SharedMemoryMapper, VirtioDevice
from pyvirtiofsd.virtio.dirtylog import DirtyLog, DirtyLogError
from pyvirtiofsd.virtio.memory import GuestMemory, GuestMemoryError, MappedRegion, RegionSpec
from pyvirtiofsd.virtio.queue import (
    MAX_QUEUE_SIZE,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    SplitQueue,
)

__all__ = [
    "Channel",
    "ChannelFactory",
    "QueueRunner",
    "RequestError",
    "Session",
    "TransferFactory",
]

log = logging.getLogger(__name__)

#: QEMU's own limit for vhost-user (VHOST_USER_MAX_RAM_SLOTS). It also sends us every region
#: mapped into a device's shared memory (each DAX mapping), so a small limit would refuse those.
DEFAULT_MAX_MEM_SLOTS = 512


class QueueRunner(Protocol):
    """What the state machine asks of whoever runs the queues."""

    def start_queue(self, vring: Vring) -> None:
        """Begin serving ``vring.queue`` (the ring has just been started)."""
        ...

    def stop_queue(self, vring: Vring) -> None:
        """Stop serving the ring; return only once no request of it is in flight."""
        ...

    def wake_queue(self, vring: Vring) -> None:
        """The ring's enabled state changed; look at the ring again."""
        ...

    def close(self) -> None: ...


class Channel(SharedMemoryMapper, Protocol):
    """The back-end channel as the session holds it: requests to the front-end, and an end."""

    def close(self) -> None: ...


ChannelFactory = Callable[[int, int], Channel]
"""``factory(fd, acked_protocol_features)``: wrap the SET_BACKEND_REQ_FD socket."""

TransferFactory = Callable[[VirtioDevice, int, int], StateTransfer]
"""``factory(device, direction, fd)``: start moving the device's state through ``fd``."""


class RequestError(Exception):
    """A well-formed request that we refuse (bad index, wrong state, unsupported)."""


# What a request whose sender waits for a u64 of its own gets when it fails.
_U64_FAILURE = {
    FrontendReq.IOTLB_MSG: 1,
    FrontendReq.POSTCOPY_END: 1,
    # status 1, and "no fd in this reply" (an error reply must not carry one)
    FrontendReq.SET_DEVICE_STATE_FD: DEVICE_STATE_NO_FD | 1,
    FrontendReq.CHECK_DEVICE_STATE: 1,
}


def _is_power_of_two(n: int) -> bool:
    return n > 0 and not n & (n - 1)


class Session:
    """Protocol state of one front-end connection serving one :class:`VirtioDevice`."""

    def __init__(
        self,
        device: VirtioDevice,
        runner: QueueRunner,
        *,
        channel_factory: ChannelFactory | None = None,
        max_mem_slots: int = DEFAULT_MAX_MEM_SLOTS,
        transfer_factory: TransferFactory = StateTransfer,
    ) -> None:
        self.device = device
        self.runner = runner
        self._channel_factory = channel_factory
        self._transfer_factory = transfer_factory
        #: The dirty log (SET_LOG_BASE), while one is mapped; whether a ring or LOG_ALL has
        #: used it since (it is unmapped when they stop); whether the last SET_LOG_BASE failed.
        self.log: DirtyLog | None = None
        self._log_used = False
        self._log_failed = False
        #: The device state transfer between SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE.
        self._transfer: StateTransfer | None = None
        self.max_mem_slots = max_mem_slots
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        self.memory = GuestMemory()
        self._device_regions: list[MappedRegion] = []
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.owner = False
        self.status = 0
        self.channel: Channel | None = None
        self._config = bytes(device.config())
        self._shmem_sizes = list(device.shmem_sizes())
        for shmid, size in enumerate(self._shmem_sizes):
            if size % mmap.PAGESIZE:
                raise ValueError(f"shared memory region {shmid}: {size} is not a page multiple")
        self.migratable = bool(getattr(device, "migratable", False))
        self.offered_features = (
            device.features
            | 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_RING_INDIRECT_DESC
            | 1 << VIRTIO_F_RING_EVENT_IDX
            | 1 << VHOST_USER_F_PROTOCOL_FEATURES
        )
        if self.migratable:
            self.offered_features |= 1 << VHOST_F_LOG_ALL
        offered = [
            ProtocolFeature.MQ,
            ProtocolFeature.REPLY_ACK,
            ProtocolFeature.BACKEND_REQ,
            ProtocolFeature.BACKEND_SEND_FD,
            ProtocolFeature.CONFIGURE_MEM_SLOTS,
            ProtocolFeature.RESET_DEVICE,
            ProtocolFeature.STATUS,
        ]
        if self._config:
            offered.append(ProtocolFeature.CONFIG)
        if self._shmem_sizes:
            offered.append(ProtocolFeature.SHMEM)
        if self.migratable:
            offered += [ProtocolFeature.LOG_SHMFD, ProtocolFeature.DEVICE_STATE]
        self.offered_protocol_features = sum(1 << b for b in offered)
        self._handlers: dict[int, Callable[[Message], bytes | None]] = {
            FrontendReq.GET_FEATURES: self._get_features,
            FrontendReq.SET_FEATURES: self._set_features,
            FrontendReq.SET_OWNER: self._set_owner,
            FrontendReq.RESET_OWNER: self._reset_owner,
            FrontendReq.SET_MEM_TABLE: self._set_mem_table,
            FrontendReq.SET_LOG_BASE: self._set_log_base,
            FrontendReq.SET_LOG_FD: self._set_log_fd,
            FrontendReq.SET_VRING_NUM: self._set_vring_num,
            FrontendReq.SET_VRING_ADDR: self._set_vring_addr,
            FrontendReq.SET_VRING_BASE: self._set_vring_base,
            FrontendReq.GET_VRING_BASE: self._get_vring_base,
            FrontendReq.SET_VRING_KICK: self._set_vring_kick,
            FrontendReq.SET_VRING_CALL: self._set_vring_call,
            FrontendReq.SET_VRING_ERR: self._set_vring_err,
            FrontendReq.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            FrontendReq.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            FrontendReq.GET_QUEUE_NUM: self._get_queue_num,
            FrontendReq.SET_VRING_ENABLE: self._set_vring_enable,
            FrontendReq.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            FrontendReq.GET_CONFIG: self._get_config,
            FrontendReq.SET_CONFIG: self._set_config,
            FrontendReq.RESET_DEVICE: self._reset_device,
            FrontendReq.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            FrontendReq.ADD_MEM_REG: self._add_mem_reg,
            FrontendReq.REM_MEM_REG: self._rem_mem_reg,
            FrontendReq.SET_STATUS: self._set_status,
            FrontendReq.GET_STATUS: self._get_status,
            FrontendReq.GET_SHMEM_CONFIG: self._get_shmem_config,
            FrontendReq.SET_DEVICE_STATE_FD: self._set_device_state_fd,
            FrontendReq.CHECK_DEVICE_STATE: self._check_device_state,
        }

    # -- entry point ---------------------------------------------------------------------

    def handle(self, msg: Message) -> bytes | None:
        """Apply one request; return the bytes to send back (None: no reply)."""
        name = msg.name()
        handler = self._handlers.get(msg.request)
        reply: bytes | None = None
        ok = False
        try:
            if msg.version != 1:
                raise RequestError(f"protocol version {msg.version} (flags {msg.flags:#x})")
            if msg.is_reply:
                raise RequestError("a reply where a request was expected")
            if handler is None:
                raise RequestError("not supported by this back-end")
            log.debug("vhost-user %s (%d bytes, %d fds)", name, len(msg.payload), len(msg.fds))
            if self._transfer is not None and msg.request != FrontendReq.CHECK_DEVICE_STATE:
                self._abandon_transfer(name)
            reply = handler(msg)
            ok = True
        except (RequestError, MessageError, GuestMemoryError) as e:
            log.warning("vhost-user %s refused: %s", name, e)
        except Exception:
            log.exception("vhost-user %s failed", name)
        finally:
            msg.close_fds()
        if reply is not None:
            return encode_reply(msg.request, reply)
        if msg.request in _U64_FAILURE:
            return encode_reply(msg.request, encode_u64(_U64_FAILURE[msg.request]))
        if msg.request in OWN_REPLY:
            return encode_reply(msg.request)
        if msg.request == FrontendReq.SET_LOG_BASE and self._has_protocol(
            ProtocolFeature.LOG_SHMFD
        ):
            # The front-end waits for this reply whatever happened (it reads no status).
            return encode_reply(msg.request)
        if msg.need_reply and self._has_protocol(ProtocolFeature.REPLY_ACK):
            return encode_reply(msg.request, encode_u64(0 if ok else 1))
        return None

    def close(self) -> None:
        """The front-end went away: stop every ring, unmap memory, close every fd."""
        if self._transfer is not None:
            self._abandon_transfer("the end of the connection")
        for vring in self.vrings:
            if vring.queue is not None:
                self._detach(vring)
            vring.reset()
        self._set_log(None)
        self._set_channel(None)
        for region in self.memory.regions:
            if not region.device_owned:
                region.close()
        self.memory = GuestMemory(self._device_regions)

    # -- device-owned memory -------------------------------------------------------------

    def add_device_region(
        self, guest_addr: int, buffer: memoryview | mmap.mmap | bytearray, *, name: str = "device"
    ) -> MappedRegion:
        """Make a daemon-owned buffer translatable at ``guest_addr`` (e.g. a DAX window).

        Call from the control side, not from a request handler.
        """
        region = MappedRegion.from_buffer(guest_addr, buffer, name=name)
        memory = self.memory.with_region(region)
        self._device_regions.append(region)
        self._install_memory(memory, retired=())
        return region

    def remove_device_region(self, region: MappedRegion) -> None:
        """Forget a device-owned region; drains the running rings first."""
        self._device_regions.remove(region)
        self._install_memory(self.memory.without_region(region), retired=(region,))

    # -- helpers -------------------------------------------------------------------------

    def _has_protocol(self, bit: int) -> bool:
        return bool(self.acked_protocol_features >> bit & 1)

    def _has_feature(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise RequestError(f"ring index {index} (device has {len(self.vrings)} queues)")
        return self.vrings[index]

    def _single_fd(self, msg: Message) -> int:
        fds = msg.take_fds()
        if len(fds) != 1:
            for fd in fds:
                _close_quietly(fd)
            raise RequestError(f"expected one fd, got {len(fds)}")
        return fds[0]

    def _notifier_fd(self, msg: Message) -> tuple[Vring, int | None]:
        index, has_fd = decode_vring_fd(msg.payload)
        vring = self._vring(index)
        if not has_fd:
            if msg.fds:
                raise RequestError("fd attached although the no-fd flag is set")
            return vring, None
        fd = self._single_fd(msg)
        try:
            check_notifier_fd(fd)
        except (OSError, ValueError) as e:
            _close_quietly(fd)
            raise RequestError(str(e)) from None
        return vring, fd

    def _attach(self, vring: Vring) -> None:
        """Build the ring's queue from its addresses and hand it to the runner."""
        if vring.size == 0 or vring.addr is None:
            raise RequestError(f"ring {vring.index} started before its size and addresses")
        addr = vring.addr
        try:
            queue = SplitQueue.from_user(
                self.memory,
                vring.size,
                addr.desc,
                addr.avail,
                addr.used,
                event_idx=self._has_feature(VIRTIO_F_RING_EVENT_IDX),
                indirect=self._has_feature(VIRTIO_F_RING_INDIRECT_DESC),
                next_avail=vring.base,
            )
        except ValueError as e:
            raise RequestError(f"ring {vring.index}: {e}") from None
        vring.queue = queue
        vring.broken = False
        self._apply_logging(vring)
        self.runner.start_queue(vring)

    def _detach(self, vring: Vring) -> None:
        """Stop the worker (draining in-flight requests) and drop the ring views."""
        queue = vring.queue
        if queue is None:
            return
        self.runner.stop_queue(vring)
        vring.base = queue.next_avail
        vring.queue = None
        queue.release()

    def _install_memory(self, memory: GuestMemory, retired: Sequence[MappedRegion]) -> None:
        """Switch to a new memory table, unmapping ``retired`` regions safely."""
        running = [v for v in self.vrings if v.queue is not None]
        if not retired:
            # Nothing goes away, so running rings can switch snapshots without a pause:
            # a worker reads ``queue.memory`` once per chain.
            self.memory = memory
            for vring in running:
                assert vring.queue is not None
                vring.queue.memory = memory
            return
        if not any(_ring_in(vring, region) for vring in running for region in retired):
            # No ring lives in what goes away (a DAX mapping leaving the window, say): swap
            # snapshots as for an addition. A request still holding a view into a retired
            # region keeps its mapping alive until the view is released. Stopping the rings
            # instead would wait for every request in flight, and a request can be waiting
            # for the front-end, which is itself waiting for this reply.
            self.memory = memory
            for vring in running:
                assert vring.queue is not None
                vring.queue.memory = memory
            for region in retired:
                region.close(quiet=True)
            return
        for vring in running:
            self._detach(vring)
        self.memory = memory
        for region in retired:
            region.close()
        for vring in running:
            try:
                self._attach(vring)
            except RequestError as e:
                vring.broken = True
                log.error(
                    "vhost-user: ring %d can't restart on the new memory table: %s", vring.index, e
                )

    def _set_channel(self, channel: Channel | None) -> None:
        old, self.channel = self.channel, channel
        self.device.set_backend_channel(channel)
        if old is not None:
            old.close()

    def _stop_ring(self, vring: Vring) -> None:
        self._detach(vring)
        vring.started = False
        vring.set_kick_fd(None)

    # -- features, ownership -------------------------------------------------------------

    def _get_features(self, msg: Message) -> bytes:
        return encode_u64(self.offered_features)

    def _set_features(self, msg: Message) -> None:
        features = decode_u64(msg.payload)
        extra = features & ~self.offered_features
        if extra:
            raise RequestError(f"features {extra:#x} were not offered")
        if features >> VHOST_F_LOG_ALL & 1 and self._log_failed:
            raise RequestError("LOG_ALL, but the last SET_LOG_BASE could not be mapped")
        logging_changed = (features ^ self.acked_features) >> VHOST_F_LOG_ALL & 1
        self.acked_features = features
        if logging_changed:
            log.info(
                "vhost-user: dirty-page logging %s",
                "on" if features >> VHOST_F_LOG_ALL & 1 else "off",
            )
            self._update_logging()
        if not features >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            for vring in self.vrings:
                vring.enabled = True
                if vring.queue is not None:
                    self.runner.wake_queue(vring)

    def _get_protocol_features(self, msg: Message) -> bytes:
        return encode_u64(self.offered_protocol_features)

    def _set_protocol_features(self, msg: Message) -> None:
        features = decode_u64(msg.payload)
        extra = features & ~self.offered_protocol_features
        if extra:
            raise RequestError(f"protocol features {extra:#x} were not offered")
        self.acked_protocol_features = features

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        # Deprecated; the spec suggests treating it as "disable all rings", which is
        # harmless, rather than discarding the session.
        for vring in self.vrings:
            vring.enabled = False

    def _get_queue_num(self, msg: Message) -> bytes:
        return encode_u64(len(self.vrings))

    def _set_status(self, msg: Message) -> None:
        status = decode_u64(msg.payload)
        if status > 0xFF:
            raise RequestError(f"device status {status:#x} does not fit a byte")
        self.status = status

    def _get_status(self, msg: Message) -> bytes:
        return encode_u64(self.status)

    def _reset_device(self, msg: Message) -> None:
        for vring in self.vrings:
            self._detach(vring)
            vring.reset()
        self.acked_features = 0
        self.status = 0
        self._update_logging()
        self.device.reset()

    # -- memory --------------------------------------------------------------------------

    def _set_mem_table(self, msg: Message) -> None:
        descs = decode_mem_table(msg.payload)
        fds = msg.take_fds()
        mapped: list[MappedRegion] = []
        try:
            if len(fds) != len(descs):
                raise RequestError(f"{len(descs)} regions but {len(fds)} fds")
            for desc, fd in zip(descs, fds, strict=True):
                spec = RegionSpec(desc.guest_addr, desc.size, desc.user_addr, desc.mmap_offset)
                mapped.append(MappedRegion.map_fd(spec, fd))
            memory = GuestMemory([*mapped, *self._device_regions])
        except BaseException:
            for region in mapped:
                region.close()
            raise
        finally:
            for fd in fds:
                _close_quietly(fd)
        retired = [r for r in self.memory.regions if not r.device_owned]
        self._install_memory(memory, retired)
        log.info(
            "vhost-user: memory table of %d regions, %d MiB",
            len(mapped),
            sum(r.size for r in mapped) >> 20,
        )

    # -- dirty log -------------------------------------------------------------------------

    def _set_log_base(self, msg: Message) -> bytes:
        if not self._has_protocol(ProtocolFeature.LOG_SHMFD):
            raise RequestError("dirty-page logging (live migration) was not negotiated")
        desc = LogDescription.decode(msg.payload)
        fd = self._single_fd(msg)
        try:
            new = DirtyLog(fd, desc.size, desc.offset)
        except DirtyLogError as e:
            self._log_failed = True
            raise RequestError(str(e)) from None
        finally:
            _close_quietly(fd)
        self._log_failed = False
        # The front-end harvests the old log a last time once we reply, then frees it: every
        # ring writes to the new one before that.
        self._set_log(new)
        log.info("vhost-user: dirty log of %d KiB (%s)", desc.size >> 10, new.method)
        return desc.encode()

    def _set_log_fd(self, msg: Message) -> None:
        # An eventfd to signal after logging (the spec's optional "log modified" notifier);
        # nothing needs it: QEMU reads the log when it wants. handle() closes it.
        if not self._has_protocol(ProtocolFeature.LOG_SHMFD):
            raise RequestError("dirty-page logging (live migration) was not negotiated")

    def _set_log(self, new: DirtyLog | None) -> None:
        """Replace the log: rings switch first, then the old one is unmapped (after any mark
        in progress)."""
        old, self.log = self.log, new
        self._log_used = False
        self._update_logging()
        if old is not None:
            old.close()

    def _update_logging(self) -> None:
        """Give every running ring the logging it is asked for; unmap the log once nothing
        asks for it any more (a migration was cancelled)."""
        for vring in self.vrings:
            self._apply_logging(vring)
        wanted = self._has_feature(VHOST_F_LOG_ALL) or any(
            v.addr is not None and v.addr.flags & VringAddr.LOG_FLAG for v in self.vrings
        )
        if wanted:
            self._log_used = True
        elif self._log_used and self.log is not None:
            log.info("vhost-user: dirty logging ended; log unmapped")
            self._set_log(None)

    def _apply_logging(self, vring: Vring) -> None:
        queue = vring.queue
        if queue is None:
            return
        dirty = self.log
        data = dirty if self._has_feature(VHOST_F_LOG_ALL) else None
        addr = vring.addr
        if dirty is not None and addr is not None and addr.flags & VringAddr.LOG_FLAG:
            queue.set_logging(data, dirty, addr.log)
        else:
            queue.set_logging(data, None)

    # -- device state ----------------------------------------------------------------------

    def _set_device_state_fd(self, msg: Message) -> bytes:
        if not self._has_protocol(ProtocolFeature.DEVICE_STATE):
            raise RequestError("DEVICE_STATE was not negotiated")
        req = DeviceStateRequest.decode(msg.payload)
        fd = self._single_fd(msg)
        if req.phase != DEVICE_STATE_PHASE_STOPPED:
            _close_quietly(fd)
            raise RequestError(f"transfer phase {req.phase} (only the stopped phase, 0)")
        running = [v.index for v in self.vrings if v.queue is not None]
        if running:
            _close_quietly(fd)
            raise RequestError(f"the device is not stopped: rings {running} run")
        try:
            self._transfer = self._transfer_factory(self.device, req.direction, fd)
        except TransferError as e:
            raise RequestError(str(e)) from None
        log.info("vhost-user: device state %s begins", self._transfer.what)
        # We give no fd back: the bytes go through the front-end's pipe.
        return encode_u64(DEVICE_STATE_NO_FD)

    def _check_device_state(self, msg: Message) -> bytes:
        transfer, self._transfer = self._transfer, None
        if transfer is None:
            raise RequestError("no device state transfer to check")
        error = transfer.result()
        if error is not None:
            log.error("vhost-user: device state %s failed: %s", transfer.what, error)
            return encode_u64(1)
        return encode_u64(0)

    def _abandon_transfer(self, why: str) -> None:
        transfer, self._transfer = self._transfer, None
        assert transfer is not None
        log.warning(
            "vhost-user: device state %s abandoned (%s came before CHECK_DEVICE_STATE)",
            transfer.what,
            why,
        )
        transfer.cancel()

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return encode_u64(self.max_mem_slots)

    def _add_mem_reg(self, msg: Message) -> None:
        desc = decode_single_region(msg.payload)
        fd = self._single_fd(msg)
        try:
            count = sum(1 for r in self.memory.regions if not r.device_owned)
            if count >= self.max_mem_slots:
                raise RequestError(f"all {self.max_mem_slots} memory slots are in use")
            spec = RegionSpec(desc.guest_addr, desc.size, desc.user_addr, desc.mmap_offset)
            region = MappedRegion.map_fd(spec, fd)
        finally:
            _close_quietly(fd)
        try:
            memory = self.memory.with_region(region)
        except GuestMemoryError:
            region.close()
            raise
        self._install_memory(memory, retired=())

    def _rem_mem_reg(self, msg: Message) -> None:
        desc = decode_single_region(msg.payload)
        # The spec tolerates one (useless) fd here; handle() closes it.
        region = self.memory.find(desc.guest_addr, desc.size, desc.user_addr)
        if region is None:
            raise RequestError(
                f"no region at guest {desc.guest_addr:#x}+{desc.size:#x}, user {desc.user_addr:#x}"
            )
        self._install_memory(self.memory.without_region(region), retired=(region,))

    # -- rings ---------------------------------------------------------------------------

    def _set_vring_num(self, msg: Message) -> None:
        state = VringState.decode(msg.payload)
        vring = self._vring(state.index)
        if vring.started:
            raise RequestError(f"ring {state.index} is running")
        limit = min(self.device.max_queue_size, MAX_QUEUE_SIZE)
        if not _is_power_of_two(state.num) or state.num > limit:
            raise RequestError(f"ring size {state.num} is not a power of two up to {limit}")
        vring.size = state.num

    def _set_vring_addr(self, msg: Message) -> None:
        addr = VringAddr.decode(msg.payload)
        vring = self._vring(addr.index)
        if addr.flags & ~VringAddr.LOG_FLAG:
            raise RequestError(f"unknown ring address flags {addr.flags:#x}")
        if vring.started:
            # A running ring only switches the logging of its used ring (QEMU does so when a
            # migration begins or is cancelled); its place and indices stay as they are.
            old = vring.addr
            if old is None or (old.desc, old.used, old.avail) != (addr.desc, addr.used, addr.avail):
                raise RequestError(f"ring {addr.index} is running")
            vring.addr = addr
            self._update_logging()
            return
        vring.addr = addr
        if addr.flags & VringAddr.LOG_FLAG:
            self._update_logging()

    def _set_vring_base(self, msg: Message) -> None:
        state = VringState.decode(msg.payload)
        vring = self._vring(state.index)
        if vring.started:
            raise RequestError(f"ring {state.index} is running")
        if state.num > 0xFFFF:
            raise RequestError(f"ring base {state.num:#x} (packed rings are not supported)")
        vring.base = state.num

    def _get_vring_base(self, msg: Message) -> bytes:
        state = VringState.decode(msg.payload)
        vring = self._vring(state.index)
        self._stop_ring(vring)
        return VringState(vring.index, vring.base).encode()

    def _set_vring_kick(self, msg: Message) -> None:
        vring, fd = self._notifier_fd(msg)
        if fd is None:
            raise RequestError("polling rings (no kick fd) are not supported")
        if vring.queue is not None:
            self._detach(vring)
        vring.set_kick_fd(fd)
        vring.started = True
        try:
            self._attach(vring)
        except RequestError:
            vring.started = False
            raise

    def _set_vring_call(self, msg: Message) -> None:
        vring, fd = self._notifier_fd(msg)
        vring.set_call_fd(fd)

    def _set_vring_err(self, msg: Message) -> None:
        vring, fd = self._notifier_fd(msg)
        vring.set_err_fd(fd)

    def _set_vring_enable(self, msg: Message) -> None:
        state = VringState.decode(msg.payload)
        vring = self._vring(state.index)
        if not self._has_feature(VHOST_USER_F_PROTOCOL_FEATURES):
            raise RequestError("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        if state.num not in (0, 1):
            raise RequestError(f"enable value {state.num}")
        vring.enabled = bool(state.num)
        if vring.queue is not None:
            self.runner.wake_queue(vring)

    # -- back-end channel, config, shared memory ------------------------------------------

    def _set_backend_req_fd(self, msg: Message) -> None:
        if not self._has_protocol(ProtocolFeature.BACKEND_REQ):
            raise RequestError("BACKEND_REQ was not negotiated")
        fd = self._single_fd(msg)
        if self._channel_factory is None:
            _close_quietly(fd)
            raise RequestError("this back-end has no use for a back-end channel")
        try:
            channel = self._channel_factory(fd, self.acked_protocol_features)
        except Exception:
            _close_quietly(fd)
            raise
        self._set_channel(channel)

    def _get_config(self, msg: Message) -> bytes:
        if not self._config:
            raise RequestError("the device has no config space")
        req = ConfigSpace.decode(msg.payload, with_data=False)
        data = self._config[req.offset : req.offset + req.size]
        # Front-ends may size the space generously (QEMU's generic device takes
        # config_size from the command line); bytes past ours read as zero.
        data += bytes(req.size - len(data))
        return ConfigSpace(req.offset, req.size, req.flags, data).encode()

    def _set_config(self, msg: Message) -> None:
        ConfigSpace.decode(msg.payload)
        raise RequestError("the device config space is read-only")

    def _get_shmem_config(self, msg: Message) -> bytes:
        if not self._shmem_sizes:
            raise RequestError("the device has no shared memory regions")
        return ShmemConfig(tuple(self._shmem_sizes)).encode()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _ring_in(vring: Vring, region: MappedRegion) -> bool:
    """Whether any of the ring's three areas starts inside ``region`` (front-end addresses)."""
    addr = vring.addr
    if addr is None:
        return False
    return any(region.user_addr <= a < region.user_end for a in (addr.desc, addr.avail, addr.used))
